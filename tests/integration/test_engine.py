"""Engine behaviour: batching, preemption, chunked prefill, prefix caching, sampling controls, no block leaks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from levante import LLM, SamplingParams
from levante.config import CacheConfig, EngineConfig, SchedulerConfig
from levante.engine.async_engine import AsyncLLMEngine
from levante.engine.llm_engine import LLMEngine, PromptTooLongError
from levante.engine.scheduler import EngineOverloadedError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 60, (n,), generator=gen).tolist()
    return [{"prompt_token_ids": torch.randint(3, 32000, (k,), generator=gen).tolist()} for k in lengths]


def assert_no_leaks(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def mistral(tiny_model: Callable[..., Path]) -> Path:
    return tiny_model("mistral")


@pytest.fixture(scope="module")
def solo(mistral: Path) -> list[list[int]]:
    """Greedy tokens of each prompt run alone, on an engine with no prefix cache."""
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=64, block_size=8, enable_prefix_caching=False)
    return [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts(16)]


def test_batched_equals_alone(mistral: Path, solo: list[list[int]]) -> None:
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=256, block_size=8)
    outs = llm.generate(prompts(16), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == solo
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_no_leaks(llm)


def test_preemption_keeps_every_request_correct(mistral: Path, solo: list[list[int]]) -> None:
    # 12 blocks of 8 tokens cannot hold 16 sequences of up to ~70 tokens: the scheduler must preempt.
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=12, block_size=8, max_model_len=96, max_num_batched_tokens=64)
    outs = llm.generate(prompts(16), GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == solo
    assert_no_leaks(llm)


def test_chunked_prefill_equals_unchunked(mistral: Path, solo: list[list[int]]) -> None:
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=256, block_size=8, max_num_batched_tokens=16)
    outs = llm.generate(prompts(16), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == solo
    assert_no_leaks(llm)


def test_prefix_cache_hit_gives_same_logprobs_as_miss(mistral: Path) -> None:
    shared = prompts(1, seed=5)[0]["prompt_token_ids"] * 2  # a long shared "system prompt"
    first = {"prompt_token_ids": [*shared, 11, 12]}
    second = {"prompt_token_ids": [*shared, 21, 22, 23]}
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    cold = LLM(str(mistral), dtype="float32", num_kv_blocks=64, block_size=8, enable_prefix_caching=False)
    expected = cold.generate(second, params)[0]
    warm = LLM(str(mistral), dtype="float32", num_kv_blocks=64, block_size=8)
    warm.generate(first, params)
    got = warm.generate(second, params)[0]
    assert got.num_cached_tokens >= len(shared) // 8 * 8 > 0
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert got.outputs[0].logprobs is not None and expected.outputs[0].logprobs is not None
    for a, b in zip(got.outputs[0].logprobs, expected.outputs[0].logprobs, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].logprob == pytest.approx(b[k].logprob, abs=1e-4)
    assert_no_leaks(warm)


def test_logprobs_and_prompt_logprobs_match_one_pass_scoring(mistral: Path) -> None:
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=64, block_size=8, max_num_batched_tokens=16)
    prompt = prompts(1, seed=7)[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True))[0]
    full = prompt["prompt_token_ids"] + out.outputs[0].token_ids
    ref = torch.log_softmax(llm.score({"prompt_token_ids": full}), dim=-1)
    n = len(prompt["prompt_token_ids"])
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for pos in range(1, n):
        entry = out.prompt_logprobs[pos]
        assert entry is not None
        token = full[pos]
        assert entry[token].logprob == pytest.approx(ref[pos - 1, token].item(), abs=1e-4)
        top2 = ref[pos - 1].topk(2).indices.tolist()
        assert set(top2) <= set(entry)
    assert out.outputs[0].logprobs is not None
    for step, entry in enumerate(out.outputs[0].logprobs):
        token = full[n + step]
        assert entry[token].logprob == pytest.approx(ref[n + step - 1, token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids, strict=True)), abs=1e-4)
    # prompt_logprobs=0, as vLLM's offline API takes it: each prompt token's own logprob and nothing else.
    only = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert only is not None and only[0] is None and len(only) == n
    for pos in range(1, n):
        entry = only[pos]
        assert entry is not None and list(entry) == [full[pos]]
        assert entry[full[pos]].logprob == pytest.approx(ref[pos - 1, full[pos]].item(), abs=1e-4)
    assert_no_leaks(llm)


def test_seeded_sampling_is_reproducible_across_batch_compositions(mistral: Path) -> None:
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=256, block_size=8)
    target = prompts(1, seed=9)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(target, seeded)[0].outputs[0].token_ids
    others = prompts(6, seed=10)
    batch = llm.generate([*others[:3], target, *others[3:]], [SamplingParams(temperature=1.0, max_tokens=10)] * 3 + [seeded] + [SamplingParams(temperature=0.7, max_tokens=4)] * 3)
    assert batch[3].outputs[0].token_ids == alone
    unseeded = [llm.generate(target, SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1] or unseeded[0] != alone  # unseeded requests draw fresh numbers
    assert_no_leaks(llm)


def test_n_samples_differ_and_each_is_reproducible(mistral: Path) -> None:
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=128, block_size=8)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    a = llm.generate(prompts(1, seed=3)[0], params)[0]
    b = llm.generate(prompts(1, seed=3)[0], params)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert_no_leaks(llm)


def test_sampling_controls(mistral: Path) -> None:
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=128, block_size=8)
    p = prompts(1, seed=11)[0]
    greedy = llm.generate(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    top1 = llm.generate(p, SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    assert top1 == greedy
    tiny_p = llm.generate(p, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    assert tiny_p == greedy
    full_min_p = llm.generate(p, SamplingParams(temperature=1.0, min_p=1.0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    assert full_min_p == greedy
    forced = llm.generate(p, SamplingParams(temperature=0, max_tokens=5, logit_bias={1234: 100.0}, ignore_eos=True))[0]
    assert forced.outputs[0].token_ids == [1234] * 5
    allowed = llm.generate(p, SamplingParams(temperature=1.0, max_tokens=6, allowed_token_ids=[500, 600], seed=1, ignore_eos=True))[0]
    assert set(allowed.outputs[0].token_ids) <= {500, 600}
    # Repetition controls: with a strong presence penalty a token never repeats in a short greedy run.
    no_repeat = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, presence_penalty=2.0, repetition_penalty=2.0, ignore_eos=True))[0]
    ids = no_repeat.outputs[0].token_ids
    assert len(set(ids)) == len(ids)
    # EOS is banned until min_tokens, then honoured.
    eos = llm.tokenizer.eos_token_id
    biased = SamplingParams(temperature=0, max_tokens=10, min_tokens=4, logit_bias={eos: 100.0})
    out = llm.generate(p, biased)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and out.finish_reason == "stop"
    stop_tok = llm.generate(p, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[greedy[2]], ignore_eos=True))[0].outputs[0]
    assert stop_tok.token_ids == greedy[:3] and stop_tok.finish_reason == "stop" and stop_tok.stop_reason == greedy[2]
    assert_no_leaks(llm)


def test_stop_string_spanning_tokens(mistral: Path) -> None:
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=128, block_size=8)
    tok = llm.tokenizer
    p = prompts(1, seed=12)[0]
    base = llm.generate(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    pieces = [tok.decode(base.token_ids[: i + 1]) for i in range(len(base.token_ids))]
    # A stop string made of the end of token 4's text and the start of token 5's text.
    boundary = len(pieces[4])
    stop = base.text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and base.text.find(stop) >= boundary - 2
    cut = base.text.find(stop)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=16, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:cut]
    kept = llm.generate(p, SamplingParams(temperature=0, max_tokens=16, stop=[stop], include_stop_str_in_output=True, ignore_eos=True))[0].outputs[0]
    assert kept.text == base.text[: cut + len(stop)]
    # Before min_tokens a stop string is not looked for: the text stays whole (decode of the ids), as in vLLM.
    late = llm.generate(p, SamplingParams(temperature=0, max_tokens=16, min_tokens=12, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert late.token_ids[:12] == base.token_ids[:12] and len(late.token_ids) >= 12
    assert late.text == tok.decode(late.token_ids) or late.finish_reason == "stop"
    assert late.text.startswith(base.text[: cut + len(stop)])
    assert_no_leaks(llm)


def test_context_window_errors_name_the_numbers(mistral: Path) -> None:
    llm = LLM(str(mistral), dtype="float32", num_kv_blocks=64, block_size=8, max_model_len=64)
    with pytest.raises(PromptTooLongError, match=r"64 tokens.*70 tokens"):
        llm.generate({"prompt_token_ids": [5] * 70}, SamplingParams(max_tokens=4))
    with pytest.raises(PromptTooLongError, match=r"60 tokens.*10 more"):
        llm.generate({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(logit_bias={10**6: 1.0}))
    # max_tokens=None runs to the end of the window.
    out = llm.generate({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert_no_leaks(llm)


def _async_engine(path: Path, max_waiting: int = 64, max_num_seqs: int = 8) -> AsyncLLMEngine:
    config = EngineConfig(
        model=str(path), dtype="float32",
        cache=CacheConfig(block_size=8, num_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_waiting=max_waiting, max_num_batched_tokens=64),
    )
    return AsyncLLMEngine(LLMEngine(config))


def test_async_stream_matches_offline_and_abort_frees_blocks(mistral: Path, solo: list[list[int]]) -> None:
    engine = _async_engine(mistral)

    async def collect(i: int, p: dict[str, list[int]]) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(p, GREEDY, f"r{i}"):
            tokens += out.outputs[0].token_ids
        return tokens

    async def abort_midway() -> int:
        seen = 0
        agen = engine.generate(prompts(1, seed=99)[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "abort-me")
        async for _ in agen:
            seen += 1
            if seen == 3:
                break
        await agen.aclose()
        return seen

    async def main() -> tuple[list[list[int]], int]:
        results = await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts(16))), abort_midway())
        return list(results[:-1]), results[-1]  # type: ignore[return-value]

    try:
        streamed, seen = asyncio.run(main())
        assert streamed == solo
        assert seen == 3
        for _ in range(100):  # the abort is applied by the step thread
            if engine.engine.block_manager.num_free_blocks == 128 and not engine.engine.requests:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert engine.engine.block_manager.num_free_blocks == 128
        assert not engine.engine.has_unfinished_requests()
    finally:
        engine.shutdown()


def test_back_pressure_refuses_excess_and_completes_the_rest(mistral: Path) -> None:
    engine = _async_engine(mistral, max_waiting=4, max_num_seqs=2)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def one(i: int) -> str:
        try:
            n = 0
            async for out in engine.generate(prompts(1, seed=i)[0], params, f"bp{i}"):
                n += len(out.outputs[0].token_ids)
            assert n == 20
            return "done"
        except EngineOverloadedError:
            return "refused"

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(12)))

    try:
        results = asyncio.run(main())
        assert results.count("refused") > 0
        assert results.count("done") >= 4
        assert results.count("done") + results.count("refused") == 12
        assert engine.engine.block_manager.num_free_blocks == 128
    finally:
        engine.shutdown()


def test_back_pressure_counts_sequences_and_never_fails_an_admitted_request(mistral: Path) -> None:
    """n > 1 asks for n sequences: a request is refused at submit (the server's 503) when they do not fit,
    and one that was admitted is served whatever else arrives before the step loop takes it in."""
    engine = _async_engine(mistral, max_waiting=4, max_num_seqs=1)
    params = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=0, ignore_eos=True)

    async def one(i: int) -> str:
        try:
            stream = engine.submit(prompts(1, seed=40 + i)[0], params, f"bpn{i}")
        except EngineOverloadedError:
            return "refused"
        outs: dict[int, int] = {}
        async for out in stream:  # admitted: must not fail now (a streaming client already has its 200)
            for c in out.outputs:
                outs[c.index] = outs.get(c.index, 0) + len(c.token_ids)
        assert outs == {0: 12, 1: 12, 2: 12}
        return "done"

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(6)))

    try:
        results = asyncio.run(main())
        assert "refused" in results and results.count("done") >= 1
        assert engine.engine.block_manager.num_free_blocks == 128
    finally:
        engine.shutdown()
