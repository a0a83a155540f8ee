"""The command line: ``python AdaFaceFeature.py COMMAND ...``.

Every subcommand lives in a module of this package and registers itself
(:func:`cli.registry.command`): ``embed`` (the default: ``python AdaFaceFeature.py IMG...``),
``compare`` and ``embed-dir`` (:mod:`cli.embed`), ``gallery ...`` (:mod:`cli.gallery`) and
``calibrate`` (:mod:`cli.calibrate`) and ``keys ...`` (:mod:`cli.keys`). The entry point
passes a :class:`Context` that reads the settings; nothing here reads the environment.
"""
from __future__ import annotations

import argparse
import logging
import sys
from types import SimpleNamespace
from typing import Sequence

import net
from adaface.backends import BackendError
from adaface.errors import InputError
from adaface.options import ALIGN_MODES, ARCH_NAMES, DEFAULT_ALIGN, DEFAULT_FACES, FACE_MODES
from gallery.errors import GalleryError, StoreUrlError

from . import calibrate, embed, gallery, keys, prepare  # noqa: F401  (each registers its commands)
from .registry import COMMANDS, Context, ModelLoadError, names

__all__ = ["Context", "ModelLoadError", "build_parser", "main"]

DEFAULT_COMMAND = "embed"


def _model_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", help="checkpoint file or folder, or 'synthetic' (default: ADAFACE_WEIGHTS)")
    common.add_argument("--arch", choices=ARCH_NAMES, help="the backbone (default: ADAFACE_ARCH, or from the weights)")
    common.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: ADAFACE_DEVICE or auto)")
    common.add_argument("--faces", default=DEFAULT_FACES, choices=FACE_MODES)
    common.add_argument("--align", default=DEFAULT_ALIGN, choices=ALIGN_MODES)
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="AdaFaceFeature.py",
                                     description="AdaFace face embeddings, galleries and calibration.")
    sub = parser.add_subparsers(dest="command")
    parents = SimpleNamespace(model=_model_options())
    for _, register in COMMANDS:
        register(sub, parents)
    return parser


def main(argv: Sequence[str], ctx: Context) -> int:
    """Parse ``argv`` and run the command; the exit status (2 for a usage or input error, or a
    model that cannot be loaded)."""
    argv = list(argv)
    if argv and argv[0] not in names() and not argv[0].startswith("-"):
        argv.insert(0, DEFAULT_COMMAND)  # `python AdaFaceFeature.py IMG...`, as the original's test run
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args, ctx)
    except (ModelLoadError, net.WeightsError, BackendError, GalleryError, StoreUrlError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
