"""Are there weights to serve? What ``make run`` asks before it starts gunicorn.

    python tools/check_weights.py

Exit status 0 when ``ADAFACE_WEIGHTS`` is ``synthetic`` or names a file or folder that exists,
or when it is unset and the default weights are present or could be downloaded now
(``tools/fetch_weights.py``, which gives up within seconds without network access). Otherwise 1,
with the ways forward; 2 for a bad setting.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fetch_weights  # noqa: E402  (beside this file)
from adaface.options import SYNTHETIC  # noqa: E402
from config import DEFAULT_WEIGHTS, NO_WEIGHTS_HELP, Settings, SettingsError  # noqa: E402


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.weights == SYNTHETIC or settings.weights_path().exists():
        return 0
    if settings.weights == DEFAULT_WEIGHTS:
        print(f"no weights at {DEFAULT_WEIGHTS}: downloading them", file=sys.stderr)
        return fetch_weights.main([])
    print(f"no weights at {settings.weights_path()} (ADAFACE_WEIGHTS).\n{NO_WEIGHTS_HELP}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
