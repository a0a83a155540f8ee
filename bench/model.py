"""Raw IR backbone throughput per backend, precision and batch size (no HTTP, no detection).

    python bench/model.py [--arch ir_101] [--backends torch,onnx] [--batches 1,2,4,8] [--seconds 6] [--threads N]
    python bench/model.py --backends onnx --precision fp32,int8 [--calibration ../shared/facedata]

Synthetic weights (the cost does not depend on the values; ``--weights`` takes a checkpoint). For
each backend, precision and batch size it runs forwards for about ``--seconds`` after one warm-up
and prints faces/s (median of the per-forward rates), milliseconds per forward and GFLOP/s (FLOPs
counted by torch; IR-101: 24.2 per face). ``int8`` (onnx only) is calibrated and gated on the
images of ``--calibration`` (default: the shared test photos and crops) and prints the gate's
lowest cosine to fp32; its rate is printed as a ratio to the best fp32 rate of the same run.
``--json`` prints the results as JSON (bench/service.py uses it to measure the raw figure in
the same run).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402



def gflop_per_face(model) -> float:
    """Counted FLOPs of one 112×112 forward (convolutions and the linear layer), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, 112, 112))
    return counter.get_total_flops() / 1e9


def measure(forward, batch: int, seconds: float) -> dict:
    """Time repeated forwards of a random N×3×112×112 batch; median rate over the runs."""
    x = torch.rand(batch, 3, 112, 112) * 2 - 1
    forward(x)  # warm-up (allocations, ONNX Runtime's first-run planning)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        began = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - began)
    median = statistics.median(times)
    return {"batch": batch, "runs": len(times), "ms_per_forward": median * 1000, "faces_per_s": batch / median}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ir_101")
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--precision", default="fp32", help="fp32, int8 or both (fp32,int8); int8 on onnx only")
    parser.add_argument("--calibration", default=str(Path(__file__).resolve().parents[2] / "shared" / "facedata"),
                        help="folder of face images int8 is calibrated and gated on")
    parser.add_argument("--weights", default="synthetic")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile

    from AdaFaceFeature import AdaFaceFeature
    import net
    gflop = gflop_per_face(net.synthetic_backbone(args.arch))
    results = []
    with tempfile.TemporaryDirectory(prefix="adaface-bench-") as cache:  # the exported graphs: 250 MB
        for backend, precision in _variants(args.backends.split(","), args.precision.split(",")):
            extractor = AdaFaceFeature(args.weights, arch=args.arch, device="cpu", backend=backend, cache_dir=cache,
                                       precision=precision, calibration=args.calibration)
            served = extractor.model.precision
            gate = extractor.model.int8
            if gate is not None and not args.json:
                print(f"int8 gate: {gate.reason}; lowest cosine to fp32 {gate.min_cosine} over {gate.crops} crops",
                      flush=True)
            for batch in (int(b) for b in args.batches.split(",")):
                row = {"backend": backend, "precision": served, **measure(extractor.backend, batch, args.seconds)}
                if gate is not None:
                    row["int8_min_cosine"] = gate.min_cosine
                row["gflops"] = row["faces_per_s"] * gflop
                results.append(row)
                if not args.json:
                    print(f"{backend:6} {served:4} batch {batch:3}  {row['faces_per_s']:6.2f} faces/s  "
                          f"{row['ms_per_forward']:8.1f} ms/forward  {row['gflops']:6.1f} GFLOP/s  ({row['runs']} runs)",
                          flush=True)
            del extractor
    best = max((r for r in results if r["precision"] == "fp32"), key=lambda r: r["faces_per_s"], default=None)
    summary = {"arch": args.arch, "threads": args.threads, "gflop_per_face": gflop, "results": results, "best": best}
    int8 = [r for r in results if r["precision"] == "int8"]
    if int8:
        summary["best_int8"] = max(int8, key=lambda r: r["faces_per_s"])
        if best is not None:
            summary["int8_ratio"] = summary["best_int8"]["faces_per_s"] / best["faces_per_s"]
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.arch}: {gflop:.2f} GFLOP per face")
        if best is not None:
            print(f"best: {best['backend']} batch {best['batch']}: {best['faces_per_s']:.2f} faces/s "
                  f"({best['gflops']:.1f} GFLOP/s, {args.threads} threads)")
        if "best_int8" in summary:
            b8 = summary["best_int8"]
            ratio = f" = {summary['int8_ratio']:.2f}x the best fp32" if "int8_ratio" in summary else ""
            print(f"best int8: batch {b8['batch']}: {b8['faces_per_s']:.2f} faces/s{ratio}")
    return 0


def _variants(backends: list, precisions: list) -> list:
    """(backend, precision) pairs to measure: int8 only where it runs (onnx)."""
    return [(b, p) for b in backends for p in precisions if p == "fp32" or b == "onnx"]


if __name__ == "__main__":
    sys.exit(main())
