"""Download the AdaFace IR-101 WebFace12M weights from Hugging Face into ``pretrained/``.

    python tools/fetch_weights.py [--repo minchul/cvlface_adaface_ir101_webface12m] [--out FILE]

Writes the CVLFace release's ``model.safetensors`` to
``pretrained/adaface_ir101_webface12m.safetensors`` (the service uses it when
``pretrained/adaface_ir101_webface12m.ckpt`` is absent). The Hugging Face host (``HF_ENDPOINT``,
or the HTTPS proxy when one is set) is tried first, for at most a few seconds: without network
access this fails at once, instead of after the Hub client's retries, and says what else to do.
"""
import argparse
import os
import shutil
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
from config import DOWNLOADED_WEIGHTS, NO_WEIGHTS_HELP  # noqa: E402

HF_REPO = "minchul/cvlface_adaface_ir101_webface12m"
HF_ENDPOINT = "https://huggingface.co"   # the Hub client's default; HF_ENDPOINT overrides it
DEFAULT_OUT = REPO_DIR / DOWNLOADED_WEIGHTS
#: seconds to resolve and connect to the host before giving up
REACH_TIMEOUT = 3.0


def _address(url: str) -> tuple:
    """(host, port) a request for ``url`` connects to: the proxy's when one applies."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def unreachable(url: str, timeout: float = REACH_TIMEOUT):
    """Why the host of ``url`` cannot be reached within ``timeout`` seconds (name lookup and TCP
    connect), or None when it can. The lookup runs in a daemon thread, so a resolver that never
    answers costs ``timeout`` too."""
    host, port = _address(url)
    outcome = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot reach {host}:{port}: {exc}")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer from {host}:{port} in {timeout:.0f} s"


def fetch(repo: str, out: Path):
    """Download ``model.safetensors`` of ``repo`` to ``out``; None on success, else why not."""
    reason = unreachable(os.environ.get("HF_ENDPOINT") or HF_ENDPOINT)
    if reason:
        return reason
    try:
        from huggingface_hub import hf_hub_download
        cached = hf_hub_download(repo, "model.safetensors")
    except Exception as exc:  # no package, repo moved, connection lost: all end the same way
        return f"{type(exc).__name__}: {exc}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=HF_REPO)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} already exists")
        return 0
    reason = fetch(args.repo, args.out)
    if reason:
        print(f"could not download the weights from Hugging Face ({reason}).\n{NO_WEIGHTS_HELP}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
