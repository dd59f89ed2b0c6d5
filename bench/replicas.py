"""Throughput of `levante deploy` (Ray Serve) with 1 and 2 model replicas, on a local Ray cluster.

Each replica count is deployed in turn (same model, same per-replica resources: 1 CPU and
`--threads` torch threads, a 256 MiB KV pool), warmed up, then sent the same workload through
the Serve proxy: `--requests` streaming completions, `--concurrency` at a time, `--max-tokens`
new tokens each (`ignore_eos`), distinct prompts (no prefix-cache hits). Reported per replica
count: requests/s, generated tokens/s, TTFT and latency percentiles, requests per replica, and
how busy the machine was with other work meanwhile (it is shared).

On a 2-core machine two replicas cannot beat one (each replica's engine already batches on
the cores there are); the figures are for the record, and for machines with more cores.

    python bench/replicas.py                          # replicas 1,2; ~3-5 minutes
    python bench/replicas.py --replicas 1,2,4 --concurrency 16 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from common import TEXT, percentile  # bench/ is on sys.path when a script in it runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MachineMeter:
    """Cores used by this benchmark (this process and the Ray cluster it started) and by everything else."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        me = psutil.Process()
        own = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                own += t.user + t.system
            except psutil.Error:
                pass
        busy = psutil.cpu_times()
        return time.monotonic(), busy.user + busy.nice + busy.system + busy.irq + busy.softirq, own

    def stop(self) -> dict[str, float]:
        (w0, busy0, own0), (w1, busy1, own1) = self.start, self._sample()
        wall = max(w1 - w0, 1e-9)
        # Children that exited meanwhile take their CPU time with them: "other" is an upper bound.
        return {"own_cores": (own1 - own0) / wall, "other_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / wall,
                "load_avg_1m": os.getloadavg()[0]}


def prompt(i: int) -> str:
    start = (i * 211) % (len(TEXT) - 600)
    return TEXT[start : start + 500]


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict[str, Any]:
    body = {"model": "smollm2", "prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        replica = r.headers.get("x-levante-replica", "?")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and first is None and event["choices"][0].get("text"):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"replica": replica, "ttft": (first or end) - start, "latency": end - start, "tokens": tokens}


async def workload(url: str, requests: int, concurrency: int, max_tokens: int, offset: int) -> list[dict[str, Any]]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def limited(i: int) -> dict[str, Any]:
            async with limit:
                return await one(client, url, offset + i, max_tokens)

        return await asyncio.gather(*(limited(i) for i in range(requests)))


def run(replicas: int, args: argparse.Namespace, url: str) -> dict[str, Any]:
    from ray import serve

    from levante.scale.ray_serve import build_app

    t0 = time.perf_counter()
    app = build_app({"models": [args.model], "min_replicas": replicas, "max_replicas": replicas, "replica_cpus": 1.0,
                     "threads": args.threads, "kv_cache_memory": 256 << 20, "max_model_len": 2048})
    serve.run(app, name="bench", route_prefix="/")
    deploy_s = time.perf_counter() - t0
    asyncio.run(workload(url, 2 * replicas, 2 * replicas, 8, offset=10_000))  # warm-up: every replica, short
    meter = MachineMeter()
    t1 = time.perf_counter()
    results = asyncio.run(workload(url, args.requests, args.concurrency, args.max_tokens, offset=0))
    wall = time.perf_counter() - t1
    cpu = meter.stop()
    serve.delete("bench")
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    latencies = [r["latency"] for r in results]
    return {
        "replicas": replicas, "deploy_s": deploy_s, "wall_s": wall, "requests": len(results), "tokens": tokens,
        "req_s": len(results) / wall, "tok_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p90_ms": 1000 * percentile(ttfts, 90),
        "latency_p50_s": percentile(latencies, 50), "latency_p90_s": percentile(latencies, 90),
        "per_replica": dict(Counter(r["replica"] for r in results)), **cpu,
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = rows[0]
    lines = [
        f"levante deploy throughput: {args.requests} streaming completions, {args.concurrency} at a time, "
        f"{args.max_tokens} new tokens each; 1 CPU + {args.threads} thread(s) per replica; {os.cpu_count()} cores",
        f"{'replicas':>8} {'req/s':>7} {'tok/s':>7} {'vs 1':>5} {'TTFT p50':>9} {'TTFT p90':>9} {'lat p50':>8} {'lat p90':>8} "
        f"{'own cores':>9} {'other':>6} {'load1':>6}  requests per replica",
    ]
    for r in rows:
        lines.append(
            f"{r['replicas']:>8} {r['req_s']:>7.2f} {r['tok_s']:>7.1f} {r['tok_s'] / base['tok_s']:>5.2f} "
            f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p90_ms']:>7.0f}ms {r['latency_p50_s']:>7.1f}s {r['latency_p90_s']:>7.1f}s "
            f"{r['own_cores']:>9.2f} {r['other_cores']:>6.2f} {r['load_avg_1m']:>6.2f}  {sorted(r['per_replica'].values(), reverse=True)}"
        )
    lines.append("own cores: this benchmark and its Ray cluster; other: the rest of the machine meanwhile (shared).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare, in order")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    counts = [int(x) for x in args.replicas.split(",")]

    import ray
    from ray import serve

    from levante.scale.deploy import on_loopback

    on_loopback()  # Ray's ports on 127.0.0.1
    ray.init(num_cpus=max(max(counts), os.cpu_count() or 1), include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for n in counts:
            print(f"deploying {n} replica(s)...", file=sys.stderr, flush=True)
            rows.append(run(n, args, f"http://127.0.0.1:{port}"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(report(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
