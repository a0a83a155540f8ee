"""The worker's galleries: the store named by the settings, opened on first use (after
gunicorn's fork), its calls run in native threads, off the gevent loop."""
from __future__ import annotations

from adaface.threads import Offloader, allocate_lock
from gallery.galleries import Galleries
from gallery.open import check_url


class GalleryState:
    """The process's :class:`gallery.galleries.Galleries`, opened on first use."""

    def __init__(self, url: str):
        self.url = check_url(url)  # a bad URL stops the app at start (a ValueError)
        self._galleries = None
        self._lock = allocate_lock()
        self.offloader = Offloader(size=4)

    def _open(self) -> Galleries:
        with self._lock:
            if self._galleries is None:
                self._galleries = Galleries.open(self.url)
            return self._galleries

    def call(self, method: str, *args):
        """Run ``Galleries.<method>`` (or ``Galleries.store.<method>``) in a native thread; its
        result, or its exception raised again here, in the caller."""
        def work():
            galleries = self._open()
            target = getattr(galleries, method, None) or getattr(galleries.store, method)
            return target(*args)
        return self.offloader.call(work)  # an exception is raised again here, not in the pool

    def close(self) -> None:
        with self._lock:
            if self._galleries is not None:
                self._galleries.close()
                self._galleries = None
