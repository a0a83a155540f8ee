"""Which network made an embedding: what a gallery records, so that vectors of two networks are
never compared (no torch here: storage imports it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelIdentity:
    """The architecture, the fingerprint of the backbone's weights (``net.weights_fingerprint``,
    hex sha256 over the tensors, the same for the same weights in any file format) and whether
    they are the synthetic random ones. Embeddings of two identities are not comparable."""

    arch: str
    fingerprint: str
    synthetic: bool = False

    @property
    def name(self) -> str:
        """``adaface-ir_101/3f2a9c1b`` (the fingerprint's first 8 hex digits), `` (synthetic)``
        when so."""
        return f"adaface-{self.arch}/{self.fingerprint[:8]}" + (" (synthetic)" if self.synthetic else "")

    def to_dict(self) -> dict:
        return {"arch": self.arch, "fingerprint": self.fingerprint, "synthetic": self.synthetic, "name": self.name}
