"""Where the time of a decode step goes, and how far it is from the memory-bandwidth limit.

    python bench/profile_step.py                       # default model (SmolLM2 Q4_1), weight format auto
    python bench/profile_step.py --weight-format native --batch 1,32

For each batch size: the wall time of an engine decode step (median over a greedy run), then
the step's parts, each re-run alone on the step's own tensors (weights, KV cache, block tables)
and timed: per layer the RMSNorms, the four projections, rotary + cache write, decode attention
and silu * up (times the number of layers), the LM head and the greedy pick. What the parts do
not cover is the engine around the model (scheduling, tensors of the step, detokenising,
outputs) plus the Python between ops (none when the fused decode step runs). Parts timed alone
run with warm caches, so they sum to a little less than the model's share of the step.

Then the bytes a step must read (every projection in the format it runs, the embedding rows,
the K/V of every sequence's context), this machine's read bandwidth (sum over a 512 MiB
buffer), and the step time that bandwidth allows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from levante import LLM, SamplingParams
from levante.engine.llm_engine import LLMEngine
from levante.layers.block_quant import BlockQuantWeight
from levante.layers.linear import Linear
from levante.models.llama import MLP, DecoderLayer


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


def linear_bytes(m: Linear, rows: int) -> int:
    q = m.quantized
    if isinstance(q, BlockQuantWeight) or (q is not None and rows <= m.quant_max_rows):
        return q.nbytes()
    return m.weight.numel() * m.weight.element_size()


def step_read_bytes(engine: LLMEngine, rows: int, context_tokens: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step of `rows` sequences holding `context_tokens` in all reads."""
    model = engine.loaded.model
    weights = sum(linear_bytes(m, rows) for m in model.modules() if isinstance(m, Linear))
    emb = model.embed_tokens.weight
    weights += rows * emb.shape[1] * emb.element_size()
    cfg = model.config
    kv = 2 * cfg.num_layers * context_tokens * cfg.num_kv_heads * cfg.head_dim * engine.kv_dtype.itemsize
    return weights, kv


