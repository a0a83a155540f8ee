"""1:N identification: persistent galleries of identities and their face embeddings.

- :mod:`gallery.store`: the storage interface; :mod:`gallery.open`: :func:`open_store`, the
  factory over the backends :mod:`gallery.sqlite_store` (``sqlite:///path``) and
  :mod:`gallery.postgres_store` (``postgresql://...``), which share their SQL and schema in
  :mod:`gallery.sql`.
- :mod:`gallery.index`: in-memory cosine search (a float16 scan, or an inverted file from
  :mod:`gallery.ann` for large galleries; rescored in float32 by :mod:`gallery.rescore`), kept in
  step with the store.
- :mod:`gallery.galleries`: the two together, as the HTTP routes (``serving/routes/galleries.py``)
  and the command line (:mod:`cli.gallery`) use them.
- :mod:`gallery.transfer`: export and import (``.npz`` or ``.parquet``).
- :mod:`gallery.calibrate`: ROC, EER and thresholds from labelled pairs.
"""
from .galleries import Candidate, Galleries, decide, photo_sha256
from .open import open_store
from .store import GalleryStore, NewFace

__all__ = ["Candidate", "Galleries", "GalleryStore", "NewFace", "decide", "open_store", "photo_sha256"]
