"""Identify's search on large synthetic galleries: latency, recall against exact search, memory, build.

    python bench/gallery.py [--sizes 1000000] [--store file|sqlite] [--nprobe 16,32,64] [--rank 64]
                            [--per-identity 4] [--probes 300] [--top-k 5] [--min-faces 200000]
                            [--max-lists 4096] [--folder DIR] [--json]

**The galleries** have identity structure. Each identity has a centre ``c = normalise(B z)``,
``z ~ N(0, I_rank)`` with ``B`` a fixed orthonormal 512 x ``rank`` basis: trained face models
fill a low-dimensional part of the sphere, and ``--rank 64`` gives different-identity face
cosines of mean 0 and standard deviation 0.08 (``--rank 512`` is isotropic, the worst case for an
approximate index, where nothing but the right identity is near a probe). Each face is
``normalise(c + s n / sqrt(512))`` with ``n ~ N(0, I_512)`` and ``s`` uniform in [0.65, 1.0],
so two faces of one identity have cosine 0.5 to 0.7. ``--per-identity`` faces per identity.
Probes are new faces (fresh noise) of enrolled identities, so each has a right answer.
Faces are made ``CHUNK`` (100,000; 200 MB of float32) at a time from seeds, never all at once:
ten million faces are 20 GB of float32, more than the machine's memory.

**Where the exact vectors come from** (the rescoring, and exact search):

- ``--store file`` (default): a float32 file of every face in a temporary folder, read back with
  ``pread`` by a small class with the store's ``vectors(face_ids)``. It stands in for the store
  (a real SQLite store of ten million faces is about 22 GB and takes hours to fill); the index is
  built straight from the chunks (``SearchIndex.load_chunks``), never holding a float16 copy.
- ``--store sqlite``: every face enrolled in a real SQLite store through ``GalleryStore.enroll``
  (about 1 ms per identity), then loaded as the service loads it (``Indexes.index``: the store's
  snapshot, the float16 matrix, the inverted file built in the background), and searched through
  ``Indexes.search`` (the version check, the search, the rescoring read) and ``Galleries.identify``
  (plus the candidates' names).

**Reported** per size: the index kind (and its inverted file's lists, at most ``--max-lists``;
a progress line goes to stderr every million faces), build or load time, the index's own bytes and the
process's resident memory (VmRSS; RssAnon is the process's own memory, RssFile the mapped files
and libraries; VmHWM the peak), the exact search's time for all probes at once; then per
``nprobe`` (``--nprobe``: lists scanned, inverted-file indexes) the median and 99th percentile per probe (one probe
per call) and recall@1: how often the identity ranked first is the exact float32 answer's first.
The exact answer comes from scoring every chunk against the probes as it is made; the index's
own ``exact=True`` search is checked against it.
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

CHUNK = 100_000
DIM = 512
ROW_BYTES = DIM * 4


def memory_mib() -> dict:
    """The process's memory from /proc/self/status, in MiB."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                found[key] = int(line.split()[1]) / 1024
    return found


