"""One OpenMP thread for the calling thread, so that torch ops can run in parallel native threads.

torch runs each CPU op on a team of OpenMP threads (``torch.set_num_threads``). MTCNN's ops are
small (P-Net on a strip of a pyramid level takes a few milliseconds, in a dozen ops), and a team
of two runs them only 1.3 to 1.8 times as fast as one thread: every op forks and joins the team,
and the small ones do not split well. The detector therefore runs its independent pieces of
work (P-Net's strips and canvases) in parallel native threads, each with a team of one.

``torch.set_num_threads`` cannot give that: it sets the count for the whole process. OpenMP's
own ``omp_set_num_threads`` sets it for the calling thread alone; ``one_thread`` calls it in the
OpenMP runtime that torch loaded. torch sets up a thread's count on its first op there, from
the process-wide value, so ``one_thread`` lets torch do that first.
"""
import contextlib
import ctypes
import functools
import os

import torch

RUNTIME_NAMES = ("libgomp", "libiomp5", "libomp")  # GNU (torch's Linux wheels), Intel, LLVM


@functools.lru_cache(maxsize=1)
def runtime():
    """The OpenMP runtime torch loaded, as a ``ctypes.CDLL``, or None where none can be found
    (not Linux, or torch built without OpenMP): one under torch's own folder if there is one."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            fields = [line.split(maxsplit=5) for line in maps]
        paths = {f[5].strip() for f in fields if len(f) == 6}
    except OSError:
        return None
    loaded = [p for p in sorted(paths) if os.path.basename(p).startswith(RUNTIME_NAMES)]
    torch_dir = os.path.dirname(torch.__file__)  # also the prefix of the wheels' "torch.libs"
    for path in sorted(loaded, key=lambda p: not p.startswith(torch_dir)):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            lib.omp_get_max_threads.restype = ctypes.c_int
        except (OSError, AttributeError):
            continue
        return lib
    return None


def available() -> bool:
    """Whether ``one_thread`` can set the calling thread's count (else it does nothing)."""
    return runtime() is not None


@contextlib.contextmanager
def one_thread():
    """Within the block, torch ops in this thread run on one OpenMP thread; the count the thread
    had is restored after it. Other threads are not affected."""
    lib = runtime()
    if lib is None:
        yield
        return
    torch.get_num_threads()  # torch's own set-up of this thread's count, which would undo ours
    saved = lib.omp_get_max_threads()
    lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        lib.omp_set_num_threads(saved)