def best_time(fn: Callable[[], object], reps: int = 30) -> float:
    """Seconds per call: the best of 5 rounds (a shared machine's noise only ever adds time)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def measure(llm: LLM, batch: int, prompt_len: int, new_tokens: int) -> None:
    engine = llm.engine
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0)
    for i in range(batch):  # distinct prompts: no prefix-cache sharing
        engine.add_request(f"p{batch}-{i}", {"prompt_token_ids": [(7 * i + j) % 5000 + 100 for j in range(prompt_len)]}, params)
    while any(s.num_uncomputed > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill
    runner, model = engine.runner, engine.loaded.model
    captured: dict[str, object] = {}
    run = runner.run

    def spy(scheduled):  # type: ignore[no-untyped-def]
        # the last timed step's tensors, kept to replay its parts (re-writing its K/V slots with the same values)
        captured["step"] = runner._prepare(scheduled.seqs, scheduled.num_new_tokens)
        captured["context"] = sum(s.num_computed_tokens + 1 for s in scheduled.seqs)
        return run(scheduled)

    steps = []
    for i in range(new_tokens // 2):
        if i == new_tokens // 2 - 1:
            runner.run = spy  # type: ignore[method-assign]
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    runner.run = run  # type: ignore[method-assign]
    wall = statistics.median(steps[:-1])
    ids, positions, meta = captured["step"]  # type: ignore[misc]
    context = int(captured["context"])  # type: ignore[call-overload]
    parts: dict[str, float] = {}
    with torch.inference_mode():
        x = model.embed_tokens(ids)
        layer = model.layers[0]
        assert isinstance(layer, DecoderLayer) and isinstance(layer.mlp, MLP)
        attn, mlp = layer.self_attn, layer.mlp
        layers = model.config.num_layers
        h = layer.input_layernorm(x)
        qkv = attn.qkv_proj(h)
        T = qkv.shape[0]
        q = qkv[:, : attn.q_size].reshape(T, attn.num_heads, attn.head_dim)
        k = qkv[:, attn.q_size : attn.q_size + attn.kv_size].reshape(T, attn.num_kv_heads, attn.head_dim)
        v = qkv[:, attn.q_size + attn.kv_size :].reshape(T, attn.num_kv_heads, attn.head_dim)
        o = attn.attn._decode(q, meta, runner.block_size).reshape(T, -1)
        gate_up = mlp.gate_up_proj(h)
        rope = model.rotary.step(positions, x.dtype, lookup=attn.kernels is None)

        def rope_and_store() -> None:
            if attn.kernels is not None:
                attn.kernels.rope_store(qkv.clone(), rope.table, positions, meta.slot_mapping, attn.attn.k_cache,
                                        attn.attn.v_cache, attn.num_heads, attn.num_kv_heads)
            else:
                rope.rotate(qkv[:, : attn.q_size + attn.kv_size].view(T, -1, attn.head_dim))
                blocks, offsets = meta.slot_mapping // runner.block_size, meta.slot_mapping % runner.block_size
                attn.attn.k_cache[blocks, :, :, offsets] = k.to(attn.attn.k_cache.dtype)  # as PagedAttention.forward
                attn.attn.v_cache[blocks, :, offsets] = v.to(attn.attn.v_cache.dtype)

        def silu() -> torch.Tensor:
            if mlp.kernels is not None:
                return mlp.kernels.silu_mul(gate_up)
            g, u = gate_up.chunk(2, dim=-1)
            return torch.nn.functional.silu(g) * u

        act = silu()
        parts["RMSNorm x2"] = 2 * layers * best_time(lambda: layer.input_layernorm(x))
        parts["qkv projection"] = layers * best_time(lambda: attn.qkv_proj(h))
        parts["rotary + cache write"] = layers * best_time(rope_and_store)
        parts["decode attention"] = layers * best_time(lambda: attn.attn._decode(q, meta, runner.block_size))
        parts["o projection"] = layers * best_time(lambda: attn.o_proj(o, x))
        parts["gate/up projection"] = layers * best_time(lambda: mlp.gate_up_proj(h))
        parts["silu * up"] = layers * best_time(silu)
        parts["down projection"] = layers * best_time(lambda: mlp.down_proj(act, x))
        hidden = model.norm(x)
        parts["LM head"] = best_time(lambda: model.compute_logits(hidden), 10)
        logits = model.compute_logits(hidden)
        pick = runner.argmax or (lambda t: t.argmax(dim=-1))
        parts["greedy pick"] = best_time(lambda: pick(logits).tolist())
        forward = best_time(lambda: model(ids, positions, meta), 5)
    while engine.has_unfinished_requests():
        engine.step()

    fused = " (fused decode step: one native call for all layers)" if model.decode_plan is not None else ""
    print(f"\nbatch {batch}, {context // batch} tokens of context each: {wall * 1e3:.2f} ms per decode step (median of "
          f"{len(steps)}), {batch / wall:.0f} tok/s")
    print(f"  model forward alone {forward * 1e3:.2f} ms{fused}; its parts, each timed alone:")
    for name, seconds in parts.items():
        print(f"    {name:<22} {seconds * 1e3:7.2f} ms  {seconds / wall:6.1%}")
    rest = wall - sum(parts.values())
    print(f"    {'rest (engine, Python)':<22} {rest * 1e3:7.2f} ms  {rest / wall:6.1%}")
    weights, kv = step_read_bytes(engine, batch, context)
    bw = read_bandwidth()
    floor = (weights + kv) / bw
    print(f"  a step reads {weights / 2**20:.0f} MiB of weights and {kv / 2**20:.1f} MiB of K/V; read bandwidth "
          f"{bw / 1e9:.1f} GB/s -> bandwidth-bound step {floor * 1e3:.2f} ms ({batch / floor:.0f} tok/s); "
          f"measured step is {wall / floor:.1f}x that")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--weight-format", default="auto")
    ap.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    llm = LLM(args.model, weight_format=args.weight_format, num_threads=args.threads)
    engine = llm.engine
    model = engine.loaded.model
    kinds = sorted(
        {f"{type(m.quantized).__name__}{getattr(m.quantized, 'bits', '')}" if m.quantized is not None else "native"
         for m in model.modules() if isinstance(m, Linear)}
    )
    print(f"{args.model}: {engine.loaded.quantization} checkpoint, weight format {args.weight_format} ({', '.join(kinds)}), "
          f"dtype {engine.loaded.dtype}, KV cache {engine.kv_dtype}, {torch.get_num_threads()} threads")
    for batch in (int(b) for b in args.batch.split(",")):
        measure(llm, batch, args.prompt_len, args.new_tokens)


if __name__ == "__main__":
    main()
