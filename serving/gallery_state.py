"""The worker's galleries: the store named by the settings, opened on first use (after
gunicorn's fork), its calls run in native threads, off the gevent loop."""
from __future__ import annotations

from adaface.options import DEFAULT_ANN_MIN_FACES, DEFAULT_ANN_NPROBE
from adaface.threads import Offloader, allocate_lock
from gallery.galleries import Galleries
from gallery.ann import SearchParams
from gallery.open import check_url, open_store


class GalleryState:
    """The process's :class:`gallery.galleries.Galleries`, opened on first use; galleries of
    ``ann_min_faces`` faces or more are searched through an inverted file (0: never) scanning
    ``nprobe`` of its lists."""

    def __init__(self, url: str, ann_min_faces: int = DEFAULT_ANN_MIN_FACES,
                 nprobe: int = DEFAULT_ANN_NPROBE):
        self.url = check_url(url)  # a bad URL stops the app at start (a ValueError)
        self.search = SearchParams(ann_min_faces=ann_min_faces, nprobe=nprobe)
        self._galleries = None
        self._lock = allocate_lock()
        self.offloader = Offloader(size=4)

    def _open(self) -> Galleries:
        with self._lock:
            if self._galleries is None:
                self._galleries = Galleries(open_store(self.url), self.search)
            return self._galleries

    def store(self):
        """The store itself, for work that runs in a thread of its own (a re-embed)."""
        return self._open().store

    def call(self, method: str, *args, **kwargs):
        """Run ``Galleries.<method>`` (or ``Galleries.store.<method>``) in a native thread; its
        result, or its exception raised again here, in the caller."""
        def work():
            galleries = self._open()
            target = getattr(galleries, method, None) or getattr(galleries.store, method)
            return target(*args, **kwargs)
        return self.offloader.call(work)  # an exception is raised again here, not in the pool

    def close(self) -> None:
        with self._lock:
            if self._galleries is not None:
                self._galleries.close()
                self._galleries = None
