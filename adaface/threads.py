"""Native OS threads and locks, also under gevent's monkey-patching.

gunicorn's gevent worker patches ``threading`` into greenlets, which would run model work on
the event loop and block every other request (and ``/livez``). Inference therefore runs in
real threads built from the original ``_thread`` primitives; a request greenlet waits for it
through gevent's thread pool, which yields to the loop while the native thread works.
"""
import collections
import contextlib
import itertools
import os

try:
    from gevent import monkey as _monkey
except ImportError:  # gevent is optional outside the gunicorn worker
    _monkey = None


def _original(module: str, name: str):
    if _monkey is not None:
        return _monkey.get_original(module, name)
    return getattr(__import__(module), name)


allocate_lock = _original("_thread", "allocate_lock")
start_new_thread = _original("_thread", "start_new_thread")
#: time.sleep that blocks the calling native thread, also under gevent
native_sleep = _original("time", "sleep")


def gevent_active() -> bool:
    """True inside a gevent-patched process (the gunicorn gevent worker)."""
    return _monkey is not None and _monkey.is_module_patched("threading")


class Offloader:
    """Runs blocking calls in native threads; ``call(fn, *args)`` returns fn's result or raises.

    Under gevent the calling greenlet waits in a gevent ThreadPool of ``size`` native threads;
    elsewhere (tests, the development server, sync workers) the caller's thread runs ``fn``.
    The pool is made lazily in the process that uses it (after gunicorn's fork).
    """

    def __init__(self, size: int):
        self.size = size
        self._pool, self._pid = None, None

    def call(self, fn, *args):
        if not gevent_active():
            return fn(*args)
        if self._pool is None or self._pid != os.getpid():
            from gevent.threadpool import ThreadPool
            self._pool, self._pid = ThreadPool(self.size), os.getpid()
        # fn's exception comes back as a value and is raised here, in the caller: raised in the
        # pool's thread, gevent would print its traceback (a client's 404 or 400 included)
        ok, outcome = self._pool.apply(_captured, (fn, args))
        if not ok:
            raise outcome
        return outcome


def _captured(fn, args) -> tuple:
    """(True, fn(*args)), or (False, the exception it raised)."""
    try:
        return True, fn(*args)
    except BaseException as exc:  # noqa: BLE001 - raised again by the caller
        return False, exc


def map_native(fn, items, workers: int) -> list:
    """``[fn(item) for item in items]`` spread over ``workers`` native threads, the caller's
    included (helpers are started for the call and end with it); the first error is raised.

    For work that releases the GIL (PIL's resampling, say): under gevent the caller is already a
    native thread, and ``threading`` would give greenlets that run one at a time.
    """
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    results, errors = [None] * len(items), []
    claim, cursor = allocate_lock(), [0]

    def drain():
        while True:
            with claim:
                index = cursor[0]
                cursor[0] += 1
            if index >= len(items):
                return
            try:
                results[index] = fn(items[index])
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)

    finished = []
    for _ in range(workers - 1):
        done = allocate_lock()
        done.acquire()
        finished.append(done)
        start_new_thread(_run_then_release, (drain, done))
    drain()
    for done in finished:
        done.acquire()
    if errors:
        raise errors[0]
    return results


def _run_then_release(fn, lock):
    try:
        fn()
    finally:
        lock.release()


class NativeSlots:
    """At most ``count`` holders at once (``with slots.held(): ...``), for native threads: built
    on the original ``_thread`` locks, so a waiting thread blocks itself, never the gevent hub.
    A free slot is taken at once; when none is, the waiters queue on the slots in turn."""

    def __init__(self, count: int):
        self.count = max(1, count)
        self._locks = [allocate_lock() for _ in range(self.count)]
        self._turn = itertools.count()

    @contextlib.contextmanager
    def held(self):
        lock = next((lock for lock in self._locks if lock.acquire(False)), None)
        if lock is None:
            lock = self._locks[next(self._turn) % self.count]
            lock.acquire()
        try:
            yield
        finally:
            lock.release()


class PixelBudget:
    """At most ``capacity`` units (pixels) held at once by native threads (``with
    budget.held(n): ...``); a holder that alone exceeds it still gets in once nothing else is
    held, so no request waits forever. Waiters are served in arrival order: a large one is not
    overtaken by a stream of small ones."""

    def __init__(self, capacity: float):
        self.capacity = capacity
        self.in_use = 0.0
        self._mutex = allocate_lock()
        self._waiting = collections.deque()

    @contextlib.contextmanager
    def held(self, amount: float):
        self._acquire(amount)
        try:
            yield
        finally:
            self._release(amount)

    def _fits(self, amount: float) -> bool:
        return self.in_use == 0 or self.in_use + amount <= self.capacity

    def _acquire(self, amount: float) -> None:
        with self._mutex:
            if not self._waiting and self._fits(amount):
                self.in_use += amount
                return
            gate = allocate_lock()
            gate.acquire()
            self._waiting.append((amount, gate))
        gate.acquire()  # released by _release, which has counted ``amount`` as ours

    def _release(self, amount: float) -> None:
        with self._mutex:
            self.in_use -= amount
            while self._waiting and self._fits(self._waiting[0][0]):
                waiting, gate = self._waiting.popleft()
                self.in_use += waiting
                gate.release()
