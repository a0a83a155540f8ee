"""Identify's search step against large galleries: exact cosine top-k over random unit vectors.

    python bench/gallery.py [--sizes 100000,1000000] [--probes 50] [--top-k 5] [--threads N] [--json]

For each size it fills a :class:`gallery.index.SearchIndex` (what each worker or replica holds
in memory) with random float32 unit vectors, four faces per identity, then times
``SearchIndex.search`` for one probe at a time: the matrix-vector product over every stored face
and the top-k selection by identity. It prints the median and 90th percentile per probe, the
product and the selection timed apart, the memory the index holds and the process's resident
memory, and checks the results against a float64 brute force (exact: same faces, similarities
within float32 rounding). ``--float16`` also times float16 storage options (reported, not
used by the service) with their cosine error. ``--store`` also times the per-search store round trip on SQLite (the
version check and the candidates' names). Targets on the 2-core machine: 20 ms at 100,000 faces,
150 ms at 1,000,000.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 100_000
FACES_PER_IDENTITY = 4


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fill(index, size: int, seed: int = 0):
    """Add ``size`` random unit vectors in chunks; returns a few stored rows to use as probes."""
    import numpy as np
    rng = np.random.default_rng(seed)
    index.reserve(size)
    kept = None
    for start in range(0, size, CHUNK):
        count = min(CHUNK, size - start)
        x = rng.standard_normal((count, 512), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = np.arange(start, start + count, dtype=np.int64)
        index.add(ids + 1, ids // FACES_PER_IDENTITY, x)
        if kept is None:
            kept = x[:8].copy()
    return kept


def timed(fn, repeats: int) -> list:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return times


def check_exact(index, probes, top_k: int) -> float:
    """Largest |similarity - float64 similarity| over the results; raises if any face differs."""
    import numpy as np
    n = len(index)
    matrix = index._matrix[:n]
    worst = 0.0
    for probe in probes:
        p64 = probe.astype(np.float64)
        exact = np.concatenate([matrix[s:s + CHUNK].astype(np.float64) @ p64 for s in range(0, n, CHUNK)])
        hits = index.search(probe[None], top_k)[0]
        best_per_identity = {}
        for row in np.argsort(-exact)[: top_k * 50]:
            best_per_identity.setdefault(int(index._identity_ids[row]), row)
        expected = list(best_per_identity.values())[:top_k]
        got_scores = np.array([h.similarity for h in hits])
        want_scores = exact[expected]
        worst = max(worst, float(np.max(np.abs(got_scores - want_scores))))
        if [int(index._face_ids[r]) for r in expected] != [h.face_id for h in hits]:
            # ties within float32 rounding may swap; the scores must still agree
            if not np.allclose(np.sort(got_scores), np.sort(want_scores), atol=1e-6):
                raise AssertionError("search results differ from the float64 brute force")
    return worst


def bench_size(size: int, probes: int, top_k: int, float16: bool = False) -> dict:
    import numpy as np

    from gallery.index import SearchIndex, _top_rows
    before = rss_bytes()
    index = SearchIndex(gallery_id=1)
    began = time.perf_counter()
    stored = fill(index, size)
    fill_s = time.perf_counter() - began
    held = index.nbytes
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((probes, 512), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    queries[: len(stored) // 2] = stored[: len(stored) // 2]          # some probes are stored faces
    it = iter(range(10 ** 9))
    search = timed(lambda: index.search(queries[next(it) % probes][None], top_k), probes)
    matrix = index._matrix[:size]
    probe = queries[0]
    product = timed(lambda: matrix @ probe, min(probes, 20))
    scores = matrix @ probe
    select = timed(lambda: _top_rows(scores, index._identity_ids[:size], top_k), min(probes, 20))
    error = check_exact(index, queries[:4], top_k)
    options = bench_float16(matrix, probe, min(probes, 10)) if float16 else []
    result = {"faces": size, "identities": size // FACES_PER_IDENTITY, "probes": probes, "top_k": top_k,
              "median_ms": statistics.median(search), "p90_ms": sorted(search)[int(0.9 * (len(search) - 1))],
              "product_ms": statistics.median(product), "select_ms": statistics.median(select),
              "index_mib": held / 2 ** 20, "rss_growth_mib": (rss_bytes() - before) / 2 ** 20,
              "rss_mib": rss_bytes() / 2 ** 20, "fill_s": fill_s, "max_abs_error": error, "options": options}
    return result


def bench_float16(matrix, probe, repeats: int) -> list:
    """Options measured, not shipped: float16 storage (half the bytes to stream per probe).

    ``chunked``: float16 rows converted to float32 a block at a time, float32 products (exact
    for the float16-rounded vectors); ``half mv``: torch's float16 matrix-vector product. Each
    with its time (ms, median), memory (MiB) and largest |cosine error| against float32.
    """
    import torch

    from gallery.index import top_indices
    exact = torch.from_numpy(matrix @ probe)
    half = torch.from_numpy(matrix).half()
    p16 = torch.from_numpy(probe).half()
    block = torch.empty((4096, 512))                 # 8 MiB: stays in the L3 cache
    out = torch.empty(len(half))
    p32 = torch.from_numpy(probe)

    def chunked():
        # all in torch: alternating torch and OpenBLAS thread pools per block costs far more
        for start in range(0, len(half), len(block)):
            end = min(len(half), start + len(block))
            block[:end - start].copy_(half[start:end])
            torch.mv(block[:end - start], p32, out=out[start:end])
        return top_indices(out.numpy(), 32)

    def half_mv():
        return torch.topk(torch.mv(half, p16).float(), 32)

    found = []
    for name, fn, scores in (("float16 storage, float32 products in blocks", chunked, lambda: out),
                             ("float16 storage, float16 products (torch.mv)", half_mv,
                              lambda: torch.mv(half, p16).float())):
        times = timed(fn, repeats)
        error = float((scores() - exact).abs().max())
        found.append({"option": name, "median_ms": statistics.median(times), "memory_mib": half.nbytes / 2 ** 20,
                      "max_abs_error": error})
    return found


def bench_store(faces: int = 1000) -> dict:
    """Per-search store round trip on SQLite: version check before, names after (ms, median)."""
    import numpy as np

    from gallery import Galleries, NewFace
    with tempfile.TemporaryDirectory() as folder:
        galleries = Galleries.open(f"sqlite:///{folder}/bench.db")
        galleries.store.create_gallery("bench")
        rng = np.random.default_rng(2)
        x = rng.standard_normal((faces, 512), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        for start in range(0, faces, 100):
            galleries.store.enroll("bench", f"p{start}", [NewFace(v, 20.0, f"s{start + i}")
                                                          for i, v in enumerate(x[start:start + 100])])
        full = timed(lambda: galleries.identify("bench", x[:1], 5), 50)
        search = timed(lambda: galleries.indexes.loaded("bench").search(x[:1], 5), 50)
        galleries.close()
    return {"store": "sqlite", "faces": faces, "identify_ms": statistics.median(full),
            "search_only_ms": statistics.median(search),
            "round_trip_ms": statistics.median(full) - statistics.median(search)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="BLAS and torch threads (default: all cores)")
    parser.add_argument("--store", action="store_true", help="also time the SQLite round trip per search")
    parser.add_argument("--float16", action="store_true", help="also time float16 storage options")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # read when numpy loads OpenBLAS
    import numpy as np
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cores = len(os.sched_getaffinity(0))
    results = [bench_size(int(s), args.probes, args.top_k, args.float16) for s in args.sizes.split(",")]
    store = bench_store() if args.store else None
    if args.json:
        print(json.dumps({"cores": cores, "threads": args.threads or cores, "numpy": np.__version__,
                          "results": results, "store": store}, indent=1))
        return 0
    print(f"{cores} cores, {args.threads or cores} threads, top_k {args.top_k}, exact float32 search")
    print(f"{'faces':>10} {'median ms':>10} {'p90 ms':>8} {'product':>8} {'select':>7} "
          f"{'index MiB':>10} {'RSS MiB':>8} {'max err':>9}")
    for r in results:
        print(f"{r['faces']:>10,} {r['median_ms']:>10.1f} {r['p90_ms']:>8.1f} {r['product_ms']:>8.1f} "
              f"{r['select_ms']:>7.2f} {r['index_mib']:>10.0f} {r['rss_mib']:>8.0f} {r['max_abs_error']:>9.1e}")
    for r in results:
        for o in r["options"]:
            print(f"{r['faces']:>10,} {o['option']}: {o['median_ms']:.1f} ms, {o['memory_mib']:.0f} MiB, "
                  f"max |cosine error| {o['max_abs_error']:.1e}")
    if store:
        print(f"SQLite round trip per search (version check + names): {store['round_trip_ms']:.2f} ms "
              f"(identify {store['identify_ms']:.2f} ms at {store['faces']} faces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
