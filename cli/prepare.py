"""``prepare``: load the model as the server will (the ONNX export and, with
``ADAFACE_PRECISION=int8``, the int8 calibration and gate), so the server starts from the cache.

gunicorn's master runs it before it starts workers when int8 is asked for
(``gunicorn.conf.py``): a worker that calibrated while it booted would be silent for longer than
gunicorn's timeout allows on a slow machine, and killed.
"""
from __future__ import annotations

import sys

from .embed import model_overrides
from .registry import command


def cmd_prepare(args, ctx) -> int:
    import orjson
    extractor = ctx.extractor(**model_overrides(args))
    info = extractor.info()
    summary = {k: info[k] for k in ("arch", "weights", "backend", "device", "precision", "int8")}
    sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    return 0


@command("prepare")
def register(sub, parents) -> None:
    p = sub.add_parser("prepare", parents=[parents.model],
                       help="export the ONNX graph and calibrate int8 once, before the server starts")
    p.set_defaults(run=cmd_prepare)
