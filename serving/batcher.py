"""Dynamic micro-batching: faces from concurrent requests share one network forward.

Callers (native threads) ``submit`` N×112×112×3 crops and block until their embeddings are
ready. One native worker thread takes whatever is waiting, waits up to ``max_wait_ms`` for more
until ``max_batch`` faces are gathered, runs one forward and hands each caller its rows.
A job larger than ``max_batch`` runs in chunks (:func:`adaface.pipeline.forward_in_chunks`, the
one place forwards are cut to size). The queue is bounded by the caller (see
``InferenceRunner``), so memory is bounded too.
"""
import logging
import os
import time
from collections import deque

import numpy as np

from adaface.pipeline import forward_in_chunks
from adaface.threads import allocate_lock, start_new_thread

logger = logging.getLogger(__name__)


class _Job:
    __slots__ = ("crops", "done", "result", "error")

    def __init__(self, crops: np.ndarray):
        self.crops = crops
        self.done = allocate_lock()
        self.done.acquire()
        self.result = None
        self.error = None


class MicroBatcher:
    """Groups crops from many callers into forwards of ``embed(crops) -> (emb N×512, norms N)``,
    one forward of at most ``max_batch`` crops per call of ``embed``.

    ``observe(batch_size, seconds)`` is called after each forward (for metrics).
    """

    def __init__(self, embed, max_batch: int, max_wait_ms: float, observe=None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.embed = embed
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.observe = observe or (lambda size, seconds: None)
        self._pending = deque()
        self._mutex = allocate_lock()
        self._signal = allocate_lock()
        self._signal.acquire()
        self._pid = None

    def submit(self, crops: np.ndarray):
        """Embed N×112×112×3 uint8 RGB crops; blocks the calling native thread until done."""
        if len(crops) == 0:
            return forward_in_chunks(self.embed, crops, self.max_batch)
        self._ensure_worker()
        job = _Job(crops)
        self._pending.append(job)
        self._notify()
        job.done.acquire()
        if job.error is not None:
            raise job.error
        return job.result

    def _notify(self) -> None:
        with self._mutex:
            if self._signal.locked():
                self._signal.release()

    def _ensure_worker(self) -> None:
        with self._mutex:
            if self._pid != os.getpid():  # first use in this process (e.g. after gunicorn's fork)
                self._pid = os.getpid()
                start_new_thread(self._run, ())

    def _run(self) -> None:
        while True:
            if not self._pending:
                self._signal.acquire()
                continue
            jobs = self._gather()
            try:
                self._forward(jobs)
            except BaseException as exc:  # hand the failure to every waiting caller
                logger.exception("batched forward failed")
                for job in jobs:
                    job.error = exc
            for job in jobs:
                job.done.release()

    def _gather(self) -> list:
        """Take waiting jobs until max_batch faces or max_wait has passed since the first."""
        jobs, count = [], 0
        deadline = time.monotonic() + self.max_wait
        while True:
            while self._pending and (count == 0 or count + len(self._pending[0].crops) <= self.max_batch):
                job = self._pending.popleft()
                jobs.append(job)
                count += len(job.crops)
            remaining = deadline - time.monotonic()
            if count >= self.max_batch or remaining <= 0 or (self._pending and count):
                return jobs
            self._signal.acquire(timeout=remaining)

    def _forward(self, jobs: list) -> None:
        crops = jobs[0].crops if len(jobs) == 1 else np.concatenate([j.crops for j in jobs])
        embeddings, norms = forward_in_chunks(self.embed, crops, self.max_batch, self.observe)
        offset = 0
        for job in jobs:
            n = len(job.crops)
            job.result = (embeddings[offset:offset + n], norms[offset:offset + n])
            offset += n
