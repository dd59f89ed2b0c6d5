"""Where the time of a decode step goes, and how far it is from the memory-bandwidth limit.

    python bench/profile_step.py                       # default model (SmolLM2 Q4_1), weight format auto
    python bench/profile_step.py --weight-format native --batch 1,32

For each batch size: wall time per decode step (engine steps of a greedy run, median), the
torch profiler's split of it (quantised and bf16 matmuls, the paged-attention kernel, every
other op) and the rest (Python: scheduler, model code, sampler glue). Then the bytes of
weights a step reads (every projection once, in the format it runs at that batch size,
plus the embedding rows), this machine's read bandwidth (sum over a 512 MiB buffer), and
the step time that bandwidth allows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from levante import LLM, SamplingParams
from levante.layers.linear import Linear

GROUPS = {
    "matmul int4": ("_weight_int4pack_mm",),
    "matmul int8": ("_weight_int8pack_mm",),
    "matmul native": ("aten::mm", "aten::addmm", "aten::linear", "mkldnn"),
    "attention kernel": ("paged_decode",),
}


def read_bandwidth(nbytes: int = 512 << 20) -> float:
    """Bytes per second of a streaming read (int64 sum over a buffer larger than the caches)."""
    buf = torch.ones(nbytes // 8, dtype=torch.int64)
    buf.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def step_weight_bytes(llm: LLM, rows: int) -> int:
    """Bytes of weights one decode step of `rows` sequences reads."""
    model = llm.engine.loaded.model
    total = 0
    for m in model.modules():
        if not isinstance(m, Linear):
            continue
        q = m.quantized
        if q is not None and rows <= m.quant_max_rows:
            total += q.nbytes()
        else:
            total += m.weight.numel() * m.weight.element_size()
    emb = model.embed_tokens.weight
    return total + rows * emb.shape[1] * emb.element_size()


def op_group(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other torch ops"


def decode_steps(llm: LLM, prompts: list[str], params: SamplingParams, tag: str) -> list[float]:
    """Seconds of each decode step of a greedy run of `prompts` (after their prefill)."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    engine.step()  # prefill
    times: list[float] = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def measure(llm: LLM, batch: int, new_tokens: int) -> None:
    prompts = [f"Write a short story about a lighthouse keeper number {i}." for i in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0)
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    wall = statistics.median(decode_steps(llm, prompts, params, f"t{batch}"))  # timed without the profiler
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = decode_steps(llm, prompts, params, f"p{batch}")
    steps = len(times)
    groups: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.key.startswith(("aten::", "mkldnn")) or evt.key == "paged_decode":
            group = op_group(evt.key)
            groups[group] = groups.get(group, 0.0) + evt.self_cpu_time_total / 1e6
    profiled = sum(times)
    print(f"\nbatch {batch}: {wall * 1e3:.1f} ms per decode step (median of {steps}, no profiler), {batch / wall:.0f} tok/s")
    print(f"  profiled run: {profiled / steps * 1e3:.1f} ms per step, of which")
    accounted = 0.0
    for group in (*GROUPS, "other torch ops"):
        seconds = groups.get(group, 0.0)
        accounted += seconds
        print(f"  {group:<18} {seconds / steps * 1e3:7.2f} ms/step  {seconds / profiled:6.1%}")
    rest = max(profiled - accounted, 0.0)
    print(f"  {'python and glue':<18} {rest / steps * 1e3:7.2f} ms/step  {rest / profiled:6.1%}")
    nbytes = step_weight_bytes(llm, batch)
    bw = read_bandwidth()
    floor = nbytes / bw
    print(f"  weights read per step: {nbytes / 2**20:.0f} MiB; read bandwidth {bw / 1e9:.1f} GB/s -> "
          f"bandwidth-bound step {floor * 1e3:.1f} ms ({batch / floor:.0f} tok/s); measured step is {wall / floor:.1f}x that")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--weight-format", default="auto")
    ap.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    llm = LLM(args.model, weight_format=args.weight_format, num_threads=args.threads)
    model = llm.engine.loaded.model
    for attn in model.attention_layers():  # a native kernel is not a torch op: label it for the profiler
        kernel = attn.decode_kernel
        if kernel is not None:
            def labelled(*a: Any, _kernel: Any = kernel) -> torch.Tensor:
                with record_function("paged_decode"):
                    return _kernel(*a)  # type: ignore[no-any-return]

            attn.decode_kernel = labelled
    kinds = {type(m.quantized).__name__ if m.quantized is not None else "native" for m in model.modules() if isinstance(m, Linear)}
    print(f"{args.model}: {llm.engine.loaded.quantization} checkpoint, weight format {args.weight_format} "
          f"({', '.join(sorted(kinds))}), dtype {llm.engine.loaded.dtype}, {torch.get_num_threads()} threads")
    for batch in (int(b) for b in args.batch.split(",")):
        measure(llm, batch, args.new_tokens)


if __name__ == "__main__":
    main()
