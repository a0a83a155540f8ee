"""A gunicorn server's own temporary folder, removed when the server exits.

``gunicorn.conf.py`` puts gunicorn's control socket there (so two servers never share one) and,
unless it is given, the Prometheus multiprocess folder. The folder is made once per process:
gunicorn reads its config file again on ``HUP``, and the second read finds the same folder.
A re-executed master (``USR2``) is a new process with a folder of its own.

``gunicorn.conf.py``'s ``on_exit`` hook calls :func:`remove`; exits that skip the hook (gunicorn
stops before serving when it cannot listen on its address) remove it at interpreter exit, in
the process that made it only, never in a forked worker.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "adaface-gunicorn-"

_made: Path | None = None


def folder() -> Path:
    """This server's folder (mode 0700, under the system's temporary folder), made on the first call."""
    global _made
    if _made is None:
        _made = Path(tempfile.mkdtemp(prefix=PREFIX))
        atexit.register(_remove_in, os.getpid())
    return _made


def remove() -> None:
    """Remove the folder and all it holds, if :func:`folder` made one."""
    global _made
    if _made is not None:
        shutil.rmtree(_made, ignore_errors=True)
        _made = None


def _remove_in(pid: int) -> None:
    """:func:`remove`, in process ``pid`` only (the workers inherit this exit handler)."""
    if os.getpid() == pid:
        remove()
