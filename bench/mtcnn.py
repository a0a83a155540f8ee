"""MTCNN detection time per photo: the reference algorithm vs ours, full resolution and capped.

For every photo in a folder (default ``../shared/facedata/deepface`` next to the repository),
times three detectors on the same decoded RGB array, interleaved (one call of each in turn,
``--repeat`` rounds, the order rotated every round) so that a busy machine slows them alike:

- ``reference``: ``bench/reference_mtcnn.py``, the reference algorithm written out plainly (a PIL
  resize of the full image per pyramid level, crops cut one by one), on the same nets;
- ``ours``: ``face_alignment.MTCNN`` at full resolution;
- ``ours@N``: the same with ``DetectorParams(max_side=N)`` (default 1280).

Each photo's time is the median of its rounds, after one untimed warm-up call of each detector
(the first call on new image sizes builds oneDNN kernels, for either). Prints one row per photo,
then the medians over photos of the times and of the per-photo speed-ups, also over the photos
larger than the cap alone, and how far our landmarks are from the baseline's (full resolution:
should be ~0.0001 px with the same face count; capped: informative only).

Run from the repository root:
    .venv/bin/python bench/mtcnn.py [--data DIR] [--repeat 3] [--limit N] [--threads 2] [--max-side 1280]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from face_alignment import MTCNN, DetectorParams  # noqa: E402
from reference_mtcnn import ReferenceMTCNN  # noqa: E402

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "facedata" / "deepface",
                        help="folder of photos (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per photo (default: 3)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many photos (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--max-side", type=int, default=1280, help="cap for the capped run (default: 1280)")
    return parser.parse_args()


def photos(folder: Path, limit):
    """Photo paths in ``folder`` sorted by name, at most ``limit``."""
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not found:
        raise SystemExit(f"no photos in {folder}")
    return found[:limit] if limit else found


def timed(detect, rgb):
    start = time.perf_counter()
    result = detect(rgb)
    return time.perf_counter() - start, result


def landmark_gap(ref_marks: np.ndarray, ours) -> str:
    """Worst |Δ| in px between the baseline's landmarks (N×10: x1..x5, y1..y5) and ours."""
    if len(ref_marks) != len(ours):
        return f"faces {len(ours)} vs {len(ref_marks)}"
    if len(ours) == 0:
        return "0"
    ref = np.stack([ref_marks[:, 0:5], ref_marks[:, 5:10]], axis=2)
    return f"{np.abs(ref - ours.landmarks).max():.4f}"


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    reference = ReferenceMTCNN()
    ours = MTCNN()
    capped = DetectorParams(max_side=args.max_side)
    runners = {
        "reference": reference.detect,
        "ours": ours.detect,
        f"ours@{args.max_side}": lambda rgb: ours.detect(rgb, params=capped),
    }
    names = list(runners)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeat} rounds, data {args.data}")
    header = f"{'photo':<12} {'size':>11} {'faces':>5} " + " ".join(f"{n + ' ms':>14}" for n in names)
    print(header + f" {'speed-up':>9} {'@cap':>7}  {'Δlandmarks px':>14} {'@cap Δ':>14}")
    rows = []
    for path in photos(args.data, args.limit):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        outputs = {name: run(rgb) for name, run in runners.items()}  # warm-up, and the results
        times = {name: [] for name in names}
        for round_ in range(args.repeat):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                times[name].append(timed(runners[name], rgb)[0])
        median = {name: statistics.median(t) for name, t in times.items()}
        ref_marks = outputs["reference"][1]
        full, cap = outputs["ours"], outputs[names[2]]
        height, width = rgb.shape[:2]
        row = dict(median, photo=path.name, side=max(height, width),
                   speedup=median["reference"] / median["ours"], speedup_cap=median["reference"] / median[names[2]])
        rows.append(row)
        print(f"{path.name:<12} {f'{width}x{height}':>11} {len(full):>5} "
              + " ".join(f"{median[n] * 1000:>14.0f}" for n in names)
              + f" {row['speedup']:>8.2f}x {row['speedup_cap']:>6.2f}x  {landmark_gap(ref_marks, full):>14}"
              + f" {landmark_gap(ref_marks, cap):>14}", flush=True)
    summarise(rows, names, args.max_side)


def summarise(rows, names, max_side):
    def line(label, subset):
        if not subset:
            return
        times = "  ".join(f"{n} {statistics.median(r[n] for r in subset) * 1000:.0f} ms" for n in names)
        print(f"{label} ({len(subset)} photos): median time per photo: {times}; median speed-up: "
              f"ours {statistics.median(r['speedup'] for r in subset):.2f}x, "
              f"{names[2]} {statistics.median(r['speedup_cap'] for r in subset):.2f}x")
    print()
    line("all photos", rows)
    line(f"photos larger than {max_side} px", [r for r in rows if r["side"] > max_side])


if __name__ == "__main__":
    main()
