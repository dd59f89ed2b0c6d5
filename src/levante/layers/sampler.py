"""Token sampling for a batch of rows, each with its own SamplingParams.

Order (as vLLM): logit bias / allowed ids / min-token bans -> repetition, frequency and
presence penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw.
The draw uses the "exponential race" (argmax of p / E with E ~ Exp(1)), which samples
exactly from p and lets each seeded row use its own generator, so a seeded request
draws the same numbers whatever else is in the batch.
Logprobs are those of the model's raw distribution (log_softmax of the logits), as
vLLM reports by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from levante.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None  # per-request, for seeded sampling
    banned_ids: Sequence[int] = ()  # EOS / stop ids while fewer than min_tokens are out


@dataclass
class TokenLogprobs:
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # the top-N (token id, logprob), most likely first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    generator: torch.Generator | None = None,
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SamplerOutput:
    """logits: [B, V] float32, one row per SamplingRow -> one token per row.

    `argmax` replaces `logits.argmax(dim=-1)` (first maximum of each row) when every row is plain
    greedy: the native CPU one is ~10x faster than torch's for a vocabulary row.
    """
    if all(_plain_greedy(r) for r in rows):  # the common serving case: no copies, one argmax
        picks = argmax(logits) if argmax is not None else logits.argmax(dim=-1)
        return SamplerOutput(picks.tolist(), [None] * len(rows))
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in rows):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    logits = logits.clone()
    _apply_biases(logits, rows)
    _apply_penalties(logits, rows)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    # top_k=1 is greedy: one candidate, the first maximum (sampling among tied maxima would not be)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy or r.params.top_k == 1]
    sampled = [i for i, r in enumerate(rows) if not (r.params.greedy or r.params.top_k == 1)]
    if greedy:
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    if sampled:
        tokens[sampled] = _draw(logits[sampled], [rows[i] for i in sampled], generator)
    token_list = tokens.tolist()
    return SamplerOutput(token_list, _logprobs(raw_logprobs, tokens, rows))


def _plain_greedy(r: SamplingRow) -> bool:
    p = r.params
    return (
        p.greedy and p.logprobs is None and not p.needs_penalties and not p.logit_bias and not p.allowed_token_ids
        and not r.banned_ids and not p.logits_processors
    )


def _apply_biases(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=logits.device)
            vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[i].index_add_(0, ids, vals)
        if p.allowed_token_ids:
            keep = torch.full_like(logits[i], float("-inf"))
            ids = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=logits.device)
            keep[ids] = 0.0
            logits[i] += keep
        if r.banned_ids:
            logits[i, list(r.banned_ids)] = float("-inf")
        for processor in p.logits_processors or ():
            logits[i] = processor(r.output_ids, logits[i])


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if not p.needs_penalties:
            continue
        out = torch.tensor(list(r.output_ids), dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)  # [V]
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            if r.prompt_ids:
                seen[torch.tensor(list(r.prompt_ids), dtype=torch.long, device=logits.device)] = True
            row = logits[i]
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            logits[i] = torch.where(seen, penalised, row)
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _draw(logits: torch.Tensor, rows: Sequence[SamplingRow], generator: torch.Generator | None) -> torch.Tensor:
    # logits: [S, V] for the rows that sample
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=device)
    logits = logits / temps.unsqueeze(1)
    top_ks = [r.params.top_k for r in rows]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[1]
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_ks], device=device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))  # [S, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype, device=device)
    if bool((top_ps < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_ps.unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    min_ps = torch.tensor([r.params.min_p for r in rows], dtype=probs.dtype, device=device)
    if bool((min_ps > 0).any()):
        floor = min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    race = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        race[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_(generator=generator)
    for i, r in enumerate(rows):
        if r.generator is not None:
            race[i].exponential_(generator=r.generator)
    return (probs / race).argmax(dim=-1)


def _logprobs(raw: torch.Tensor | None, tokens: torch.Tensor, rows: Sequence[SamplingRow]) -> list[TokenLogprobs | None]:
    if raw is None:
        return [None] * len(rows)
    chosen = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [B]
    ranks = (raw > chosen.unsqueeze(1)).sum(dim=1) + 1
    result: list[TokenLogprobs | None] = []
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    for i, r in enumerate(rows):
        n = r.params.logprobs
        if n is None:
            result.append(None)
            continue
        top: list[tuple[int, float]] = []
        if n > 0:
            vals, ids = raw[i].topk(n)
            top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        result.append(TokenLogprobs(chosen_l[i], ranks_l[i], top))
    return result


def prompt_logprobs(logits: torch.Tensor, next_ids: torch.Tensor, n: int) -> list[TokenLogprobs]:
    """logits: [P, V] at prompt positions; next_ids: [P] the prompt token that followed each position."""
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, next_ids.unsqueeze(1)).squeeze(1)
    ranks = ((lp > chosen.unsqueeze(1)).sum(dim=1) + 1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in range(lp.shape[0])]
    if n > 0:
        vals, ids = lp.topk(n, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    return [TokenLogprobs(c, r, t) for c, r, t in zip(chosen.tolist(), ranks, tops, strict=True)]
