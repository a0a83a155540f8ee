"""Download the AdaFace IR-101 WebFace12M weights from Hugging Face into ``pretrained/``.

    python tools/fetch_weights.py [--repo minchul/cvlface_adaface_ir101_webface12m] [--out FILE]

Writes the CVLFace release's ``model.safetensors`` to
``pretrained/adaface_ir101_webface12m.safetensors`` (the service uses it when
``pretrained/adaface_ir101_webface12m.ckpt`` is absent). Without network access this fails with
a message saying where to get the weights by hand.
"""
import argparse
import shutil
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
HF_REPO = "minchul/cvlface_adaface_ir101_webface12m"
DEFAULT_OUT = REPO_DIR / "pretrained" / "adaface_ir101_webface12m.safetensors"
BY_HAND = (
    "Get the weights by hand: the AdaFace README (github.com/mk-minchul/AdaFace, 'Pretrained Models') "
    "links adaface_ir101_webface12m.ckpt on Google Drive; put it in pretrained/. Or download "
    f"model.safetensors from https://huggingface.co/{HF_REPO} to {DEFAULT_OUT.relative_to(REPO_DIR)}. "
    "Or set ADAFACE_WEIGHTS to your file; ADAFACE_WEIGHTS=synthetic runs on random weights for trying the API."
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=HF_REPO)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} already exists")
        return 0
    try:
        from huggingface_hub import hf_hub_download
        cached = hf_hub_download(args.repo, "model.safetensors")
    except Exception as exc:  # no network, no package, repo moved: all end the same way
        print(f"could not download the weights from Hugging Face ({type(exc).__name__}: {exc}).\n{BY_HAND}",
              file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
