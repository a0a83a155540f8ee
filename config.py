"""Every setting of the service, in one place.

Each field is read from an ``ADAFACE_<NAME>`` environment variable (the field name in upper
case), with the default given here; the README's settings table lists them all. Tests and
embedding applications build a :class:`Settings` directly or with :meth:`Settings.from_env`
and ``overrides``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = "pretrained/adaface_ir101_webface12m.ckpt"
#: What ``make weights`` downloads (the CVLFace release on Hugging Face); used when the default
#: ``.ckpt`` is absent and ADAFACE_WEIGHTS is not set.
DOWNLOADED_WEIGHTS = "pretrained/adaface_ir101_webface12m.safetensors"
PREFIX = "ADAFACE_"


class SettingsError(ValueError):
    """An ``ADAFACE_*`` variable has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Service settings; see the README's table for what each one does."""

    # model
    weights: str = DEFAULT_WEIGHTS          # checkpoint file or folder, or "synthetic"
    arch: str = ""                          # ir_18 | ir_34 | ir_50 | ir_101; empty: from the weights
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    threads: int = 0                        # torch intra-op threads per worker; 0: cores / workers
    backend: str = "auto"                   # auto | torch | onnx (auto: ONNX Runtime on CPU, torch on CUDA)
    cache_dir: str = "data/cache"           # exported ONNX graphs when the weights' folder is read-only
    # detection and alignment
    align: str = "auto"                     # auto | always | never
    faces: str = "largest"                  # largest | score | all
    max_faces: int = 20                     # cap on faces per image with faces=all
    min_face_size: float = 20.0             # smallest face MTCNN looks for, in pixels
    detect_max_side: int = 0                # detect on a copy shrunk to this side; 0: full resolution
    max_detect: int = 0                     # images decoded and detected at once per worker; 0: cores / threads
    # limits
    max_pixels: int = 89_478_485            # decoded image size limit (Pillow's default)
    max_body_bytes: int = 32 * 1024 * 1024  # request body limit
    max_images: int = 32                    # images per /v1/embed request
    # batching across requests
    max_batch: int = 0                      # faces per forward; 0: 8 on CPU, 32 on CUDA
    max_wait_ms: float = 2.0                # how long a forward waits for more faces
    max_queue: int = 64                     # faces waiting for a forward before 503
    # memory (serving/memory.py)
    malloc_arenas: int = 2                  # glibc heaps per worker process; 0: glibc's default (8 per core)
    onednn_cache: int = 256                 # compiled oneDNN primitives kept; 0: oneDNN's default (1024)
    # API
    verify_threshold: float = 0.35          # cosine similarity at or above which /v1/verify says same person
    # galleries (1:N identification; docs/galleries.md)
    gallery_url: str = "sqlite:///data/gallery.db"  # sqlite:///path (relative: from the repo) or postgresql://...
    identify_threshold: float = 0.35        # similarity at or above which identify says "match"; its own
                                            # setting: raise it for large galleries (see `calibrate`)
    api_keys: str = ""                      # comma-separated keys; empty: no auth
    api_keys_file: str = ""                 # file with one key per line
    log_level: str = "INFO"
    # gunicorn (read by gunicorn.conf.py)
    bind: str = "0.0.0.0:30035"
    workers: int = 1                        # processes; each holds a model (about 0.5 GB with IR-101)
    timeout: int = 300                      # seconds before gunicorn restarts a silent worker
    warmup: bool = True                     # run one embedding before /readyz says ready

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        """Read ``ADAFACE_*`` variables (``os.environ`` by default), then apply ``overrides``."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f, raw.strip())
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def weights_path(self) -> Path:
        """The weights path, relative paths taken from the repository folder."""
        path = Path(self.weights).expanduser()
        path = path if path.is_absolute() else REPO_DIR / path
        if self.weights == DEFAULT_WEIGHTS and not path.exists() and (REPO_DIR / DOWNLOADED_WEIGHTS).exists():
            return REPO_DIR / DOWNLOADED_WEIGHTS
        return path

    def cache_path(self) -> Path:
        path = Path(self.cache_dir).expanduser()
        return path if path.is_absolute() else REPO_DIR / path

    def api_key_list(self) -> list:
        """The accepted API keys from ``api_keys`` and ``api_keys_file`` (blank lines ignored)."""
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file:
            try:
                text = Path(self.api_keys_file).read_text()
            except OSError as exc:
                raise SettingsError(f"ADAFACE_API_KEYS_FILE: cannot read {self.api_keys_file}: {exc}") from exc
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        return keys


def _parse(f: dataclasses.Field, raw: str):
    """Convert one variable's text to the field's type, with an error naming the variable."""
    name = PREFIX + f.name.upper()
    kind = type(f.default)
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
