"""Hostile-input benchmark: does the server stay fair and bounded while attacked?

    python bench/hostile.py [--arch ir_101] [--seconds 40] [--hostile 3] [--megapixels 80]

One gunicorn server (``gunicorn.conf.py``, synthetic weights of ``--arch``, an API key, and
``ADAFACE_MAX_PIXELS`` raised to admit the hostile images), then, in one run:

1. **alone**: one client sends aligned 112×112 crops to ``/v1/embed`` for ``--seconds``:
   p50/p99 latency;
2. **hostile**: the same client again while ``--hostile`` clients keep near-empty images of
   ``--megapixels`` (a black PNG, 100-odd kB; square, or ``--height`` pixels high) in flight: the crops' p50/p99, the
   hostile requests' own times, the server's peak RSS (all its processes, every 0.25 s), and
   its RSS after 5 s idle (what was handed back);
3. **keyless uploads**: ``--uploads`` connections send a chunked body of ``--upload-mib`` MiB
   without a key and hold the connection open without finishing it: RSS before, at the peak,
   while they are open, and after they close;
4. **made-up methods**: ``--methods`` requests with invented method names; the growth of
   ``/metrics`` in bytes;
5. **large JSON**: four concurrent 28 MB JSON bodies to ``/v1/galleries`` while ``/livez`` is
   probed: its worst latency.

The targets (issue 12): crops' p99 ≤ 3 s with 3 hostile clients, peak RSS ≤ 2.5 GB, keyless
uploads pin < 150 MB, 1,500 methods grow /metrics by < 20 KB. Everything stays on loopback.
"""
import argparse
import http.client
import io
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import SHARED, Server, percentile, rss_mb, server_pids  # noqa: E402

KEY = "bench-hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def crops() -> list:
    """Aligned 112×112 JPEGs: the shared ones, or generated."""
    files = sorted((SHARED / "facedata" / "aligned").glob("*.jpg"))
    if files:
        return [f.read_bytes() for f in files]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


def near_empty_png(megapixels: float, height: int = 0) -> bytes:
    """A black PNG of about ``megapixels``, square or ``height`` pixels high, with a few grey
    specks (it compresses to a few hundred kB)."""
    if height:
        width = int(megapixels * 1e6 / height)
    else:
        width = height = int((megapixels * 1e6) ** 0.5)
    pixels = np.zeros((height, width), np.uint8)
    rng = np.random.default_rng(1)
    pixels[rng.integers(0, height, 200), rng.integers(0, width, 200)] = 128
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def post(port: int, path: str, body: bytes, headers=None, timeout: float = 600) -> tuple:
    """(status, seconds) of one request on a fresh connection."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={**AUTH, **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - began
    finally:
        conn.close()


def get(port: int, path: str, method: str = "GET", timeout: float = 30) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=AUTH)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class RssSampler:
    """Samples the server's total RSS (MB) every 0.25 s in a thread, until stopped."""

    def __init__(self, server: Server):
        self.server, self.samples, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(rss_mb(server_pids(self.server.proc.pid)))
            self._stop.wait(0.25)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.samples, default=float("nan"))


def crop_client(port: int, seconds: float) -> list:
    """Latencies (s) of aligned-crop requests sent back to back for ``seconds``; a non-200 is fatal."""
    bodies, latencies = crops(), []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, took = post(port, "/v1/embed", bodies[len(latencies) % len(bodies)])
        if status != 200:
            raise SystemExit(f"aligned crop answered {status}")
        latencies.append(took)
    return latencies


def hostile_phase(server: Server, args) -> dict:
    image = near_empty_png(args.megapixels, args.height)
    stop, times, statuses = threading.Event(), [], []

    def attacker():
        while not stop.is_set():
            status, took = post(server.port, "/v1/embed", image)
            statuses.append(status)
            times.append(took)

    sampler = RssSampler(server)
    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(args.hostile)]
    for t in threads:
        t.start()
    time.sleep(2)  # the attack is under way before the measurement starts
    latencies = crop_client(server.port, args.seconds)
    stop.set()
    for t in threads:
        t.join()
    peak = sampler.stop()
    time.sleep(5)
    return {"latencies": latencies, "hostile_times": times, "hostile_statuses": sorted(set(statuses)),
            "image_kb": len(image) / 1024, "peak_rss_mb": peak, "idle_rss_mb": rss_mb(server_pids(server.proc.pid))}


