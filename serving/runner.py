"""Inference for the HTTP layer: admission control, native threads, micro-batched forwards.

``InferenceRunner.embed(inputs, options)`` decodes, detects and aligns each input in a native
thread and hands the crops to the extractor's one embed path
(:meth:`adaface.pipeline.Extractor.embed_prepared`) with the shared :class:`MicroBatcher` as
its forward; one :class:`adaface.faces.ImageFaces` per input comes back (faces, or the client
error that input caused).

Admission is by count and by cost. A request over ``max_queue`` images in flight is refused
(503 ``busy``), unless nothing else is in flight. Each input's cost is its detection work in
pixels (from the header, before any pixel is decoded: width × height, times
(20 / min_face_size)² when that is below 20). A request whose costliest image is over
``large_image`` megapixels runs in the large-image lane: its own native threads and detection
slots, where large images queue behind each other, holding at most ``pixel_budget`` megapixels
at once; small requests keep their own lane and never wait behind them. After each large image
the freed heap is handed back to the system.
"""
import logging
import os

import numpy as np
import torch

from adaface.decode import file_bytes, image_size, looks_like_image
from adaface.errors import code_of
from adaface.options import DEFAULT_MIN_FACE_SIZE, EmbedOptions
from adaface.threads import NativeSlots, Offloader, PixelBudget, allocate_lock

from .batcher import MicroBatcher
from .errors import ApiError
from .memory import release_free_heap

logger = logging.getLogger(__name__)


class InferenceRunner:
    """Owns the batcher and the native threads for one extractor in one worker process."""

    def __init__(self, extractor, settings, metrics=None):
        self.extractor = extractor
        self.settings = settings
        self.metrics = metrics
        self.max_batch = settings.max_batch or extractor.max_batch
        self.max_queue = settings.max_queue
        self.batcher = MicroBatcher(extractor.model.forward, self.max_batch, settings.max_wait_ms,
                                    observe=metrics.observe_batch if metrics else None)
        threads = max(2, min(8, (os.cpu_count() or 2) * 2))
        self.intake = Offloader(size=2)  # base64 decoding and header reads, off the event loop
        # decoding and detection use torch.get_num_threads() cores each: more at once would only
        # hold more photos and pyramids in memory
        per_image = max(1, torch.get_num_threads())
        slots = settings.max_detect or max(1, (os.cpu_count() or 1) // per_image)
        self.small = _Lane(Offloader(size=threads), NativeSlots(slots))
        self.large = _Lane(Offloader(size=max(2, slots + 1)), NativeSlots(slots))
        self.large_image = settings.large_image * 1e6
        self.budget = PixelBudget(settings.pixel_budget * 1e6)
        self._inflight = 0
        self._lock = allocate_lock()

    def _admit(self, count: int) -> None:
        with self._lock:
            if self._inflight and self._inflight + count > self.max_queue:
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
            files, costs = self.intake.call(self._intake, inputs, options)
            large = max(costs) > self.large_image
            lane = self.large if large else self.small
            return lane.threads.call(self._work, files, costs, options, lane, large)
        finally:
            self._release(len(inputs))

    def _intake(self, inputs: list, options: EmbedOptions) -> tuple:
        """Each input's image file (or the error its base64 gave) and detection cost in pixels."""
        files, costs = [], []
        for item in inputs:
            data, cost = item, 0.0
            if isinstance(item, (bytes, bytearray, memoryview, str)):
                try:
                    raw = file_bytes(item)
                except Exception as exc:
                    if code_of(exc) is None:
                        raise
                    raw = data = exc
                if isinstance(raw, bytes) and looks_like_image(raw):
                    data, cost = raw, self.cost(raw, options)
            files.append(data)
            costs.append(cost)
        return files, costs

    def cost(self, data: bytes, options: EmbedOptions) -> float:
        """Detection work of one image file in pixels: width × height from its header, times
        (20 / min_face_size)² below the default 20 px (the pyramid grows as its square); 0 when
        the header does not say or the image is over the pixel limit (decoding will say why,
        at once)."""
        size = image_size(data)
        limit = options.max_pixels or self.extractor.max_pixels
        if size is None or size[0] * size[1] > limit:
            return 0.0
        smallest = options.min_face_size or DEFAULT_MIN_FACE_SIZE
        return float(size[0] * size[1]) * max(1.0, (DEFAULT_MIN_FACE_SIZE / smallest) ** 2)

    def _work(self, files: list, costs: list, options: EmbedOptions, lane: "_Lane", large: bool) -> list:
        """Runs in a native thread: prepare every input, then one batched forward for all."""
        prepared = []
        for data, cost in zip(files, costs):
            if isinstance(data, Exception):
                prepared.append(data)
                continue
            prepared.append(self._prepare(data, cost, options, lane, large))
        results = self.extractor.embed_prepared(prepared, forward=self.batcher.submit)
        if self.metrics:
            for r in results:
                if r.error is None:
                    self.metrics.observe_faces(len(r.faces))
        return results

    def _prepare(self, data, cost: float, options: EmbedOptions, lane: "_Lane", large: bool):
        """Decode, detect and align one image in ``lane``; a large one within the pixel budget."""
        if not large:
            with lane.slots.held():
                return self.extractor.try_prepare(data, options)
        try:
            with self.budget.held(cost), lane.slots.held():
                return self.extractor.try_prepare(data, options)
        finally:
            release_free_heap()

    def warm_up(self) -> None:
        """One embedding through the whole path (detector included), so /readyz means ready; a
        bug raises, an input the settings refuse (a tiny pixel limit, say) does not."""
        grey = np.full((160, 160, 3), 128, np.uint8)
        crop = np.full((112, 112, 3), 128, np.uint8)
        self._work([grey, crop], [0.0, 0.0], EmbedOptions(), self.small, False)
        release_free_heap()


class _Lane:
    """Native threads that run requests, and the detection slots they take turns on."""

    def __init__(self, threads: Offloader, slots: NativeSlots):
        self.threads, self.slots = threads, slots
