"""Load test of ``mmdc serve`` on a loopback port: throughput, latency and server memory.

    python benchmarks/serve_load.py [--model builtin:teacher] [--requests 96]
                                    [--concurrency 1,4,16] [--max-tokens 32]

Starts the server as a subprocess (127.0.0.1, a free port, a bearer token), sends the same
CQM-LEA requests with images from the synthetic task at each concurrency level (plain
HTTP from a thread pool), and prints requests/s, p50/p99 latency, the server's resident
memory after each level and its peak, and whether it still answers at the end. Exits
non-zero if a request fails or the server dies.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TOKEN = "serve-load-benchmark-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) of a process in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def post(url: str, body: bytes) -> float:
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        reply = json.loads(resp.read())
    assert reply["choices"][0]["message"]["content"] is not None
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:teacher")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    from mmdc.data.prompts import build_prompt
    from mmdc.models.backends import chat_messages, image_data_url
    from mmdc.toy import world

    port = free_port()
    env = dict(os.environ, MMDC_LOAD_TOKEN=TOKEN)
    server = subprocess.Popen([sys.executable, "-m", "mmdc", "serve", args.model, "--name",
                               "m", "--port", str(port), "--token-env", "MMDC_LOAD_TOKEN"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("SERVE_LOG", os.devnull), "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                req = urllib.request.Request(base + "/v1/models",
                                             headers={"Authorization": f"Bearer {TOKEN}"})
                urllib.request.urlopen(req, timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    print("serve_load: the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.3)
        bodies = []
        for inst, img in world.generate_split("test", args.requests, 0):
            url = image_data_url(img) if img is not None else None
            bodies.append(json.dumps({"model": "m", "max_tokens": args.max_tokens,
                                      "temperature": 0,
                                      "messages": chat_messages(build_prompt(inst, "CQM-LEA"),
                                                                url)}).encode())
        rss0, _ = memory_mb(server.pid)
        rows = []
        for conc in [int(c) for c in args.concurrency.split(",")]:
            start = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                lat = list(pool.map(lambda b: post(base + "/v1/chat/completions", b), bodies))
            wall = time.perf_counter() - start
            lat.sort()
            rss, peak = memory_mb(server.pid)
            rows.append((conc, len(bodies) / wall, statistics.median(lat) * 1000,
                         lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, rss, peak))
        alive = server.poll() is None
        if alive:
            urllib.request.urlopen(urllib.request.Request(
                base + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}), timeout=5)
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"\nmmdc serve {args.model}: {args.requests} requests per level, max_tokens "
          f"{args.max_tokens}, greedy; server RSS before load {rss0:.0f} MB\n")
    print("| concurrency | requests/s | p50 ms | p99 ms | server RSS MB | server peak MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for conc, rps, p50, p99, rss, peak in rows:
        print(f"| {conc} | {rps:.1f} | {p50:.0f} | {p99:.0f} | {rss:.0f} | {peak:.0f} |")
    print(f"\nserver still answering after the load: {'yes' if alive else 'NO'}")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
