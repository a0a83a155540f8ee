"""The error a backend raises when it cannot run here."""


class BackendError(RuntimeError):
    """The requested backend cannot run here (e.g. ONNX Runtime missing or its output differs)."""
