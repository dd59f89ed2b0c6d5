"""The sampler against hand-computed distributions."""

from __future__ import annotations

import pytest
import torch

from levante.layers.sampler import SamplingRow, prompt_logprobs, sample
from levante.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def frequencies(params: SamplingParams, n: int = 4000, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    rows = [SamplingRow(params, [], [], None)] * n
    out = sample(logits.expand(n, -1).clone(), rows, torch.Generator().manual_seed(0))
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[1]).float() / n


def test_plain_sampling_follows_the_softmax() -> None:
    freq = frequencies(SamplingParams(temperature=1.0))
    assert torch.allclose(freq, LOGITS.softmax(-1)[0], atol=0.03)


def test_temperature_sharpens_and_flattens() -> None:
    cold = frequencies(SamplingParams(temperature=0.5))
    expected = (LOGITS / 0.5).softmax(-1)[0]
    assert torch.allclose(cold, expected, atol=0.03)


def test_top_k_top_p_min_p_truncate_the_distribution() -> None:
    assert frequencies(SamplingParams(temperature=1.0, top_k=2))[2:].sum() == 0
    # top_p=0.6: 0.5 alone is short of 0.6, so the nucleus is {0, 1}.
    nucleus = frequencies(SamplingParams(temperature=1.0, top_p=0.6))
    assert nucleus[2:].sum() == 0 and nucleus[1] > 0.2
    # min_p=0.3: keep tokens with p >= 0.3 * 0.5 = 0.15 -> {0, 1, 2}.
    kept = frequencies(SamplingParams(temperature=1.0, min_p=0.3))
    assert kept[3:].sum() == 0 and kept[2] > 0.1


def test_top_k_1_is_greedy_even_with_tied_maxima() -> None:
    tied = torch.tensor([[1.0, 3.0, 0.5, 3.0, 2.0]])  # bfloat16 logits tie often
    freq = frequencies(SamplingParams(temperature=1.0, top_k=1), n=200, logits=tied)
    assert freq.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]  # always argmax's choice, the first maximum


def test_penalties_match_their_definitions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # Token 0 appeared twice in the output, token 1 in the prompt only.
    row = SamplingRow(params, [1], [0, 0], None)
    out = sample(logits, [row])
    expected = torch.tensor([2.0 / 2 - 0.5 - 0.25 * 2, -1.0 * 2, 0.5, 0.0])
    assert out.token_ids == [int(expected.argmax())]
    # Make the penalty decide: without it token 0 wins.
    assert sample(logits, [SamplingRow(SamplingParams(temperature=0), [1], [0, 0], None)]).token_ids == [0]


def test_seeded_rows_draw_the_same_whatever_the_batch() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    alone = [sample(logits, [SamplingRow(params, [], [], torch.Generator().manual_seed(42))]).token_ids[0]]
    g = torch.Generator().manual_seed(42)
    others = torch.randn(5, 1000)
    batch = torch.cat([others[:2], logits, others[2:]])
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [], None)] * 2 + [SamplingRow(params, [], [], g)] + [
        SamplingRow(SamplingParams(temperature=1.0), [], [], None)
    ] * 3
    assert [sample(batch, rows).token_ids[2]] == alone


def test_logprobs_report_the_raw_distribution_and_ranks() -> None:
    row = SamplingRow(SamplingParams(temperature=0, logprobs=2), [], [], None)
    out = sample(LOGITS.clone(), [row])
    lp = out.logprobs[0]
    assert lp is not None and lp.rank == 1
    assert lp.logprob == pytest.approx(float(torch.log(torch.tensor(0.5))), abs=1e-5)
    assert [t for t, _ in lp.top] == [0, 1]
    plp = prompt_logprobs(LOGITS.expand(2, -1), torch.tensor([3, 0]), 1)
    assert plp[0].rank == 4 and plp[1].rank == 1
    assert plp[0].logprob == pytest.approx(float(torch.log(torch.tensor(0.1))), abs=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"top_p": 0}, {"top_k": -5}, {"n": 0}, {"max_tokens": 0}, {"min_p": 2},
     {"presence_penalty": 3}, {"logprobs": 50}, {"min_tokens": 10, "max_tokens": 5}, {"logit_bias": {1: 500}}],
)
def test_invalid_params_are_rejected_with_a_message(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
