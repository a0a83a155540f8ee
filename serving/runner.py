"""Inference for the HTTP layer: admission control, native threads, micro-batched forwards.

``InferenceRunner.embed(inputs, options)`` decodes, detects and aligns each input in a native
thread and hands the crops to the extractor's one embed path
(:meth:`adaface.pipeline.Extractor.embed_prepared`) with the shared :class:`MicroBatcher` as
its forward; one :class:`adaface.faces.ImageFaces` per input comes back (faces, or the client
error that input caused).
"""
import logging
import os

import numpy as np
import torch

from adaface.options import EmbedOptions
from adaface.threads import NativeSlots, Offloader, allocate_lock

from .batcher import MicroBatcher
from .errors import ApiError
from .memory import release_free_heap

logger = logging.getLogger(__name__)


class InferenceRunner:
    """Owns the batcher and the thread pool for one extractor in one worker process."""

    def __init__(self, extractor, settings, metrics=None):
        self.extractor = extractor
        self.settings = settings
        self.metrics = metrics
        self.max_batch = settings.max_batch or extractor.max_batch
        self.max_queue = settings.max_queue
        self.batcher = MicroBatcher(extractor.model.forward, self.max_batch, settings.max_wait_ms,
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

    def embed(self, inputs: list, options: EmbedOptions) -> list:
        """Embed each input (bytes, base64 text, ...); one :class:`adaface.faces.ImageFaces` each."""
        self._admit(len(inputs))
        try:
            return self.offloader.call(self._work, inputs, options)
        finally:
            self._release(len(inputs))

    def _work(self, inputs: list, options: EmbedOptions) -> list:
        """Runs in a native thread: prepare every input, then one batched forward for all."""
        prepared = []
        for item in inputs:
            with self.prepare_slots.held():
                prepared.append(self.extractor.try_prepare(item, options))
        results = self.extractor.embed_prepared(prepared, forward=self.batcher.submit)
        if self.metrics:
            for r in results:
                if r.error is None:
                    self.metrics.observe_faces(len(r.faces))
        return results

    def warm_up(self) -> None:
        """One embedding through the whole path (detector included), so /readyz means ready; a
        bug raises, an input the settings refuse (a tiny pixel limit, say) does not."""
        grey = np.full((160, 160, 3), 128, np.uint8)
        crop = np.full((112, 112, 3), 128, np.uint8)
        self._work([grey, crop], EmbedOptions())
        release_free_heap()
