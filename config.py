"""Every setting of the service, in one place.

Each field is read from an ``ADAFACE_<NAME>`` environment variable (the field name in upper
case), with the default given here (vocabularies, bounds and library defaults come from
:mod:`adaface.options`); the README's settings table lists them all. Tests and embedding
applications build a :class:`Settings` directly or with :meth:`Settings.from_env` and
``overrides``. A value outside its vocabulary or bounds, or a variable whose name is a near miss
of a setting's (``ADAFACE_MAX_BACH``), is a :class:`SettingsError` at start.

Only the entry points (``flask_http_server.py``, ``AdaFaceFeature.py``, ``gunicorn.conf.py``)
import this module; they hand the settings down to the layers below.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from adaface import options as opt
from gallery.store import GALLERY_NAME
from serving.rates import parse_rate

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = "pretrained/adaface_ir101_webface12m.ckpt"
#: What ``make weights`` downloads (the CVLFace release on Hugging Face); used when the default
#: ``.ckpt`` is absent and ADAFACE_WEIGHTS is not set.
DOWNLOADED_WEIGHTS = "pretrained/adaface_ir101_webface12m.safetensors"
#: What to do without weights: the server's, ``make run``'s and ``make weights``' last words.
NO_WEIGHTS_HELP = (
    "Three ways forward:\n"
    "  1. `make weights` downloads them from Hugging Face (minchul/cvlface_adaface_ir101_webface12m);\n"
    f"  2. put a released checkpoint at {DEFAULT_WEIGHTS} (the AdaFace README's Google Drive links),"
    " or point ADAFACE_WEIGHTS at one;\n"
    "  3. `ADAFACE_WEIGHTS=synthetic make run` tries the service with random weights (the embeddings mean nothing)."
)
PREFIX = "ADAFACE_"


class SettingsError(ValueError):
    """An ``ADAFACE_*`` variable has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Service settings; see the README's table for what each one does."""

    # model
    weights: str = DEFAULT_WEIGHTS          # checkpoint file or folder, or "synthetic"
    arch: str = ""                          # ir_18 | ir_34 | ir_50 | ir_101; empty: from the weights
    device: str = opt.DEFAULT_DEVICE        # auto | cpu | cuda | cuda:N
    threads: int = 0                        # torch intra-op threads per worker; 0: cores / workers
    backend: str = opt.DEFAULT_BACKEND      # auto | torch | onnx (auto: ONNX Runtime on CPU, torch on CUDA)
    cache_dir: str = "data/cache"           # exported ONNX graphs when the weights' folder is read-only
    precision: str = opt.DEFAULT_PRECISION  # fp32 | int8 (int8: the quantized graph, if it passes the gate)
    calibration_dir: str = "pretrained/calibration"  # face images int8 is calibrated and gated on
    int8_min_cosine: float = opt.DEFAULT_INT8_MIN_COSINE  # the gate: lowest cosine int8 to fp32 accepted
    # detection and alignment
    align: str = opt.DEFAULT_ALIGN          # auto | always | never
    faces: str = opt.DEFAULT_FACES          # largest | score | all
    max_faces: int = opt.DEFAULT_MAX_FACES  # cap on faces per image with faces=all
    min_face_size: float = opt.DEFAULT_MIN_FACE_SIZE  # smallest face MTCNN looks for, in pixels
    detect_max_side: int = 0                # detect on a copy shrunk to this side; 0: full resolution
    max_detect: int = 0                     # images decoded and detected at once per worker; 0: cores / threads
    # limits
    max_pixels: int = opt.MAX_PIXELS        # decoded image size limit, pixels (a 50 MP photo and a little more)
    pixel_budget: float = 64.0              # megapixels of large images decoded and detected at once per worker
    large_image: float = 16.0               # megapixels above which an image takes the large-image lane
    body_timeout: float = 60.0              # seconds to receive a request body before 408
    max_body_bytes: int = 32 * 1024 * 1024  # request body limit
    max_images: int = 32                    # images per /v1/embed request
    # batching across requests
    max_batch: int = 0                      # faces per forward; 0: 8 on CPU, 32 on CUDA
    max_wait_ms: float = 2.0                # how long a forward waits for more faces
    max_queue: int = 64                     # images in flight per worker before 503 busy
    # memory (serving/memory.py)
    malloc_arenas: int = 2                  # glibc heaps per worker process; 0: glibc's default (8 per core)
    onednn_cache: int = 256                 # compiled oneDNN primitives kept; 0: oneDNN's default (1024)
    # API
    verify_threshold: float = opt.DEFAULT_VERIFY_THRESHOLD  # cosine similarity at or above which /v1/verify says same person
    # galleries (1:N identification; docs/galleries.md)
    gallery_url: str = "sqlite:///data/gallery.db"  # sqlite:///path (relative: from the repo) or postgresql://...
    identify_threshold: float = opt.DEFAULT_IDENTIFY_THRESHOLD  # similarity at or above which identify says
                                            # "match"; its own setting: raise it for large galleries (see `calibrate`)
    ann_nprobe: int = opt.DEFAULT_ANN_NPROBE  # the inverted file's lists scanned per probe: more is
                                            # slower and finds more of the true nearest faces
    ann_min_faces: int = opt.DEFAULT_ANN_MIN_FACES  # gallery faces from which search uses an inverted file
                                            # (approximate, rescored in float32); 0: always the float16 scan
    store_crops: bool = True                # keep each enrolled face's aligned crop (PNG): what a re-embed needs
    api_keys: str = ""                      # comma-separated keys (or sha256:<hex> of them), each with every scope
    api_keys_file: str = ""                 # keys file: one key a line, with name=, scopes=, galleries=, rate=
    open_galleries: bool = False            # keyless clients may read and change galleries (a trusted network only)
    admin_key_file: str = "data/admin.key"  # where the admin key is made when no keys are configured
    keyless_rate: str = ""                  # requests per client address without a key: N/s, N/min or N/h; empty: no limit
    compat_gallery: str = "default"         # the gallery CompreFace and DeepStack clients use (a key limited to one
                                            # gallery uses that one instead)
    log_level: str = "INFO"
    # gunicorn (read by gunicorn.conf.py)
    bind: str = "0.0.0.0:30035"
    workers: int = 1                        # processes; each holds a model (about 0.5 GB with IR-101)
    timeout: int = 300                      # seconds before gunicorn restarts a silent worker
    warmup: bool = True                     # run one embedding before /readyz says ready

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{_variable(name)}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"{_variable('log_level')}={self.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        if self.arch and self.arch not in opt.ARCH_NAMES:
            raise SettingsError(f"{_variable('arch')}={self.arch!r}: use one of {', '.join(opt.ARCH_NAMES)}, "
                                "or leave it empty to read it from the weights")
        if not re.fullmatch(opt.DEVICE_PATTERN, self.device.strip().lower()):
            raise SettingsError(f"{_variable('device')}={self.device!r}: use {opt.DEVICE_FORMS}")
        for name, bound in _BOUNDS.items():
            value = getattr(self, name)
            if not bound.low <= value <= bound.high:
                raise SettingsError(f"{_variable(name)}={value!r}: must be between {bound.low} and {bound.high}")
        for name in _NOT_NEGATIVE:
            if getattr(self, name) < 0:
                raise SettingsError(f"{_variable(name)}={getattr(self, name)!r}: must be 0 or more")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_variable(name)}={getattr(self, name)!r}: must be more than 0")
        if not re.fullmatch(GALLERY_NAME, self.compat_gallery):
            raise SettingsError(f"{_variable('compat_gallery')}={self.compat_gallery!r}: a gallery name is letters, "
                                "digits, '_', '.', '-' (1 to 64, starting with a letter or digit)")
        try:
            parse_rate(self.keyless_rate)
        except ValueError as exc:
            raise SettingsError(f"{_variable('keyless_rate')}: {exc}") from None

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        """Read ``ADAFACE_*`` variables (``os.environ`` by default), then apply ``overrides``.

        A variable that is no setting but whose name is close to one's is refused as a typo;
        other unknown ``ADAFACE_*`` names are logged and ignored."""
        environ = os.environ if environ is None else environ
        _check_names(environ)
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

    def gallery_store_url(self) -> str:
        """``gallery_url`` with a relative SQLite path made absolute from the repository folder."""
        prefix = "sqlite:///"
        if self.gallery_url.startswith(prefix) and not self.gallery_url.startswith(prefix + "/"):
            rest = self.gallery_url[len(prefix):]
            if rest:
                return prefix + str(REPO_DIR / Path(rest).expanduser())
        return self.gallery_url

    def cache_path(self) -> Path:
        path = Path(self.cache_dir).expanduser()
        return path if path.is_absolute() else REPO_DIR / path

    def calibration_path(self) -> Path:
        """``calibration_dir``, a relative path taken from the repository folder."""
        path = Path(self.calibration_dir).expanduser()
        return path if path.is_absolute() else REPO_DIR / path

    def api_key_lines(self) -> list:
        """The configured keys as (where, line) pairs: each of ``api_keys`` (a bare key, or
        ``sha256:<hex>``), then each line of ``api_keys_file`` (comments and blank lines too; the
        service parses them, :mod:`serving.keys`)."""
        lines = [(f"{_variable('api_keys')} item {n}", k.strip())
                 for n, k in enumerate(self.api_keys.split(","), 1) if k.strip()]
        if self.api_keys_file:
            try:
                text = Path(self.api_keys_file).read_text()
            except OSError as exc:
                raise SettingsError(f"ADAFACE_API_KEYS_FILE: cannot read {self.api_keys_file}: {exc}") from exc
            lines += [(f"{self.api_keys_file} line {n}", line) for n, line in enumerate(text.splitlines(), 1)]
        return lines

    def admin_key_path(self) -> Path:
        """``admin_key_file``, a relative path taken from the repository folder."""
        path = Path(self.admin_key_file).expanduser()
        return path if path.is_absolute() else REPO_DIR / path


