"""Shared test fixtures: where the reference data lives and synthetic checkpoints.

The parity data is read in place from ``ADAFACE_TEST_DATA`` (default: ``../shared`` beside the
repository). Tests that need it skip with a visible reason where it is absent.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ADAFACE_TEST_DATA", REPO.parent / "shared")).resolve()
REFERENCE = SHARED / "reference"
FACEDATA = SHARED / "facedata"


def shared_available() -> bool:
    """True when the reference outputs and photos are present."""
    return (REFERENCE / "expected_ir101" / "reference.json").is_file() and FACEDATA.is_dir()


def require_shared():
    """Skip the calling test, with the reason printed, when the shared data is absent."""
    if not shared_available():
        pytest.skip(f"parity data not found at {SHARED} (set ADAFACE_TEST_DATA)")


def write_synthetic_checkpoint(out: Path, arch: str = "ir_101", fmt: str = "lightning") -> Path:
    """Write a synthetic checkpoint with the released layout using the shared generator script."""
    require_shared()
    manifest = REFERENCE / f"manifest_{arch}.json"
    if not out.exists():
        subprocess.run(
            [sys.executable, str(REFERENCE / "make_synthetic_checkpoint.py"), str(manifest), str(out),
             "--format", fmt],
            check=True, capture_output=True,
        )
    return out


def photo(name: str) -> bytes:
    """A shared test photo's file bytes (img1/img2: same person; *_aligned: 112×112 crops);
    skips the calling test when the shared data is absent."""
    folder = "aligned" if "aligned" in name else "adaface"
    path = FACEDATA / folder / name
    if not path.is_file():
        pytest.skip(f"test photo not found at {path} (set ADAFACE_TEST_DATA)")
    return path.read_bytes()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A session-wide folder for written checkpoints (IR-101 files are 260 MB; write each once)."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def synthetic_ckpt(checkpoint_dir):
    """Factory: ``synthetic_ckpt(arch='ir_101', fmt='lightning') -> Path`` of a written checkpoint."""
    def make(arch: str = "ir_101", fmt: str = "lightning") -> Path:
        suffix = {"lightning": ".ckpt", "plain": ".pth", "cvlface": ".pt"}[fmt]
        return write_synthetic_checkpoint(checkpoint_dir / f"{arch}_{fmt}{suffix}", arch, fmt)
    return make
