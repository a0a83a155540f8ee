"""End-to-end service benchmark: the real gunicorn server under concurrent clients, on loopback.

    python bench/service.py [--clients 1,8] [--seconds 45] [--arch ir_101] [--soak 2000]
    python bench/service.py --precision int8 [--calibration ../shared/facedata]

Per run:
1. the raw model figure, measured first in the same run (``bench/model.py --json``): the best
   faces/s over backends and batch sizes, and the batch-1 forward time of the backend served;
2. the server (``gunicorn -c gunicorn.conf.py flask_http_server:app``, synthetic weights of
   ``--arch``) on a free 127.0.0.1 port, waited for on /readyz;
3. for each client count: a separate process drives ``/b64_represent_json`` with aligned 112×112
   JPEG bodies (base64, as the original clients send) for ``--seconds``, while a prober calls
   ``/livez`` every 100 ms; reports throughput, p50/p99 latency, errors, /livez p99, and the peak
   RSS of all server processes (sampled every 0.25 s);
4. with ``--soak N``: N more requests from 8 clients, RSS after the first 10% vs at the end.
With ``--precision int8`` the server runs the int8 graph (``ADAFACE_PRECISION``, calibrated on
``--calibration``), and the raw figures of both precisions are measured first: the ratios are to
the raw int8 figures, and the throughput is also given as a ratio to the raw fp32 best.
With ``--photos DIR`` the bodies are the photos in DIR instead (MTCNN detection in every
request; the ratios to the raw model then say little, the latencies, /livez and RSS still do).
Everything stays on loopback and stops by itself.
"""
import argparse
import base64
import http.client
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ADAFACE_TEST_DATA", REPO.parent / "shared"))


