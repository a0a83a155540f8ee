"""Process-wide memory settings for a worker: how glibc and oneDNN keep memory around.

Measured with full photos (``bench/service.py --photos``, 8 clients): a worker's resident memory
grew from 0.8 GB to 2.4 GB and kept growing, for three reasons.

- glibc gives each thread that allocates its own heap ("arena"), up to 8 per core, and keeps
  what is freed in each. The detector's work (a 12-megapixel photo's pyramid takes a few hundred
  MB for a moment) lands in a different arena almost every time. ``limit_arenas(2)``, with the
  two below, held the same run at 1.3 to 1.5 GB, at the same speed.
- oneDNN keeps 1,024 compiled convolutions by default, each a few hundred kB: P-Net compiles
  about 50 per photo size. ``set_onednn_cache`` must run before the first convolution.
- freed heap that loading leaves behind: ``release_free_heap`` after the warm-up.

All three are no-ops where they do not apply (not glibc, or a value already chosen).
"""
import ctypes

M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_arenas(count: int) -> bool:
    """Let glibc create at most ``count`` heaps for this process's threads (0: its default);
    True when set. Threads beyond them share; the heaps that exist already stay."""
    libc = _libc()
    if count <= 0 or libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, count))


def set_onednn_cache(capacity: int, environ) -> None:
    """Keep at most ``capacity`` compiled oneDNN primitives, unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``
    is set already in ``environ`` (the process environment, which the entry point passes); oneDNN
    reads it once, at its first primitive, so call this before any."""
    if capacity > 0:
        environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def release_free_heap() -> None:
    """Hand the heap memory that is free back to the system (glibc's ``malloc_trim``): after
    loading (the ONNX export and its check, the kernels' compilation) it is hundreds of MB."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
