"""Turns a scheduled batch into tensors, runs the model and samples.

The only engine file that touches tensors. Token layout of a step: single-token rows
(decodes) first, batched in one attention call; then multi-token prefill chunks.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from dataclasses import dataclass

import torch

from levante.config import DTYPES, CacheConfig, TransformerConfig
from levante.engine.scheduler import ScheduledBatch
from levante.engine.sequence import Sequence
from levante.layers.attention import AttentionMetadata, PrefillChunk
from levante.layers.cpu_kernels import load_cpu_kernels
from levante.layers.linear import Linear
from levante.layers.sampler import SamplerOutput, SamplingRow, TokenLogprobs, prompt_logprobs, sample
from levante.models.llama import LlamaForCausalLM


@dataclass
class StepResult:
    """Per scheduled sequence: the sampled token (None while its prompt is still being prefilled)."""

    seqs: list[Sequence]
    tokens: list[int | None]
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: dict[int, list[TokenLogprobs]]  # seq_id -> logprobs of prompt tokens computed this step


def kv_bytes_per_block(cfg: TransformerConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def kv_cache_dtype(name: str, model: torch.nn.Module, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV pool's dtype: CacheConfig.dtype, where "auto" is float16 for a float32 model on CPU whose
    projections run on quantised weights (a decode step then reads half the bytes of K/V; the weights'
    own quantisation error is far larger than float16's), else the model dtype."""
    if name != "auto":
        return DTYPES[name]
    quantised = any(isinstance(m, Linear) and m.quantized is not None for m in model.modules())
    if device.type == "cpu" and quantised and model_dtype == torch.float32:
        return torch.float16
    return model_dtype


def num_kv_blocks(cache: CacheConfig, cfg: TransformerConfig, dtype: torch.dtype, device: torch.device) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = cache.memory_bytes or int(available_memory(device) * cache.memory_fraction)
    return budget // kv_bytes_per_block(cfg, cache.block_size, dtype)


