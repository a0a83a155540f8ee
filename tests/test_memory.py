"""``serving.memory``: glibc's heap count, oneDNN's cache size, handing free heap back.

Their effect on a worker's memory is measured by ``bench/service.py --photos`` (README)."""
import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serving import memory


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


def test_onednn_cache_is_set_only_when_unset(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    memory.set_onednn_cache(0, os.environ)
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    memory.set_onednn_cache(256, os.environ)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
    memory.set_onednn_cache(64, os.environ)  # the operator's (or an earlier) choice wins
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"


@pytest.mark.skipif(not glibc(), reason="not glibc")
def test_arena_limit_bounds_the_heaps_threads_get():
    script = textwrap.dedent("""
        import ctypes, sys, threading
        sys.path.insert(0, sys.argv[1])
        from serving import memory
        if sys.argv[2] != "0":
            assert memory.limit_arenas(int(sys.argv[2]))
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        heaps, lock, ready = set(), threading.Lock(), threading.Barrier(8)
        def work():
            ready.wait()  # all alive at once: each would get a heap of its own
            block = libc.malloc(1000)
            with lock:
                heaps.add(block >> 26)  # a thread heap is a 64 MiB-aligned mapping
            ready.wait()
        threads = [threading.Thread(target=work) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(len(heaps))
    """)
    repo = Path(__file__).resolve().parents[1]
    count = {limit: int(subprocess.run([sys.executable, "-c", script, str(repo), str(limit)], check=True,
                                       capture_output=True, text=True).stdout) for limit in (0, 2)}
    assert count[2] <= 2 < count[0]
    assert not memory.limit_arenas(0)


def test_release_free_heap_runs():
    memory.release_free_heap()  # a no-op off glibc; never raises
