"""The core library: decode, detect, align and embed faces, with no web framework, storage or settings.

Modules (import them directly; this package imports none of them, so ``import adaface.threads``
stays cheap and no import cycle can run through here):

- :mod:`adaface.options`: every vocabulary (``faces``, ``align``, backends), bound and default.
- :mod:`adaface.errors`: the errors a caller can cause, each with a stable ``code``.
- :mod:`adaface.decode`: bytes, base64, PIL images or arrays -> H×W×3 uint8 RGB.
- :mod:`adaface.threads`: native threads and locks that stay native under gevent.
- :mod:`adaface.device`: ``auto``/``cpu``/``cuda:N`` -> a torch device.
- :mod:`adaface.backends`: PyTorch eager or ONNX Runtime inference of the backbone.
- :mod:`adaface.model`: the backbone loaded from weights, its fingerprint, and its forward.
- :mod:`adaface.faces`: the data a pipeline hands around (crops, faces, per-image results).
- :mod:`adaface.pipeline`: :class:`adaface.pipeline.Extractor`, image -> faces -> embeddings,
  with the forward injected (a plain call, or the service's micro-batcher).

Detection and alignment live in the top-level :mod:`face_alignment` package and the IR
backbones in :mod:`net`; both belong to this layer too.
"""