_CHOICES = {"faces": opt.FACE_MODES, "align": opt.ALIGN_MODES, "backend": opt.BACKENDS,
            "precision": opt.PRECISIONS}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_BOUNDS = {"max_faces": opt.MAX_FACES, "min_face_size": opt.MIN_FACE_SIZE, "max_pixels": opt.PIXEL_CEILING,
           "verify_threshold": opt.SIMILARITY, "identify_threshold": opt.SIMILARITY,
           "int8_min_cosine": opt.GATE_COSINE}
_NOT_NEGATIVE = ("threads", "detect_max_side", "max_detect", "max_batch", "max_wait_ms", "malloc_arenas",
                 "onednn_cache", "ann_min_faces")
_POSITIVE = ("max_body_bytes", "max_images", "max_queue", "workers", "timeout", "pixel_budget", "large_image",
             "body_timeout", "ann_nprobe")
#: ADAFACE_* variables that are not settings but are read by the tests (their data folder, the
#: browser of the console's tests, where their screenshots go)
OTHER_VARIABLES = {PREFIX + "TEST_DATA", PREFIX + "CHROMIUM", PREFIX + "TEST_ARTIFACTS"}


def _variable(name: str) -> str:
    return PREFIX + name.upper()


def _check_names(environ) -> None:
    """Refuse a near miss of a setting's name (a typo would otherwise be silently ignored)."""
    known = [_variable(f.name) for f in fields(Settings)]
    for name in environ:
        if not name.startswith(PREFIX) or name in known or name in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if close:
            raise SettingsError(f"{name} is not a setting: did you mean {close[0]}?")
        logging.getLogger(__name__).warning("%s is not a setting; ignored", name)


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
