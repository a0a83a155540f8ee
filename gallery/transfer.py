"""Export a gallery to a file and import it back: ``.npz`` (NumPy) or ``.parquet`` (pyarrow).

One row per face: ``identity`` (str), ``metadata`` (the identity's JSON text, empty when none),
``photo_sha256`` (hex str), ``norm`` (float32) and ``embedding`` (float32 (512,), unit length;
in ``.npz`` an (n, 512) array, in Parquet a fixed-size list column). The model that made the
embeddings goes with them (``.npz``: ``model_arch``, ``model_fingerprint``, ``model_synthetic``;
Parquet: the ``adaface_model`` schema metadata, JSON), and an import into a gallery of another
model is refused (``model_mismatch``). Crops are not exported: imported faces cannot be
re-embedded. Importing is idempotent: faces whose photo the identity already has are skipped,
so an interrupted import can be rerun.
"""
from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from adaface.identity import ModelIdentity
from adaface.options import EMBEDDING_SIZE

from .audit import Actor
from .store import ExportRow, GalleryStore, NewFace

#: faces per enroll transaction on import
BATCH = 1000


def _columns(rows: Iterable[ExportRow]) -> dict:
    rows = list(rows)
    return {
        "identity": [r.identity for r in rows],
        "metadata": ["" if r.metadata is None else json.dumps(r.metadata, ensure_ascii=False) for r in rows],
        "photo_sha256": [r.photo_sha256 for r in rows],
        "norm": np.array([r.norm for r in rows], np.float32),
        "embedding": np.stack([r.embedding for r in rows]).astype(np.float32) if rows
        else np.zeros((0, EMBEDDING_SIZE), np.float32),
    }


def write_rows(path: Path, rows: Iterable[ExportRow], model: Optional[ModelIdentity] = None) -> int:
    """Write rows (made by ``model``, when known) to ``path`` (format from the suffix); the number written."""
    cols = _columns(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        flat = pa.array(cols["embedding"].reshape(-1), pa.float32())
        table = pa.table({"identity": cols["identity"], "metadata": cols["metadata"],
                          "photo_sha256": cols["photo_sha256"], "norm": cols["norm"],
                          "embedding": pa.FixedSizeListArray.from_arrays(flat, EMBEDDING_SIZE)})
        if model is not None:
            table = table.replace_schema_metadata({"adaface_model": json.dumps(model.to_dict())})
        pq.write_table(table, path)
    elif path.suffix == ".npz":
        extra = {} if model is None else {"model_arch": np.array(model.arch), "model_synthetic": np.array(model.synthetic),
                                          "model_fingerprint": np.array(model.fingerprint)}
        np.savez(path, identity=np.array(cols["identity"], dtype=str), metadata=np.array(cols["metadata"], dtype=str),
                 photo_sha256=np.array(cols["photo_sha256"], dtype=str), norm=cols["norm"],
                 embedding=cols["embedding"], **extra)
    else:
        raise ValueError(f"{path}: use a .npz or .parquet file")
    return len(cols["identity"])


def read_rows(path: Path) -> Iterator[ExportRow]:
    """Rows from a file written by :func:`write_rows` (or any with the same columns)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        n = table.num_rows
        embedding = np.asarray(table.column("embedding").combine_chunks().flatten(), np.float32)
        cols = {name: table.column(name).to_pylist() for name in ("identity", "metadata", "photo_sha256", "norm")}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            cols = {name: data[name].tolist() for name in ("identity", "metadata", "photo_sha256", "norm")}
            embedding = data["embedding"].astype(np.float32)
        n = len(cols["identity"])
    else:
        raise ValueError(f"{path}: use a .npz or .parquet file")
    embedding = embedding.reshape(n, EMBEDDING_SIZE)
    for i in range(n):
        meta = cols["metadata"][i]
        yield ExportRow(cols["identity"][i], json.loads(meta) if meta else None, cols["photo_sha256"][i],
                        float(cols["norm"][i]), embedding[i])


def read_model(path: Path) -> Optional[ModelIdentity]:
    """The model recorded in an export file, or None (a file written before models were recorded)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        found = (pq.read_schema(path).metadata or {}).get(b"adaface_model")
        if not found:
            return None
        model = json.loads(found)
        return ModelIdentity(model["arch"], model["fingerprint"], bool(model["synthetic"]))
    with np.load(path, allow_pickle=False) as data:
        if "model_fingerprint" not in data:
            return None
        return ModelIdentity(str(data["model_arch"]), str(data["model_fingerprint"]), bool(data["model_synthetic"]))


def export_gallery(store: GalleryStore, gallery: str, path: Path) -> int:
    return write_rows(path, store.export_rows(gallery), store.get_gallery(gallery).model)


def import_gallery(store: GalleryStore, gallery: str, path: Path, progress=None, actor: Optional[Actor] = None) -> tuple:
    """Enroll every row into ``gallery`` (created when absent): (faces added, faces already there);
    the writes are recorded for ``actor`` in the audit trail."""
    store.ensure_gallery(gallery, actor)
    model = read_model(path)
    if model is not None:
        store.check_model(gallery, model)  # model_mismatch before anything is written
    added = existing = 0
    rows = list(read_rows(path))
    for identity, group in groupby(rows, key=lambda r: r.identity):
        group = list(group)
        metadata = next((r.metadata for r in group if r.metadata is not None), None)
        for start in range(0, len(group), BATCH):
            chunk = group[start:start + BATCH]
            done = store.enroll(gallery, identity, [NewFace(r.embedding, r.norm, r.photo_sha256) for r in chunk],
                                metadata, model, actor)
            added += done.added
            existing += len(chunk) - done.added
            if progress is not None:
                progress(len(chunk))
    return added, existing