def _zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV pool. Masked slots are read (and multiplied by 0), so they must never hold NaN.

    On CPU it is an anonymous memory map: zero pages the kernel commits only when written, so the
    pool's resident size grows with use (in 2 MiB steps with huge pages) instead of costing its whole
    budget at start-up.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # 2 MiB pages where the kernel offers them (transparent huge pages in "madvise" mode): a decode step
    # touches every block of every sequence, scattered over the pool, and 4 KiB pages would cost a TLB
    # miss per block.
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).view(shape)


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device, seed: int,
        attention_backend: str = "auto",
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.generator = torch.Generator(device=device).manual_seed(seed)
        cfg = model.config
        dtype = kv_dtype or model.embed_tokens.weight.dtype
        shape = (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)  # layers/attention.py
        self.kv_cache = _zeroed_pool((2, cfg.num_layers, *shape), dtype, device)
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache = self.kv_cache[0, i].view(num_blocks, cfg.num_kv_heads, cfg.head_dim, block_size)  # transposed blocks
            attn.v_cache = self.kv_cache[1, i]
        # "torch": every op portable (the reference the kernels are tested against)
        kernels = load_cpu_kernels() if device.type == "cpu" and attention_backend != "torch" else None
        model.use_cpu_kernels(kernels)
        self.argmax = kernels.argmax_rows if kernels is not None else None

    @staticmethod
    def default_threads() -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        # Decodes (one new token) first, then prefill chunks.
        order = sorted(range(len(batch.seqs)), key=lambda k: batch.num_new_tokens[k] != 1)
        seqs = [batch.seqs[k] for k in order]
        counts = [batch.num_new_tokens[k] for k in order]
        input_ids, positions, meta = self._prepare(seqs, counts)
        hidden = self.model(input_ids, positions, meta)  # [T, D]

        # Rows whose logits we need: the last token of each sequence that completes its uncomputed
        # tokens this step (it samples), plus every prompt position of prompt-logprob requests.
        sample_rows: list[int] = []
        sampling: list[int] = []
        plp_spans: list[tuple[int, int, int, int]] = []  # (seq index, first row, n rows, first position)
        start = 0
        for k, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
            if seq.wants_prompt_logprobs:
                # Position p predicts prompt token p + 1; entries already made (before a preemption) are skipped.
                begin = seq.num_computed_tokens
                first = max(begin, len(seq.prompt_logprobs or [None]) - 1)
                end = min(begin + n, seq.num_prompt_tokens - 1)
                if end > first:
                    plp_spans.append((k, start + first - begin, end - first, first))
            if seq.num_computed_tokens + n == seq.num_tokens:
                sampling.append(k)
                sample_rows.append(start + n - 1)
            start += n
        tokens: list[int | None] = [None] * len(seqs)
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if sampling:
            logits = self.model.compute_logits(hidden[sample_rows])  # [S, V]
            out = self._sample(logits, [seqs[k] for k in sampling])
            for j, k in enumerate(sampling):
                tokens[k] = out.token_ids[j]
                logprobs[k] = out.logprobs[j]
        plp: dict[int, list[TokenLogprobs]] = {}
        for k, row, n, pos in plp_spans:
            seq = seqs[k]
            logits = self.model.compute_logits(hidden[row : row + n])
            nxt = torch.tensor(seq.token_ids[pos + 1 : pos + 1 + n], device=self.device)
            plp[seq.seq_id] = prompt_logprobs(logits, nxt, seq.params.prompt_logprobs or 0)
        return StepResult(seqs, tokens, logprobs, plp)

    @torch.inference_mode()
    def score(self, seq: Sequence, chunk: int) -> torch.Tensor:
        """Logits [num_tokens, V] at every position of `seq` (blocks already reserved), in prefill chunks."""
        rows = []
        while seq.num_computed_tokens < seq.num_tokens:
            n = min(chunk, seq.num_uncomputed)
            input_ids, positions, meta = self._prepare([seq], [n])
            rows.append(self.model.compute_logits(self.model(input_ids, positions, meta)))
            seq.num_computed_tokens += n
        return torch.cat(rows)

    def _prepare(
        self, seqs: list[Sequence], counts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        chunks: list[tuple[int, int, int]] = []  # (q_start, q_len, ctx_len) of each prefill chunk
        prefill_tables: list[list[int]] = []
        for seq, n in zip(seqs, counts, strict=True):
            begin = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(begin + 1)
            else:
                chunks.append((len(ids), n, begin + n))
                prefill_tables.append(table[: -(-(begin + n) // bs)])
            ids.extend(seq.token_ids[begin : begin + n])
            pos.extend(range(begin, begin + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, begin + n))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode=len(decode_lens),
        )
        if chunks:
            # One padded table for the native kernel; each chunk's own table is a view of its row.
            width = max(len(t) for t in prefill_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in prefill_tables], dtype=torch.long, device=self.device)
            meta.prefill_chunks = torch.tensor(chunks, dtype=torch.long, device=self.device)
            meta.prefill_tables = tables
            meta.prefills = [PrefillChunk(*c, tables[k, : len(t)]) for k, (c, t) in enumerate(zip(chunks, prefill_tables, strict=True))]
        if decode_lens:
            width = max(-(-length // bs) for length in decode_lens)
            padded = [t[:width] + [0] * (width - min(len(t), width)) for t in decode_tables]
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=self.device)
            meta.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=self.device)
            meta.decode_max_len = max(decode_lens)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        return input_ids, positions, meta

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        rows = []
        for seq in seqs:
            p = seq.params
            banned: list[int] = []
            if seq.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids or []) + list(seq.detokenizer.tokenizer.eos_token_ids if not p.ignore_eos else [])
            rows.append(SamplingRow(p, seq.prompt_token_ids, seq.output_token_ids, seq.generator, banned))
        return sample(logits, rows, self.generator, self.argmax)
