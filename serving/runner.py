"""Inference for the HTTP layer: admission control, native threads, micro-batched forwards.

``InferenceRunner.embed(inputs, options)`` decodes, detects and aligns each input in a native
thread, sends all crops through the shared :class:`MicroBatcher`, and returns one entry per
input: a list of :class:`AdaFaceFeature.Face` or the client error that input caused.
"""
import logging
import os

import numpy as np
import torch

from .batcher import MicroBatcher
from .errors import ApiError, client_error
from .memory import release_free_heap
from .native import NativeSlots, Offloader, allocate_lock

logger = logging.getLogger(__name__)


class InferenceRunner:
    """Owns the batcher and the thread pool for one extractor in one worker process."""

    def __init__(self, extractor, settings, metrics=None):
        self.extractor = extractor
        self.settings = settings
        self.metrics = metrics
        cuda = extractor.device.type == "cuda"
        self.max_batch = settings.max_batch or (32 if cuda else 8)
        self.max_queue = settings.max_queue
        self.batcher = MicroBatcher(extractor.embed_crops, self.max_batch, settings.max_wait_ms,
                                    observe=metrics.observe_batch if metrics else None)
        self.offloader = Offloader(size=max(2, min(8, (os.cpu_count() or 2) * 2)))
        # decoding and detection use torch.get_num_threads() cores each: more at once would only
        # hold more photos and pyramids in memory
        per_image = max(1, torch.get_num_threads())
        self.prepare_slots = NativeSlots(settings.max_detect or max(1, (os.cpu_count() or 1) // per_image))
        self._inflight = 0
        self._lock = allocate_lock()

    def _admit(self, count: int) -> None:
        with self._lock:
            if self._inflight + count > self.max_queue:
                raise ApiError(503, "busy", f"the server is at capacity ({self.max_queue} images in "
                               "flight); retry shortly", headers={"Retry-After": "1"})
            self._inflight += count
            depth = self._inflight
        if self.metrics:
            self.metrics.queue_depth(depth)

    def _release(self, count: int) -> None:
        with self._lock:
            self._inflight -= count
            depth = self._inflight
        if self.metrics:
            self.metrics.queue_depth(depth)

    def embed(self, inputs: list, options: dict) -> list:
        """Embed each input (bytes, base64 text, ...); one entry per input: faces or an exception."""
        self._admit(len(inputs))
        try:
            return self.offloader.call(self._work, inputs, options)
        finally:
            self._release(len(inputs))

    def _work(self, inputs: list, options: dict) -> list:
        """Runs in a native thread: prepare every input, then one batched forward for all."""
        prepared = []
        for item in inputs:
            try:
                with self.prepare_slots.held():
                    prepared.append(self.extractor.prepare(item, **options))
            except Exception as exc:  # a client error for this input only; bugs re-raised
                if client_error(exc) is None:
                    raise
                prepared.append(exc)
        crops = [c for p in prepared if not isinstance(p, Exception) for c in p.crops]
        if crops:
            embeddings, norms = self.batcher.submit(np.stack([c.crop for c in crops]))
        results, i = [], 0
        for p in prepared:
            if isinstance(p, Exception):
                results.append(p)
                continue
            faces = [c.with_embedding(embeddings[i + k], norms[i + k]) for k, c in enumerate(p.crops)]
            i += len(p.crops)
            results.append(_Result(p, faces))
        if self.metrics:
            for r in results:
                if not isinstance(r, Exception):
                    self.metrics.observe_faces(len(r.faces))
        return results

    def warm_up(self) -> None:
        """One embedding through the whole path (detector included), so /readyz means ready."""
        grey = np.full((160, 160, 3), 128, np.uint8)
        crop = np.full((112, 112, 3), 128, np.uint8)
        self._work([grey, crop], {"faces": "largest", "align_mode": "auto"})
        release_free_heap()


class _Result:
    """Faces of one prepared image, with its decoded size and whether it was taken as a crop."""

    __slots__ = ("width", "height", "aligned", "faces")

    def __init__(self, prepared, faces):
        self.width, self.height, self.aligned = prepared.width, prepared.height, prepared.aligned
        self.faces = faces