def bodies(photos=None) -> list:
    """Base64 bodies of the JPEGs in ``photos``, or else of aligned 112×112 JPEGs: the shared
    crops, or generated ones without them."""
    if photos:
        files = sorted(Path(photos).glob("*.jp*g"))
        if not files:
            raise SystemExit(f"no JPEG photos in {photos}")
        return [base64.b64encode(f.read_bytes()) for f in files]
    files = sorted((SHARED / "facedata" / "aligned").glob("*.jpg"))
    if files:
        return [base64.b64encode(f.read_bytes()) for f in files]
    from PIL import Image
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(base64.b64encode(buffer.getvalue()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- load generator (runs in its own process) ---------------------------------------------------

def _client(port, payloads, deadline, limit, counter, lock, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    i = 0
    while time.monotonic() < deadline:
        with lock:
            if limit and counter[0] >= limit:
                break
            counter[0] += 1
        body = payloads[i % len(payloads)]
        i += 1
        began = time.perf_counter()
        try:
            conn.request("POST", "/b64_represent_json", body=body, headers={"Content-Type": "text/plain"})
            response = conn.getresponse()
            response.read()
            out.append((time.perf_counter() - began, response.status))
        except (OSError, http.client.HTTPException):
            out.append((time.perf_counter() - began, 0))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)


def _prober(port, stop, out):
    while not stop.is_set():
        began = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/livez")
            conn.getresponse().read()
            conn.close()
            out.append(time.perf_counter() - began)
        except OSError:
            out.append(float("inf"))
        time.sleep(0.1)


def drive(port, clients, seconds, limit, result_queue, photos=None):
    """Process entry: ``clients`` threads post for ``seconds`` (or ``limit`` requests in all)."""
    payloads = bodies(photos)
    deadline = time.monotonic() + seconds
    samples, probes, counter, lock = [], [], [0], threading.Lock()
    stop = threading.Event()
    prober = threading.Thread(target=_prober, args=(port, stop, probes), daemon=True)
    prober.start()
    began = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(port, payloads, deadline, limit, counter, lock, samples))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    stop.set()
    prober.join(timeout=5)
    result_queue.put({"samples": samples, "probes": probes, "elapsed": elapsed})


# -- server ---------------------------------------------------------------------------------------

def server_pids(root: int) -> list:
    """The gunicorn master and its children (from /proc)."""
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == root:
                pids.append(int(entry.name))
    return pids


def rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Server:
    def __init__(self, arch, workers, threads, backend, env=None):
        """``env``: more variables for the server (``ADAFACE_PRECISION``...)."""
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="adaface-bench-")
        env = {**os.environ, "ADAFACE_WEIGHTS": "synthetic", "ADAFACE_ARCH": arch,
               "ADAFACE_BIND": f"127.0.0.1:{self.port}", "ADAFACE_WORKERS": str(workers),
               "ADAFACE_LOG_LEVEL": "warning", "ADAFACE_CACHE_DIR": os.path.join(REPO, "data", "cache"),
               "PROMETHEUS_MULTIPROC_DIR": self.tmp, "ADAFACE_BACKEND": backend, "ADAFACE_OPEN_GALLERIES": "true",
               **(env or {})}
        if threads:
            env["ADAFACE_THREADS"] = str(threads)
        gunicorn = Path(sys.executable).with_name("gunicorn")
        self.log = open(os.path.join(self.tmp, "server.log"), "w+")
        self.proc = subprocess.Popen([str(gunicorn), "-c", "gunicorn.conf.py", "flask_http_server:app"],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout=600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited:\n{self.log.read()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit("server not ready in time")

    def info(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/info")
        return json.loads(conn.getresponse().read())

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)  # the metrics files and the server's log


def run_load(server, clients, seconds, limit=0, photos=None):
    """Drive the server from a separate process; sample RSS meanwhile. Returns a summary dict."""
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=drive, args=(server.port, clients, seconds, limit, queue, photos))
    proc.start()
    peak, rss_series = 0.0, []
    result = None
    while result is None:
        pids = server_pids(server.proc.pid)
        current = rss_mb(pids)
        rss_series.append(current)
        peak = max(peak, current)
        try:
            result = queue.get(timeout=0.25)
        except Exception:
            pass
    proc.join()
    latencies = [t for t, status in result["samples"] if status == 200]
    errors = sum(1 for _, status in result["samples"] if status != 200)
    return {"clients": clients, "requests": len(result["samples"]), "ok": len(latencies), "errors": errors,
            "throughput": len(latencies) / result["elapsed"], "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "livez_p50_ms": percentile(result["probes"], 50) * 1000,
            "livez_p99_ms": percentile(result["probes"], 99) * 1000,
            "livez_max_ms": max(result["probes"], default=float("nan")) * 1000,
            "peak_rss_mb": peak, "rss_series": rss_series}


def raw_model(arch, threads, seconds, precision="fp32", calibration=None):
    cmd = [sys.executable, str(REPO / "bench" / "model.py"), "--json", "--arch", arch,
           "--batches", "1,4,8", "--seconds", str(seconds)]
    if precision == "int8":
        cmd += ["--backends", "onnx", "--precision", "fp32,int8", "--calibration", calibration]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ir_101")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="ADAFACE_THREADS (0: the server's default)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--soak", type=int, default=0, help="then N requests from 8 clients, RSS before/after")
    parser.add_argument("--raw-seconds", type=float, default=8)
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--photos", help="send the JPEG photos in this folder instead of aligned crops")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8"), help="ADAFACE_PRECISION")
    parser.add_argument("--calibration", default=str(SHARED / "facedata"), help="ADAFACE_CALIBRATION_DIR for int8")
    args = parser.parse_args(argv)

    print(f"machine: {os.cpu_count()} cores; arch {args.arch}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    raw = None
    if not args.skip_raw:
        raw = raw_model(args.arch, args.threads, args.raw_seconds, args.precision, args.calibration)
        for r in raw["results"]:
            print(f"raw {r['backend']:6} {r['precision']} batch {r['batch']}: {r['faces_per_s']:.2f} faces/s, "
                  f"{r['ms_per_forward']:.0f} ms/forward", flush=True)
        print(f"raw best: {raw['best']['faces_per_s']:.2f} faces/s ({raw['best']['backend']} batch {raw['best']['batch']})")
        if "best_int8" in raw:
            print(f"raw best int8: {raw['best_int8']['faces_per_s']:.2f} faces/s (batch {raw['best_int8']['batch']}, "
                  f"{raw['int8_ratio']:.2f}x the fp32 best)")
    env = {"ADAFACE_PRECISION": args.precision, "ADAFACE_CALIBRATION_DIR": args.calibration}
    server = Server(args.arch, args.workers, args.threads, args.backend, env)
    try:
        server.wait_ready()
        info = server.info()
        print(f"server: backend {info['backend']}, precision {info['precision']}, {info['threads']} threads, "
              f"workers {args.workers}, max_batch {info['batching']['max_batch']}", flush=True)
        for clients in (int(c) for c in args.clients.split(",")):
            s = run_load(server, clients, args.seconds, photos=args.photos)
            line = (f"{clients} clients: {s['throughput']:.2f} emb/s, p50 {s['p50']:.2f} s, p99 {s['p99']:.2f} s, "
                    f"errors {s['errors']}/{s['requests']}, /livez p99 {s['livez_p99_ms']:.0f} ms "
                    f"(max {s['livez_max_ms']:.0f}), peak RSS {s['peak_rss_mb']:.0f} MB")
            if raw:
                best = raw["best_int8" if info["precision"] == "int8" else "best"]["faces_per_s"]
                served = [r for r in raw["results"] if r["backend"] == info["backend"] and r["batch"] == 1
                          and r["precision"] == info["precision"]]
                line += f"; throughput / raw best = {s['throughput'] / best:.2f}"
                if info["precision"] == "int8":
                    line += f" (/ raw fp32 best = {s['throughput'] / raw['best']['faces_per_s']:.2f})"
                if served:
                    line += f"; p50 / raw batch-1 forward = {s['p50'] / (served[0]['ms_per_forward'] / 1000):.2f}"
            print(line, flush=True)
        if args.soak:
            s = run_load(server, 8, 10 ** 6, limit=args.soak, photos=args.photos)
            series = s["rss_series"]
            start = series[max(0, len(series) // 10)]
            print(f"soak {s['requests']} requests (8 clients): errors {s['errors']}, RSS {start:.0f} MB after 10% "
                  f"-> {series[-1]:.0f} MB at the end ({(series[-1] / start - 1) * 100:+.1f}%), "
                  f"peak {s['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
