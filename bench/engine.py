"""Engine benchmark: Levante vs. HF transformers vs. llama.cpp on the same GGUF, side by side.

    python bench/engine.py                 # full run (~10 min on a quiet 2-core machine)
    python bench/engine.py --quick         # smoke run (< 2 min)
    python bench/engine.py --systems levante,llamacpp --json out.json --check

Each system runs in its own child process (this script re-invoked with `--system X`), so
peak RSS (`ru_maxrss`) and threads of one never pollute another; the parent collects the
children's JSON and prints the table. All runs are greedy with a fixed output length:
Levante `ignore_eos=True`; HF `min_new_tokens=max_new_tokens`; llama.cpp's
`Llama.generate` token loop, which never stops by itself (we stop after N tokens), so EOS
cannot end a request early whatever the prompt.

Metrics
- decode tok/s: one stream, `decode_new` tokens after a short prompt; time after the first token.
- prefill tok/s: prompt tokens / time to first token for a `prefill_len`-token prompt.
- cN tok/s: N requests submitted at once (mixed prompt lengths), all output tokens / wall time.
  Levante: AsyncLLMEngine (continuous batching). HF: one static batch of N, left-padded.
  llama.cpp: its Python API serves one request at a time, so the N requests run one after
  another (its concurrent rate is its single-stream rate, prefills included), and TTFT
  includes the queueing behind earlier requests.
- TTFT / ITL p50/p99 at the largest N. HF: one TTFT for the whole batch; ITL = step times.
- KV waste (Levante): `engine.stats().kv_waste` sampled every 50 ms during the largest-N run
  while no request waits (steady state); prefix-cache hit rate over that run.
- peak RSS of each child process.
Absolute numbers on a shared machine mean little; the ratios within one run are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    FULL,
    MODEL_FILE,
    QUICK,
    CpuMeter,
    PromptBook,
    Sizes,
    decode_rate,
    latency_stats,
    model_path,
    peak_rss_mb,
    perplexity_from_logprobs,
    perplexity_text,
    sizes_dict,
)

SYSTEMS = ("levante", "hf", "llamacpp")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- Levante ---------------------------------------------------------------------------------


def run_levante(sizes: Sizes, threads: int, check: bool, weight_format: str | None) -> dict[str, Any]:
    import torch

    from levante import LLM, SamplingParams
    from levante.engine.async_engine import AsyncLLMEngine

    t0 = time.perf_counter()
    kwargs = {"weight_format": weight_format} if weight_format else {}
    llm = LLM(str(model_path()), num_threads=threads, **kwargs)  # defaults otherwise (dtype auto, KV budget)
    load_s = time.perf_counter() - t0
    engine = llm.engine
    book = PromptBook(lambda s: engine.tokenizer.encode(s, add_special_tokens=False))
    book.check_distinct(sizes)
    info: dict[str, Any] = {
        "dtype": str(engine.loaded.dtype).removeprefix("torch."),
        "weight_format": engine.config.weight_format,
        "torch_threads": torch.get_num_threads(),
        "kv_blocks": engine.block_manager.num_blocks,
        "kv_cache_mb": engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size() / 2**20,
        "rss_after_load_mb": peak_rss_mb(),
        "prompt_digest": book.digest(),
    }

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def stream(ids: list[int], n: int) -> tuple[list[float], list[int]]:
        """Per-token timestamps (relative to submission) and token ids of one request run alone."""
        rid = f"bench-{time.monotonic_ns()}"
        start = time.perf_counter()
        engine.add_request(rid, {"prompt_token_ids": ids}, greedy(n))
        times: list[float] = []
        tokens: list[int] = []
        for out in llm.stream_steps({rid}):
            for delta in out.outputs:
                now = time.perf_counter() - start
                times.extend(now for _ in delta.token_ids)
                tokens.extend(delta.token_ids)
        return times, tokens

    if check:
        info["check"] = levante_check(llm, book, greedy(sizes.check_new))
        log(f"levante check: {info['check']}")
    log("levante: warm-up")
    stream(book.warmup_prompts(1, 16)[0], 4)
    llm.generate([{"prompt_token_ids": p} for p in book.warmup_prompts(4, 24)], greedy(4))

    metrics = {"load_s": load_s}
    metrics.update(single_stream_metrics(sizes, book, stream, info))
    ids = engine.tokenizer.encode(perplexity_text(), add_special_tokens=False)
    logprobs = torch.log_softmax(llm.score({"prompt_token_ids": ids})[:-1], dim=-1)
    metrics["perplexity"] = perplexity_from_logprobs(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist())
    info["perplexity_tokens"] = len(ids)

    async_engine = AsyncLLMEngine(engine)
    try:
        asyncio.run(levante_concurrent(async_engine, [p[:20] for p in book.warmup_prompts(4, 20)], greedy(4)))
        for n in sizes.concurrency:
            log(f"levante: {n} concurrent")
            bm = engine.block_manager
            hits, queries, preempt = bm.hits, bm.queries, engine.scheduler.num_preemptions
            prompts = book.concurrent_prompts(sizes, n)
            res = asyncio.run(levante_concurrent(async_engine, prompts, greedy(sizes.conc_new)))
            metrics[f"c{n}_tok_s"] = res["tokens"] / res["wall"]
            metrics.update(latency_stats(res["ttfts"], res["times"], f"c{n}"))
            if n == max(sizes.concurrency):
                metrics["kv_waste_mean"] = _mean(res["waste"])
                metrics["kv_waste_max"] = max(res["waste"], default=math.nan)
                metrics["prefix_hit_rate"] = (bm.hits - hits) / max(1, bm.queries - queries)
                metrics["preemptions"] = engine.scheduler.num_preemptions - preempt
                info["kv_waste_samples"] = len(res["waste"])
    finally:
        async_engine.shutdown()
    return {"metrics": metrics, "info": info}


def levante_check(llm: Any, book: PromptBook, params: Any) -> str:
    """Greedy output of one prompt alone == the same prompt in a batch with 7 others (sanity, before timing)."""
    prompt = {"prompt_token_ids": book.check_ids}
    alone = llm.generate(prompt, params)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in book.warmup_prompts(7, 40)]
    batched = llm.generate([others[0], prompt, *others[1:]], params)[1].outputs[0].token_ids
    if alone == batched:
        return f"OK ({len(alone)} greedy tokens identical alone and in a batch of 8)"
    first = next((i for i, (a, b) in enumerate(zip(alone, batched, strict=False)) if a != b), None)
    return f"FAIL: alone and batched differ at token {first}: {alone} vs {batched}"


async def levante_concurrent(async_engine: Any, prompts: list[list[int]], params: Any) -> dict[str, Any]:
    start = time.perf_counter()
    done = asyncio.Event()
    waste: list[float] = []

    async def one(k: int, ids: list[int]) -> list[float]:
        times: list[float] = []
        async for out in async_engine.generate({"prompt_token_ids": ids}, params, f"c{len(prompts)}-{k}-{start}"):
            now = time.perf_counter() - start
            times.extend(now for d in out.outputs for _ in d.token_ids)
        return times

    async def sample_stats() -> None:
        while not done.is_set():
            s = async_engine.stats()
            if s.num_running and not s.num_waiting:
                waste.append(s.kv_waste)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample_stats())
    all_times = await asyncio.gather(*(one(k, p) for k, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    done.set()
    await sampler
    return {
        "tokens": sum(len(t) for t in all_times),
        "wall": wall,
        "ttfts": [t[0] for t in all_times],
        "times": all_times,
        "waste": waste,
    }


# ---- HF transformers -------------------------------------------------------------------------


def run_hf(sizes: Sizes, threads: int) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    path = model_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    book = PromptBook(lambda s: tok.encode(s, add_special_tokens=False))
    book.check_distinct(sizes)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    info: dict[str, Any] = {
        "dtype": "bfloat16",
        "torch_threads": torch.get_num_threads(),
        "rss_after_load_mb": peak_rss_mb(),
        "prompt_digest": book.digest(),
        "transformers": transformers.__version__,
    }

    class Stamp(LogitsProcessor):
        """Called once per generation step, right after the forward pass: a timestamp per new token."""

        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter() - self.start)
            return scores

    @torch.inference_mode()
    def generate(prompts: list[list[int]], n: int) -> tuple[list[float], list[list[int]]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        stamp = Stamp()
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=pad, logits_processor=LogitsProcessorList([stamp]),
        )
        return stamp.times, out[:, width:].tolist()

    def stream(ids: list[int], n: int) -> tuple[list[float], list[int]]:
        times, tokens = generate([ids], n)
        return times, tokens[0]

    log("hf: warm-up")
    generate(book.warmup_prompts(1, 16), 4)
    generate(book.warmup_prompts(4, 24), 4)
    metrics: dict[str, float] = {"load_s": load_s}
    metrics.update(single_stream_metrics(sizes, book, stream, info))
    ids = tok.encode(perplexity_text(), add_special_tokens=False)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    metrics["perplexity"] = perplexity_from_logprobs(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist())
    for n in sizes.concurrency:
        log(f"hf: static batch of {n}")
        start = time.perf_counter()
        times, tokens = generate(book.concurrent_prompts(sizes, n), sizes.conc_new)
        wall = time.perf_counter() - start
        metrics[f"c{n}_tok_s"] = sum(len(t) for t in tokens) / wall
        metrics.update(latency_stats([times[0]], [times], f"c{n}"))
    return {"metrics": metrics, "info": info}


# ---- llama.cpp -------------------------------------------------------------------------------


def run_llamacpp(sizes: Sizes, threads: int) -> dict[str, Any]:
    import llama_cpp
    import llama_cpp.llama_cpp as low

    # This wheel's AMX matmul kernel (an "extra buffer type") segfaults in llama_decode on this
    # Sapphire Rapids VM (gdb: ggml_backend_amx_mul_mat), although the kernel grants AMX to the
    # process. Load without extra buffer types (no AMX, no weight repacking) so it runs at all.
    default_params = low.llama_model_default_params

    def model_params() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = model_params
    t0 = time.perf_counter()
    n_ctx = max(sizes.prefill_len, sizes.conc_max_len) + max(sizes.decode_new, sizes.conc_new) + 64
    llm = llama_cpp.Llama(model_path=str(model_path()), n_threads=threads, n_ctx=n_ctx, verbose=False)
    load_s = time.perf_counter() - t0
    book = PromptBook(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False))
    book.check_distinct(sizes)
    info: dict[str, Any] = {
        "n_ctx": n_ctx,
        "n_threads": threads,
        "rss_after_load_mb": peak_rss_mb(),
        "prompt_digest": book.digest(),
        "llama_cpp": llama_cpp.__version__,
        "use_extra_bufts": False,
    }

    def stream(ids: list[int], n: int, start: float | None = None) -> tuple[list[float], list[int]]:
        llm.reset()  # no reuse of the previous request's KV (as the other systems, none shares a prefix)
        start = time.perf_counter() if start is None else start
        times: list[float] = []
        tokens: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter() - start)
            tokens.append(token)
            if len(tokens) == n:
                break
        return times, tokens

    log("llama.cpp: warm-up")
    stream(book.warmup_prompts(1, 16)[0], 4)
    metrics: dict[str, float] = {"load_s": load_s}
    metrics.update(single_stream_metrics(sizes, book, stream, info))
    for n in sizes.concurrency:
        log(f"llama.cpp: {n} requests, served one after another")
        start = time.perf_counter()
        runs = [stream(p, sizes.conc_new, start) for p in book.concurrent_prompts(sizes, n)]
        wall = time.perf_counter() - start
        metrics[f"c{n}_tok_s"] = sum(len(t) for _, t in runs) / wall
        metrics.update(latency_stats([t[0] for t, _ in runs], [t for t, _ in runs], f"c{n}"))
    metrics["perplexity"] = llamacpp_perplexity(llama_cpp, threads)
    return {"metrics": metrics, "info": info}


def llamacpp_perplexity(llama_cpp: Any, threads: int) -> float:
    """Logits at every position need `logits_all`, which would slow the timed runs: a second instance."""
    import numpy as np

    scorer = llama_cpp.Llama(model_path=str(model_path()), n_threads=threads, n_ctx=2048, logits_all=True, verbose=False)
    ids = scorer.tokenize(perplexity_text().encode(), add_bos=False, special=False)
    scorer.eval(ids)
    logits = np.asarray(scorer.scores[: len(ids) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return perplexity_from_logprobs(logprobs[np.arange(len(ids) - 1), ids[1:]].tolist())


# ---- shared measurement ----------------------------------------------------------------------

StreamFn = Callable[[list[int], int], tuple[list[float], list[int]]]


def single_stream_metrics(sizes: Sizes, book: PromptBook, stream: StreamFn, info: dict[str, Any]) -> dict[str, float]:
    """Best of `reps` (the machine is shared: the fastest run is the least disturbed one)."""
    rates = []
    for rep in range(sizes.decode_reps):
        times, tokens = stream(book.decode_prompt(sizes, rep), sizes.decode_new)
        rates.append(decode_rate(times))
        if rep == 0:
            info["decode_tokens"] = tokens
    ttfts = [stream(book.prefill_prompt(sizes, rep), 1)[0][0] for rep in range(sizes.prefill_reps)]
    info["decode_tok_s_runs"] = rates
    info["prefill_ttft_runs_s"] = ttfts
    return {
        "decode_tok_s": max(rates),
        "prefill_tok_s": sizes.prefill_len / min(ttfts),
        "prefill_ttft_ms": 1000 * min(ttfts),
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def child(system: str, quick: bool, threads: int, check: bool, out: Path) -> None:
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    meter = CpuMeter()
    if system.startswith("levante"):
        _, _, weight_format = system.partition("@")
        result = run_levante(sizes, threads, check, weight_format or None)
    elif system == "hf":
        result = run_hf(sizes, threads)
    else:
        result = run_llamacpp(sizes, threads)
    result["metrics"]["peak_rss_mb"] = peak_rss_mb()
    result["info"]["wall_s"] = time.perf_counter() - t0
    result["info"]["cpu"] = meter.stop()
    out.write_text(json.dumps({"system": system, **result}))


# ---- parent: run children, print the table ---------------------------------------------------

ROWS: list[tuple[str, str, str]] = [  # (key, label, format)
    ("decode_tok_s", "single-stream decode tok/s", ".1f"),
    ("prefill_tok_s", "prefill tok/s ({prefill_len}-token prompt)", ".0f"),
    ("prefill_ttft_ms", "prefill TTFT ms ({prefill_len}-token prompt)", ".0f"),
    ("c{a}_tok_s", "aggregate tok/s, {a} concurrent", ".1f"),
    ("c{b}_tok_s", "aggregate tok/s, {b} concurrent", ".1f"),
    ("c{b}_ttft_p50_ms", "TTFT p50 ms, {b} concurrent", ".0f"),
    ("c{b}_ttft_p99_ms", "TTFT p99 ms, {b} concurrent", ".0f"),
    ("c{b}_itl_p50_ms", "ITL p50 ms, {b} concurrent", ".1f"),
    ("c{b}_itl_p99_ms", "ITL p99 ms, {b} concurrent", ".1f"),
    ("kv_waste_mean", "KV waste mean (steady, {b} conc.)", ".3f"),
    ("kv_waste_max", "KV waste max (steady, {b} conc.)", ".3f"),
    ("prefix_hit_rate", "prefix-cache hit rate ({b} conc.)", ".3f"),
    ("preemptions", "preemptions ({b} conc.)", ".0f"),
    ("perplexity", "perplexity (bench/data/perplexity.txt)", ".3f"),
    ("load_s", "load time s", ".1f"),
    ("peak_rss_mb", "peak RSS MiB", ".0f"),
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def display(system: str) -> str:
    return {"llamacpp": "llama.cpp"}.get(system, system)


def table(results: dict[str, dict[str, Any]], sizes: Sizes) -> str:
    a, b = sizes.concurrency[0], sizes.concurrency[-1]
    systems = list(results)
    ours = [s for s in systems if s.startswith("levante")]
    peers = [s for s in systems if not s.startswith("levante")]
    pairs = [(o, p) for o in ours for p in peers]
    header = ["metric", *(display(s) for s in systems), *(f"{display(o)}/{display(p)}" for o, p in pairs)]
    lines = []
    for key, label, spec in ROWS:
        key = key.format(a=a, b=b)
        got = {s: results[s].get("metrics", {}).get(key) for s in systems}
        if all(v is None for v in got.values()):
            continue
        vals = [got[s] for s in systems]
        ratios = []
        for o, p in pairs:
            lev, peer = got[o], got[p]
            ok = isinstance(lev, (int, float)) and isinstance(peer, (int, float)) and peer and not math.isnan(peer)
            ratios.append(f"{lev / peer:.2f}x" if ok else "-")
        label = label.format(prefill_len=sizes.prefill_len, a=a, b=b)
        lines.append([label, *(fmt(v, spec) for v in vals), *ratios])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([render(header), sep, *(render(r) for r in lines)])


def agreement(results: dict[str, dict[str, Any]]) -> list[str]:
    """How many leading greedy tokens of the single-stream decode each peer shares with Levante."""
    first = next((s for s in results if s.startswith("levante")), "levante")
    ref = results.get(first, {}).get("info", {}).get("decode_tokens")
    lines = []
    for s in [s for s in results if s != first]:
        other = results.get(s, {}).get("info", {}).get("decode_tokens")
        if ref and other:
            same = next((i for i, (x, y) in enumerate(zip(ref, other, strict=False)) if x != y), min(len(ref), len(other)))
            lines.append(f"greedy decode tokens shared with {first} before first difference: {s} {same}/{len(ref)}")
    return lines


def report(results: dict[str, dict[str, Any]], sizes: Sizes, quick: bool) -> str:
    info = {s: r.get("info", {}) for s, r in results.items()}
    digests = {s: i.get("prompt_digest") for s, i in info.items()}
    lines = [
        f"levante engine benchmark ({'quick' if quick else 'full'}) — {dt.datetime.now().isoformat(timespec='seconds')}",
        f"platform: {platform.platform()} | CPU: {cpu_model()} | {os.cpu_count()} logical CPUs | python {platform.python_version()}",
        f"model: {MODEL_FILE} | sizes: {sizes_dict(sizes)}",
    ]
    for name in [s for s in info if s.startswith("levante")]:
        i = info[name]
        lines.append(
            f"{name}: dtype {i.get('dtype')}, weights {i.get('weight_format')}, {i.get('torch_threads')} torch threads, KV pool {i.get('kv_blocks')} blocks "
            f"= {i.get('kv_cache_mb', 0):.0f} MiB (default budget), RSS after load {i.get('rss_after_load_mb', 0):.0f} MiB, "
            f"{i.get('kv_waste_samples', 0)} KV-waste samples"
        )
        if "check" in i:
            lines.append(f"{name} --check: {i['check']}")
    if "hf" in info:
        i = info["hf"]
        lines.append(f"hf: transformers {i.get('transformers')}, bfloat16, {i.get('torch_threads')} torch threads, "
                     "static batches (left-padded, one generate per batch)")
    if "llamacpp" in info:
        i = info["llamacpp"]
        lines.append(f"llama.cpp: llama-cpp-python {i.get('llama_cpp')}, Q4_1 as stored, n_threads {i.get('n_threads')}, no extra buffer types "
                     f"(AMX kernel segfaults here), n_ctx {i.get('n_ctx')}; one request at a time: concurrent rows = requests served back to back "
                     "(rate = its single-stream rate incl. prefills; TTFT includes queueing)")
    lines.append(f"prompt token ids identical across systems: {len(set(digests.values())) == 1} {digests}")
    for s, i in info.items():
        runs = ", ".join(f"{x:.1f}" for x in i.get("decode_tok_s_runs", []))
        ttfts = ", ".join(f"{1000 * x:.0f}" for x in i.get("prefill_ttft_runs_s", []))
        cpu = i.get("cpu", {})
        lines.append(
            f"{s}: decode tok/s runs [{runs}] (best kept), prefill TTFT ms runs [{ttfts}], child wall {i.get('wall_s', 0):.0f} s, "
            f"CPU: own {cpu.get('own_cores', 0):.2f} cores, other processes {cpu.get('other_cores', 0):.2f} cores, "
            f"steal {cpu.get('steal_cores', 0):.2f} cores"
        )
    lines.extend(agreement(results))
    busy = [s for s, i in info.items() if i.get("cpu", {}).get("other_cores", 0) > 0.25]
    if busy:
        lines.append(
            f"WARNING: other processes used CPU during the runs of {', '.join(busy)}: with {os.cpu_count()} cores, "
            "a thread pool of that size stalls whenever a neighbour takes a core, so these figures mostly "
            "measure the neighbours (rerun on a quiet machine, or with --threads 1)"
        )
    lines.append("")
    lines.append(table(results, sizes))
    lines.append("ratios are levante / peer: above 1 is better for tok/s, below 1 is better for ms, MiB and s.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run under 2 minutes")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS),
        help="comma-separated subset of levante,hf,llamacpp; levante@FORMAT runs Levante with --weight-format FORMAT (auto, native, int8, int4)",
    )
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (Levante, HF) and llama.cpp n_threads")
    parser.add_argument("--check", action="store_true", help="verify Levante's greedy output alone == batched first")
    parser.add_argument("--system", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        child(args.system, args.quick, args.threads, args.check, args.out)
        return 0

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = {s for s in systems if s.partition("@")[0] not in SYSTEMS}
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    results: dict[str, dict[str, Any]] = {}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in systems:
            out = Path(tmp) / f"{system}.json"
            cmd = [sys.executable, __file__, "--system", system, "--out", str(out), "--threads", str(args.threads)]
            cmd += ["--quick"] * args.quick + ["--check"] * (args.check and system.startswith("levante"))
            log(f"running {system} in a child process")
            env = {**os.environ, "TQDM_DISABLE": "1"}  # transformers' GGUF conversion bars
            proc = subprocess.run(cmd, check=False, env=env)
            if proc.returncode != 0 or not out.exists():
                log(f"{system} failed (exit {proc.returncode})")
                failed.append(system)
                continue
            results[system] = json.loads(out.read_text())
    if args.json:  # raw results first: they survive a failure while formatting
        args.json.write_text(json.dumps({"sizes": sizes_dict(sizes), "results": results}, indent=1))
    text = report(results, sizes, args.quick)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes_dict(sizes), "results": results, "report": text}, indent=1))
    checks = [r.get("info", {}).get("check", "") for s, r in results.items() if s.startswith("levante")]
    return 1 if failed or any(c.startswith("FAIL") for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
