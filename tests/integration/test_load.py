"""Bounded load: many concurrent streaming requests against a server with a short queue.

Every request must either stream to `[DONE]` or be refused at once with 503/429 and Retry-After;
none may hang; afterwards nothing runs or waits and the KV cache is back to idle (no leaked blocks).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

REQUESTS = 200
CONCURRENCY = 32
MAX_TOKENS = 16
OVERALL_TIMEOUT = 300  # seconds for the whole run; a hung request fails the test instead of stalling it
TOPICS = ["the sea", "a mountain", "coffee", "a robot", "the moon", "rain", "a library", "trains"]


def gauges(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            values[key] = values.get(key, 0.0) + s.value
    return values


@dataclass
class Outcome:
    status: int
    tokens: int = 0
    finish: str | None = None
    retry_after: str | None = None
    error: str | None = None


async def one(client: httpx.AsyncClient, url: str, i: int) -> Outcome:
    body = {
        "model": "smollm2", "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": i, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}. ({i})"}],
    }
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raw = await r.aread()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"not an OpenAI error body: {raw[:200]!r}"
            return Outcome(r.status_code, retry_after=r.headers.get("retry-after"), error=message)
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return Outcome(200, error=f"stream ended without [DONE]: {events[-3:]}")
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return Outcome(200, error=f"error event in stream: {chunks}")
    usage = chunks[-1].get("usage")
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    if usage is None or len(finishes) != 1:
        return Outcome(200, error=f"no usage chunk or not exactly one finish_reason: {chunks[-2:]}")
    return Outcome(200, tokens=usage["completion_tokens"], finish=finishes[0])


async def run_load(url: str) -> list[Outcome]:
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=30), limits=limits) as client:

        async def limited(i: int) -> Outcome:
            async with gate:
                return await one(client, url, i)

        return await asyncio.wait_for(asyncio.gather(*(limited(i) for i in range(REQUESTS))), OVERALL_TIMEOUT)


def test_concurrent_streams_complete_or_are_refused_and_nothing_leaks(server_factory: Callable[..., Server]) -> None:
    server = server_factory(
        ["smollm2", "--kv-cache-memory", "256MiB", "--max-model-len", "1024", "--max-num-seqs", "16", "--max-waiting", "16"]
    )
    idle = gauges(server.url)
    assert idle["levante:num_requests_running"] == 0 and idle["levante:num_requests_waiting"] == 0

    start = time.monotonic()
    outcomes = asyncio.run(run_load(server.url))
    elapsed = time.monotonic() - start

    statuses = Counter(o.status for o in outcomes)
    done = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status in (429, 503)]
    tokens = sum(o.tokens for o in done)
    print(
        f"\n{REQUESTS} streaming requests at concurrency {CONCURRENCY} in {elapsed:.1f}s: statuses {dict(statuses)}; "
        f"{len(done) / elapsed:.2f} completed req/s, {tokens / elapsed:.1f} generated tok/s"
    )
    assert len(done) + len(refused) == REQUESTS, f"unexpected statuses {dict(statuses)}: {[o.error for o in outcomes if o.status not in (200, 429, 503)][:3]}"
    errors = [o.error for o in done if o.error]
    assert not errors, errors[:3]
    assert all(1 <= o.tokens <= MAX_TOKENS and o.finish in ("length", "stop") for o in done)
    assert len(done) >= CONCURRENCY, "too few requests were served"
    # 32 clients against 16 running + 16 queued: the queue overflows now and then, and must refuse cleanly
    assert refused, "no request was refused: the overload path was not exercised"
    for o in refused:
        assert o.retry_after is not None and int(o.retry_after) >= 1
        assert o.error and "capacity" in o.error

    # Nothing left behind: no running or waiting requests, the KV pool as idle as before the run.
    deadline = time.monotonic() + 15
    while True:
        after = gauges(server.url)
        settled = (after["levante:num_requests_running"], after["levante:num_requests_waiting"]) == (0, 0)
        if settled and after["levante:kv_cache_usage_perc"] == pytest.approx(idle["levante:kv_cache_usage_perc"], abs=1e-9):
            break
        assert time.monotonic() < deadline, f"not idle 15 s after the load: {after}"
        time.sleep(0.2)
    assert after["levante:generation_tokens_total"] - idle.get("levante:generation_tokens_total", 0) == tokens
    assert not any(k.startswith("levante:http_requests_total|") and "status=5" in k and "status=503" not in k for k in after)

    # and the server still answers normally
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
