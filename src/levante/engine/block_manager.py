"""KV-cache block allocation with prefix caching.

Blocks are fixed-size pages of the KV pool. A full block is identified by a chained hash:
`hash(block) = H(hash(parent block), token ids of the block)`, so two sequences share a
block only if they share every token before it too. Freed blocks keep their hash and stay
reusable until the pool needs them (least recently freed is evicted first).

Example (block_size=4): prompt A = [1..10] fills blocks h1=H(-, 1..4), h2=H(h1, 5..8) and
a partial third block. Prompt B = [1..8, 42] finds h1 and h2 and starts with 8 tokens
already computed; only token 42 runs through the model.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence as Seq

from levante.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "hash", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


def block_hash(parent: bytes | None, token_ids: Seq[int]) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.hits = 0  # prefix-cache statistics, in tokens
        self.queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks for `num_tokens` tokens. Caller checked `can_grow`."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]  # evict: the page is about to be overwritten
            block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached full blocks of `seq`'s prefix and mark their tokens computed.

        At least one token is always left to compute (the step must produce logits), and a
        sequence asking for prompt logprobs matches nothing (they need every position's logits).
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return
        limit = (seq.num_tokens - 1) // self.block_size
        self.queries += seq.num_tokens
        parent: bytes | None = None
        for i in range(limit):
            h = block_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        self.hits += seq.num_computed_tokens

    def register_full_blocks(self, seq: Sequence, old_computed: int) -> None:
        """Publish the hashes of blocks that became full (all tokens computed) in the last step."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, last = old_computed // bs, seq.num_computed_tokens // bs
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue  # came from the cache, already published
            parent = self.blocks[seq.block_table[i - 1]].hash if i else None
            block.hash = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            self.cached.setdefault(block.hash, block.block_id)

    def free_seq(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; hashed ones stay findable until evicted (reverse order: tails go first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # unhashed pages are reused first
                else:
                    self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
