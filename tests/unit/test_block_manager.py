"""Block manager and scheduler in isolation: prefix sharing, eviction, preemption, budgets. No model involved."""

from __future__ import annotations

import pytest

from levante.config import SchedulerConfig
from levante.engine.block_manager import BlockManager
from levante.engine.scheduler import EngineOverloadedError, Scheduler
from levante.engine.sequence import Sequence, SequenceStatus
from levante.sampling_params import SamplingParams


class _NoDetok:
    pass


def seq(seq_id: int, tokens: list[int], params: SamplingParams | None = None) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), len(tokens), params or SamplingParams(), _NoDetok())  # type: ignore[arg-type]


def compute_all(bm: BlockManager, s: Sequence) -> None:
    before = s.num_computed_tokens
    bm.grow(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s, before)


def test_shared_prefix_reuses_full_blocks_only() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(0, list(range(1, 11)))  # 10 tokens: two full blocks + 2
    compute_all(bm, a)
    b = seq(1, [*range(1, 9), 42])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = seq(2, [99, *range(2, 11)])  # differs in the first token: chained hashes share nothing
    bm.match_prefix(c)
    assert c.block_table == [] and c.num_computed_tokens == 0


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(0, list(range(1, 9)))  # exactly two blocks
    compute_all(bm, a)
    b = seq(1, list(range(1, 9)))
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4  # the second block is left so the last token runs


def test_freed_blocks_stay_cached_until_evicted_and_nothing_leaks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(0, list(range(1, 10)))
    compute_all(bm, a)
    bm.free_seq(a)
    assert bm.num_free_blocks == 4
    b = seq(1, [*range(1, 9), 77])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 8  # found again after a was freed
    bm.free_seq(b)
    big = seq(2, list(range(100, 116)))  # needs all 4 blocks: evicts the cached ones
    bm.grow(big, 16)
    assert bm.num_free_blocks == 0 and not bm.cached
    bm.free_seq(big)
    assert bm.num_free_blocks == 4 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_prompt_logprob_requests_skip_the_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    compute_all(bm, seq(0, list(range(1, 10))))
    b = seq(1, list(range(1, 10)), SamplingParams(prompt_logprobs=1))
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0


def test_scheduler_budget_chunks_long_prompts_and_decodes_first() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=4), bm, max_model_len=100)
    long = seq(0, list(range(1, 26)))
    sched.add([long])
    batch = sched.schedule()
    assert batch.num_new_tokens == [10]
    long.num_computed_tokens += 10
    short = seq(1, [5, 6, 7])
    sched.add([short])
    batch = sched.schedule()
    assert batch.seqs == [long] and batch.num_new_tokens == [10]  # the running prompt takes the whole budget
    long.num_computed_tokens += 10
    batch = sched.schedule()
    assert batch.seqs == [long, short] and batch.num_new_tokens == [5, 3]  # leftover budget admits the newcomer
    long.num_computed_tokens += 5
    short.num_computed_tokens += 3
    long.token_ids.append(0)
    short.token_ids.append(0)
    batch = sched.schedule()
    assert batch.num_new_tokens == [1, 1]  # both decode


def test_scheduler_preempts_latest_when_blocks_run_out() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm, max_model_len=16)
    a, b = seq(0, [1, 2, 3, 4, 5, 6, 7]), seq(1, [8, 9, 10, 11, 12, 13, 14])
    sched.add([a, b])
    batch = sched.schedule()
    assert batch.seqs == [a, b] and bm.num_free_blocks == 0
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(0)  # each sampled a token; a needs no new block yet, b neither (8 tokens fit 2 blocks)
    batch = sched.schedule()
    assert batch.num_preempted == 0
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(0)  # 9 tokens: each needs a third block, only one can have it
    batch = sched.schedule()
    assert batch.num_preempted == 1 and batch.seqs == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sched.waiting[0] is b


def test_scheduler_refuses_beyond_the_waiting_bound() -> None:
    sched = Scheduler(SchedulerConfig(max_waiting=2), BlockManager(8, 4), max_model_len=32)
    sched.add([seq(0, [1]), seq(1, [2])])
    with pytest.raises(EngineOverloadedError, match="limit 2"):
        sched.add([seq(2, [3])])