class Synthetic:
    """A gallery of ``size`` faces, ``per_identity`` per identity, made reproducibly a chunk at a time.

    Face ``i`` (0-based) has face id ``i + 1`` and identity id ``i // per_identity + 1``.
    """

    def __init__(self, size: int, per_identity: int, rank: int, seed: int = 0):
        if CHUNK % per_identity:
            raise ValueError(f"--per-identity must divide {CHUNK}")
        self.size, self.per_identity, self.rank, self.seed = size, per_identity, rank, seed
        self.identities = -(-size // per_identity)
        rng = np.random.default_rng([seed, 0])
        self.basis = None if rank >= DIM else np.linalg.qr(rng.standard_normal((DIM, rank)))[0].astype(np.float32)

    def _centres(self, block: int) -> np.ndarray:
        """float32 (CHUNK / per_identity, 512): the unit centres of one chunk's identities."""
        z = np.random.default_rng([self.seed, 1, block]).standard_normal((CHUNK // self.per_identity, self.rank),
                                                                          dtype=np.float32)
        c = z @ self.basis.T if self.basis is not None else z
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    @staticmethod
    def _faces(centres: np.ndarray, rng) -> np.ndarray:
        s = rng.uniform(0.65, 1.0, (len(centres), 1)).astype(np.float32)
        faces = centres + s * rng.standard_normal(centres.shape, dtype=np.float32) / math.sqrt(DIM)
        return (faces / np.linalg.norm(faces, axis=1, keepdims=True)).astype(np.float32, copy=False)

    def chunks(self):
        """(face ids, identity ids, float32 (k, 512) unit rows) for every chunk, in order."""
        for block, start in enumerate(range(0, self.size, CHUNK)):
            count = min(CHUNK, self.size - start)
            index = np.arange(start, start + count)
            centres = self._centres(block)[(index - start) // self.per_identity]
            vectors = self._faces(centres, np.random.default_rng([self.seed, 2, block]))
            yield index + 1, index // self.per_identity + 1, vectors

    def probes(self, count: int) -> tuple:
        """(identity ids (count,), float32 (count, 512)): new faces of distinct enrolled identities."""
        rng = np.random.default_rng([self.seed, 3])
        identities = np.sort(rng.choice(self.identities, size=min(count, self.identities), replace=False))
        per_block = CHUNK // self.per_identity
        centres = np.concatenate([self._centres(block)[identities[identities // per_block == block] % per_block]
                                  for block in np.unique(identities // per_block)])
        return identities + 1, self._faces(centres, rng)


class FileVectors:
    """The store's ``vectors(face_ids)`` over a float32 file (face id ``i`` at row ``i - 1``), read
    with ``pread`` (the page cache, not the process, holds what was read)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    def vectors(self, face_ids) -> tuple:
        ids = np.unique(np.asarray(face_ids, np.int64))
        if len(ids) == 0:
            return ids, np.zeros((0, DIM), np.float32)
        breaks = (np.flatnonzero(np.diff(ids) != 1) + 1).tolist()      # one pread per run of consecutive ids
        firsts = ids[[0] + breaks].tolist()
        data = b"".join(os.pread(self._fd, (end - start) * ROW_BYTES, (first - 1) * ROW_BYTES)
                        for start, end, first in zip([0] + breaks, breaks + [len(ids)], firsts))
        return ids, np.frombuffer(data, "<f4").reshape(len(ids), DIM).copy()

    def close(self) -> None:
        os.close(self._fd)


class Truth:
    """The exact float32 first identity for each probe, kept up to date chunk by chunk."""

    def __init__(self, probes: np.ndarray):
        self.probes = probes
        self.score = np.full(len(probes), -np.inf, np.float32)
        self.identity = np.zeros(len(probes), np.int64)

    def see(self, identity_ids: np.ndarray, vectors: np.ndarray) -> None:
        scores = vectors @ self.probes.T                           # (k, m)
        rows = scores.argmax(axis=0)
        best = scores[rows, np.arange(len(self.probes))]
        better = best > self.score
        self.score[better] = best[better]
        self.identity[better] = identity_ids[rows[better]]


def watched(chunks, truth: Truth, sink, spent: list, every: int = 1_000_000):
    """Pass the chunks on, scoring each for the truth and handing it to ``sink`` first; the time
    that takes (and the making of the chunk) is added to ``spent[0]``. Every ``every`` faces a
    progress line goes to stderr (a ten-million-face build takes hours)."""
    it, seen, began_all = iter(chunks), 0, time.perf_counter()
    while True:
        if seen and seen % every == 0:
            print(f"  {seen:,} faces in {time.perf_counter() - began_all:,.0f} s", file=sys.stderr, flush=True)
        began = time.perf_counter()
        try:
            chunk = next(it)
        except StopIteration:
            return
        truth.see(chunk[1], chunk[2])
        sink(chunk)
        spent[0] += time.perf_counter() - began
        seen += len(chunk[0])
        yield chunk


def per_probe_ms(fn, probes: np.ndarray) -> tuple:
    """(times in ms, results): ``fn`` called once per probe, after an untimed pass over them all.

    The first sweep after a build can read slower than the same sweep repeated (the new index's
    pages, caches); one untimed pass costs a second."""
    for j in range(len(probes)):
        fn(probes[j:j + 1])
    times, results = [], []
    for j in range(len(probes)):
        began = time.perf_counter()
        results.append(fn(probes[j:j + 1])[0])
        times.append((time.perf_counter() - began) * 1000)
    return times, results


def recall_at_1(results: list, truth: Truth, identity_of=lambda h: h.identity_id) -> float:
    return float(np.mean([bool(r) and identity_of(r[0]) == t for r, t in zip(results, truth.identity)]))


def timing_row(nprobe, times: list, results: list, truth: Truth, identity_of=lambda h: h.identity_id) -> dict:
    ordered = sorted(times)
    return {"nprobe": nprobe, "p50_ms": statistics.median(times), "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "recall_at_1": recall_at_1(results, truth, identity_of)}


def sweep(index, search, nprobes: list, probes: np.ndarray, truth: Truth, identity_of=lambda h: h.identity_id) -> list:
    """Per-probe timing and recall at each nprobe (once for a float16 index)."""
    rows = []
    for nprobe in (nprobes if index.kind == "ivf" else [None]):
        if nprobe is not None:
            index.params = index.ann.params = replace(index.params, nprobe=nprobe)
        times, results = per_probe_ms(search, probes)
        rows.append(timing_row(nprobe, times, results, truth, identity_of))
    return rows


def exact_check(index, probes: np.ndarray, truth: Truth, top_k: int) -> dict:
    """The index's exact search for all probes at once: its time and its agreement with the truth."""
    began = time.perf_counter()
    found = index.search(probes, top_k, exact=True)
    seconds = time.perf_counter() - began
    return {"exact_s": seconds, "exact_agrees": recall_at_1(found, truth)}


def bench_file(gen: Synthetic, params, args, folder: Path) -> dict:
    from gallery.index import SearchIndex
    ids, probes = gen.probes(args.probes)
    truth = Truth(probes)
    path = folder / f"vectors-{gen.size}.f32"
    before = memory_mib()
    spent = [0.0]
    with open(path, "wb") as out:
        source = FileVectors(path)
        index = SearchIndex(1, source=source, params=params)
        began = time.perf_counter()
        index.load_chunks(1, watched(gen.chunks(), truth, lambda c: out.write(c[2].tobytes()), spent), gen.size)
        total = time.perf_counter() - began
    result = {"faces": gen.size, "store": "float32 file (stand-in for the store)", "kind": index.kind,
              "lists": index.ann.lists if index.ann is not None else 0,
              "build_s": total - spent[0], "generate_s": spent[0], "index_mib": index.nbytes / 2 ** 20,
              "memory_before_mib": before, "memory_mib": memory_mib()}
    result["searches"] = sweep(index, lambda p: index.search(p, args.top_k), args.nprobes, probes, truth)
    result.update(exact_check(index, probes, truth, args.top_k))
    result["memory_after_mib"] = memory_mib()
    source.close()
    path.unlink()
    return result


def fill_sqlite(store, gen: Synthetic, truth: Truth) -> float:
    """Enroll every face (one enroll per identity); seconds taken."""
    from gallery.store import NewFace
    store.create_gallery("bench")
    began = time.perf_counter()
    for face_ids, identity_ids, vectors in gen.chunks():
        truth.see(identity_ids, vectors)
        for start in range(0, len(face_ids), gen.per_identity):
            identity = int(identity_ids[start])
            faces = [NewFace(vectors[i], 20.0, f"{face_ids[i]:x}") for i in range(start, start + gen.per_identity)]
            enrolled = store.enroll("bench", f"p{identity}", faces)
            if enrolled.identity.id != identity or enrolled.faces[0][0].id != face_ids[start]:
                raise RuntimeError("the store's ids do not follow the enrolment order; use a fresh folder")
    return time.perf_counter() - began


def bench_sqlite(gen: Synthetic, params, args, folder: Path) -> dict:
    from gallery.galleries import Galleries
    from gallery.open import open_store
    ids, probes = gen.probes(args.probes)
    truth = Truth(probes)
    store = open_store(f"sqlite:///{folder}/bench-{gen.size}.db")
    fill_s = fill_sqlite(store, gen, truth)
    galleries = Galleries(store, params)
    before = memory_mib()
    began = time.perf_counter()
    index = galleries.indexes.index("bench")
    loaded = time.perf_counter() - began
    index.wait_built()
    built = time.perf_counter() - began
    result = {"faces": gen.size, "store": "sqlite", "kind": index.kind, "fill_s": fill_s, "load_s": loaded,
              "lists": index.ann.lists if index.ann is not None else 0,
              "build_s": built, "index_mib": index.nbytes / 2 ** 20, "memory_before_mib": before,
              "memory_mib": memory_mib()}
    result["searches"] = sweep(index, lambda p: galleries.indexes.search("bench", p, args.top_k), args.nprobes, probes, truth)
    names = {f"p{i}": i for i in truth.identity}
    times, found = per_probe_ms(lambda p: galleries.identify("bench", p, args.top_k), probes)
    result["identify"] = timing_row(index.params.nprobe, times, found, truth,
                                    lambda c: names.get(c.identity, -1))
    result.update(exact_check(index, probes, truth, args.top_k))
    result["memory_after_mib"] = memory_mib()
    galleries.close()
    return result


def print_result(r: dict) -> None:
    m = r["memory_mib"]
    lists = f" of {r['lists']:,} lists" if r.get("lists", 0) else ""
    print(f"\n{r['faces']:,} faces, {r['kind']} index{lists}, vectors from: {r['store']}")
    if "fill_s" in r:
        print(f"  filled the store in {r['fill_s']:.0f} s; loaded in {r['load_s']:.1f} s, inverted file built after "
              f"{r['build_s']:.0f} s")
    else:
        print(f"  built in {r['build_s']:.0f} s ({r['faces'] / max(r['build_s'], 1e-9):,.0f} faces/s; making the "
              f"faces took another {r['generate_s']:.0f} s)")
    print(f"  index {r['index_mib']:,.0f} MiB; process RSS {m['VmRSS']:,.0f} MiB (own {m['RssAnon']:,.0f}, "
          f"files {m['RssFile']:,.0f}), peak {m['VmHWM']:,.0f} MiB; after searching RSS "
          f"{r['memory_after_mib']['VmRSS']:,.0f} MiB")
    print(f"  exact search, all probes at once: {r['exact_s']:.1f} s; agrees with the truth: {r['exact_agrees']:.3f}")
    for s in r["searches"] + ([dict(r["identify"], nprobe=f"{r['identify']['nprobe']} (identify)")]
                              if "identify" in r else []):
        label = "float16 scan" if s["nprobe"] is None else f"nprobe {s['nprobe']}"
        print(f"  {label:>18}: p50 {s['p50_ms']:6.2f} ms  p99 {s['p99_ms']:6.2f} ms  recall@1 {s['recall_at_1']:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000")
    parser.add_argument("--store", choices=("file", "sqlite"), default="file")
    parser.add_argument("--nprobe", default="16,32,64", help="lists scanned per probe, values to time (inverted files)")
    parser.add_argument("--rank", type=int, default=64, help="dimension the identity centres span (512: isotropic)")
    parser.add_argument("--per-identity", type=int, default=4)
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--min-faces", type=int, default=None, help="ann_min_faces (default: the code's)")
    parser.add_argument("--max-lists", type=int, default=None, help="the most lists an inverted file has")
    parser.add_argument("--folder", default=None, help="where the vectors file or database goes (default: a temp folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.nprobes = [int(e) for e in args.nprobe.split(",")]
    from gallery.ann import SearchParams
    chosen = {"ann_min_faces": args.min_faces, "max_lists": args.max_lists}
    params = SearchParams(**{k: v for k, v in chosen.items() if v is not None})
    results = []
    with tempfile.TemporaryDirectory(dir=args.folder, prefix="adaface-bench-") as folder:
        for size in (int(s) for s in args.sizes.split(",")):
            gen = Synthetic(size, args.per_identity, args.rank)
            run = bench_sqlite if args.store == "sqlite" else bench_file
            results.append(run(gen, params, args, Path(folder)))
            if args.json:       # each size as it is done, on stderr: a long run keeps what it measured
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            else:
                print_result(results[-1])
    settings = {"cores": len(os.sched_getaffinity(0)), "rank": args.rank, "per_identity": args.per_identity,
                "probes": args.probes, "top_k": args.top_k, "params": params.__dict__}
    if args.json:
        print(json.dumps({"settings": settings, "results": results}, indent=1))
    else:
        print(f"\n{settings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
