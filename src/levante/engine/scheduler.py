"""Continuous batching: which sequences run this step, with how many tokens each.

Plain Python, no tensors. Each step has a token budget. Running sequences go first (a
decode costs one token; a sequence still in its prompt gets a chunk of what remains), then
waiting sequences are admitted in arrival order while budget, sequence slots and KV blocks
last. When the pool runs dry, the most recently admitted running sequence is preempted:
its blocks are freed and it goes back to the front of the queue to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from levante.config import SchedulerConfig
from levante.engine.block_manager import BlockManager
from levante.engine.sequence import Sequence, SequenceStatus


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 503 with Retry-After)."""


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seqs: list[Sequence], check_capacity: bool = True) -> None:
        if check_capacity and len(self.waiting) + len(seqs) > self.config.max_waiting:
            raise EngineOverloadedError(
                f"server is at capacity: {len(self.waiting)} requests already waiting (limit {self.config.max_waiting})"
            )
        self.waiting.extend(seqs)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n < seq.num_uncomputed and not chunked:
                i += 1
                continue
            if not self._reserve(seq, n, batch):
                continue  # `seq` itself was preempted; the list shifted under i
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        if batch.num_preempted == 0:
            self._admit(batch, budget)
        return batch

    def _reserve(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Make room for `n` more tokens of running `seq`, preempting later arrivals if needed."""
        target = seq.num_computed_tokens + n
        while not self.block_manager.can_grow(seq, target):
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is seq:
                return False
        self.block_manager.grow(seq, target)
        return True

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        chunked = self.config.enable_chunked_prefill
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if (n < seq.num_uncomputed and not chunked) or not self.block_manager.can_grow(seq, seq.num_computed_tokens + n):
                self.block_manager.free_seq(seq)  # give back prefix-cache hits; retried next step
                break
            self.waiting.popleft()
            self.block_manager.grow(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        if seq in batch.seqs:
            k = batch.seqs.index(seq)
            del batch.seqs[k], batch.num_new_tokens[k]
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.num_preempted += 1
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