def keyless_uploads(server: Server, count: int, mib: int) -> dict:
    """Chunked uploads without a key, held open unfinished: RSS before / peak / open / after."""
    before = rss_mb(server_pids(server.proc.pid))
    sampler = RssSampler(server)
    chunk = b"\0" * (1 << 20)
    socks, refused = [], 0
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n")
        socks.append(sock)
    for sock in socks:
        try:
            for _ in range(mib):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:  # the server answered and stopped reading: the rest was never taken
            refused += 1
    time.sleep(2)
    open_rss = rss_mb(server_pids(server.proc.pid))
    answers = []
    for sock in socks:
        sock.settimeout(5)
        try:
            answers.append(sock.recv(64).split(b" ")[1].decode())
        except (OSError, IndexError):
            answers.append("none")
        sock.close()
    time.sleep(3)
    peak = sampler.stop()
    return {"before": before, "peak": peak, "open": open_rss, "after": rss_mb(server_pids(server.proc.pid)),
            "answers": sorted(set(answers)), "cut_off": refused}


def made_up_methods(server: Server, count: int) -> tuple:
    def size():
        return len(get(server.port, "/metrics")[1])

    before = size()
    for i in range(count):
        get(server.port, "/livez", method=f"XQ{i:05d}")
    return before, size()


def large_json(server: Server) -> dict:
    body = json.dumps({"name": "bench-large-json", "padding": "x" * 28_000_000}).encode()
    probes, stop = [], threading.Event()

    def probe():
        while not stop.is_set():
            began = time.perf_counter()
            get(server.port, "/livez")
            probes.append(time.perf_counter() - began)
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    senders = [threading.Thread(target=post, args=(server.port, "/v1/galleries", body,
                                                   {"Content-Type": "application/json"})) for _ in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    stop.set()
    prober.join()
    return {"mb": len(body) / 1e6, "livez_p99_ms": percentile(probes, 99) * 1000,
            "livez_max_ms": max(probes) * 1000}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ir_101")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--hostile", type=int, default=3)
    parser.add_argument("--megapixels", type=float, default=80)
    parser.add_argument("--height", type=int, default=0,
                        help="hostile images this many pixels high (0: square); 89 makes the widest P-Net strips")
    parser.add_argument("--uploads", type=int, default=16)
    parser.add_argument("--upload-mib", type=int, default=20)
    parser.add_argument("--methods", type=int, default=1500)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    print(f"hostile bench: arch {args.arch}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    env = {"ADAFACE_API_KEYS": KEY, "ADAFACE_MAX_PIXELS": str(int(args.megapixels * 1e6 * 1.05) + 1)}
    server = Server(args.arch, 1, 0, args.backend, env=env)
    try:
        server.wait_ready()
        info = json.loads(get(server.port, "/info")[1])
        print(f"server: backend {info['backend']}, {info['threads']} threads; "
              f"RSS {rss_mb(server_pids(server.proc.pid)):.0f} MB ready", flush=True)
        crop_client(server.port, 3)  # warm
        alone = crop_client(server.port, args.seconds)
        print(f"aligned crops alone: {len(alone)} requests, p50 {statistics.median(alone):.3f} s, "
              f"p99 {percentile(alone, 99):.3f} s", flush=True)
        h = hostile_phase(server, args)
        lat, times = h["latencies"], h["hostile_times"]
        print(f"aligned crops with {args.hostile} clients of {args.megapixels:g}-Mpx images "
              f"({h['image_kb']:.0f} kB each): {len(lat)} requests, p50 {statistics.median(lat):.3f} s, "
              f"p99 {percentile(lat, 99):.3f} s; hostile requests: {len(times)} done, "
              f"median {statistics.median(times) if times else float('nan'):.1f} s, status {h['hostile_statuses']}; "
              f"peak RSS {h['peak_rss_mb']:.0f} MB, {h['idle_rss_mb']:.0f} MB after 5 s idle", flush=True)
        u = keyless_uploads(server, args.uploads, args.upload_mib)
        print(f"{args.uploads} keyless chunked uploads of {args.upload_mib} MiB, held open: RSS {u['before']:.0f} MB "
              f"before, peak {u['peak']:.0f} MB (+{u['peak'] - u['before']:.0f}), {u['open']:.0f} MB while open, "
              f"{u['after']:.0f} MB after; answers {u['answers']}", flush=True)
        before, after = made_up_methods(server, args.methods)
        print(f"{args.methods} made-up methods: /metrics {before} -> {after} bytes ({after - before:+d})", flush=True)
        j = large_json(server)
        print(f"4 concurrent {j['mb']:.1f} MB JSON bodies: /livez p99 {j['livez_p99_ms']:.0f} ms, "
              f"max {j['livez_max_ms']:.0f} ms; RSS {rss_mb(server_pids(server.proc.pid)):.0f} MB after", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
