"""The subcommands of ``python AdaFaceFeature.py``: each module registers its own here.

A command module decorates ``register(sub, parents)`` with :func:`command`; ``register`` adds
its parser(s) to ``sub`` (argparse subparsers), with ``parents.model`` (the model options) where
it embeds, and sets ``run=fn(args, ctx) -> exit status`` on each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

#: (name, register) in registration order
COMMANDS: list = []


@dataclass(frozen=True)
class Context:
    """What a command gets from the entry point, which alone reads the settings.

    ``settings(**overrides)`` returns the settings (``ADAFACE_*`` over the defaults, then the
    overrides); ``extractor(**overrides)`` loads a model from the settings with those overrides
    (``weights``, ``arch``, ``device``) and raises :class:`ModelLoadError` when it cannot.
    """

    settings: Callable
    extractor: Callable


class ModelLoadError(Exception):
    """``Context.extractor`` could not load a model (weights, device or backend); the message
    says why, in one line."""


def command(name: str):
    """Register the decorated ``register(sub, parents)`` as the parser of command ``name``."""
    def decorate(register):
        COMMANDS.append((name, register))
        return register
    return decorate


def names() -> set:
    return {name for name, _ in COMMANDS}
