"""Files the commands read and write: the photos of a folder, vector files."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from adaface.options import EMBEDDING_SIZE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: Path) -> list:
    """Every image file under ``folder`` (by suffix), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def save_vectors(out: Path, names: list, vectors: np.ndarray, norms: np.ndarray) -> None:
    """Write names and float32 vectors (N×512) to ``.npz`` or ``.parquet`` (needs pyarrow)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("writing parquet needs pyarrow: pip install pyarrow (or use a .npz file)")
        table = pa.table({"name": names, "norm": norms,
                          "embedding": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), EMBEDDING_SIZE)})
        pq.write_table(table, out)
    else:
        np.savez(out, names=np.array(names), embeddings=vectors, norms=norms)
