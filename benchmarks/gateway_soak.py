"""Memory soak: the gateway's RSS over a sustained run (goal: < 5% growth over >= 100k requests).

    .venv/bin/python benchmarks/gateway_soak.py --requests 100000 --concurrency 32 --out soak.json

Runs the gateway as `alignloop serve` does (benchmarks/gateway_bench.py: control plane +
``--workers``, the shipped guardrail chains, an external-upstream release) in front of the
SYNTHETIC upstream (benchmarks/synthetic_upstream.py, no model, no delays), and sends
``--requests`` chat requests from an aiohttp client: half streamed, half not, 16-token answers,
prompts with and without PII (so redaction runs). Every ``--sample-every`` requests it records
the RSS of the gateway's whole process tree; the growth is measured from the sample after
``--warmup`` requests (allocator pools, caches and the log writer's first batches filled) to the
last. At the end: every response was a 200 and the log store holds one row per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gateway_bench import BENCH_KEY, cpu_flags, running_gateway  # noqa: E402


def tree_rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


async def drive(base: str, n: int, conc: int, every: int, pid: int, samples: list) -> dict:
    import aiohttp

    statuses: dict[int, int] = {}
    sent = 0
    t0 = time.monotonic()
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < n:
            i = sent
            sent += 1
            body = {
                "model": "alignloop", "stream": i % 2 == 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": (
                    f"request {i}: reach me at user{i % 997}@example.com" if i % 3 == 0
                    else f"request {i}: tell me about the weather")}],
            }
            async with session.post(base + "/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            if (i + 1) % every == 0:
                samples.append({"requests": i + 1, "rss_mb": tree_rss_mb(pid),
                                "elapsed_s": round(time.monotonic() - t0, 1)})
                print(json.dumps(samples[-1]), flush=True)

    conn = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        await asyncio.gather(*(worker(s) for _ in range(conc)))
    return {"statuses": statuses, "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--sample-every", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=10_000)
    p.add_argument("--workers", default="auto")
    p.add_argument("--out", default="gateway-soak.json")
    a = p.parse_args()
    import httpx

    from serving.engine.vllm_server import free_port

    work = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    port = free_port()
    import subprocess

    up = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "synthetic_upstream.py"),
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        samples: list[dict] = []
        with running_gateway("guardrails", f"http://127.0.0.1:{port}/v1", "synthetic", a.workers, work) as (base, db, proc):
            samples.append({"requests": 0, "rss_mb": tree_rss_mb(proc.pid), "elapsed_s": 0})
            res = asyncio.run(drive(base, a.requests, a.concurrency, a.sample_every, proc.pid, samples))
        con = sqlite3.connect(db)
        rows = con.execute("SELECT count(*) FROM requests").fetchone()[0]
        con.close()
    finally:
        up.terminate()
        up.wait(30)
    base_sample = next((s for s in samples if s["requests"] >= a.warmup), samples[0])
    last = samples[-1]
    growth = (last["rss_mb"] - base_sample["rss_mb"]) / base_sample["rss_mb"]
    result = {
        "command": " ".join(sys.argv), "cpu": cpu_flags(), "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(), "requests": a.requests, "concurrency": a.concurrency,
        "workers": a.workers, **res, "rows_logged": rows,
        "rss_after_warmup_mb": round(base_sample["rss_mb"], 1), "rss_last_mb": round(last["rss_mb"], 1),
        "rss_growth": round(growth, 4), "samples": samples,
    }
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{a.requests} requests in {res['seconds']} s ({a.requests / res['seconds']:.0f}/s), "
          f"statuses {res['statuses']}, rows logged {rows}; RSS {base_sample['rss_mb']:.1f} MB after "
          f"{base_sample['requests']} requests -> {last['rss_mb']:.1f} MB at {last['requests']}: "
          f"{100 * growth:+.2f}%")


if __name__ == "__main__":
    main()
