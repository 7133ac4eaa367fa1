"""vLLM's automatic prefix cache, at the level of detail scheduling needs.

When a request ends (finished, aborted, preempted by recompute) vLLM frees its KV blocks but keeps
their contents: a freed full block stays reusable, found by the hash of the tokens it holds, until
the allocator hands it to someone else. Free blocks are reused least recently freed first, and a
request's blocks are freed tail first, so what survives longest is the start of a prompt. A request
that comes back with the same tokens (an evicted request resumed with prompt + text so far, a
preempted one re-admitted) recomputes only what was overwritten.

`PrefixCache` keeps, per key (the request's identity: its token content is not simulated), how
many leading full blocks are still cached, in LRU order. It holds no blocks itself: the engine's
free pool does; the cache only records which free blocks still hold something, and shrinks when
the allocator takes more blocks than the pool has empty (`trim_to`).
"""

from __future__ import annotations

from collections import OrderedDict

from qlm_backend.engine.hardware import KV_BLOCK_TOKENS


class PrefixCache:
    def __init__(self) -> None:
        self._blocks: OrderedDict[str, int] = OrderedDict()  # least recently freed first
        self.total = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def put(self, key: str, blocks: int) -> None:
        """`blocks` leading full blocks of `key` were freed just now (most recently used)."""
        self.total -= self._blocks.pop(key, 0)
        if blocks > 0:
            self._blocks[key] = blocks
            self.total += blocks

    def peek(self, key: str) -> int:
        return self._blocks.get(key, 0)

    def take(self, key: str) -> int:
        """The request is scheduled again: its cached blocks are in use, no longer free."""
        n = self._blocks.pop(key, 0)
        self.total -= n
        return n

    def trim_to(self, free_blocks: int) -> int:
        """The free pool holds `free_blocks`; cached blocks beyond that were overwritten. Oldest
        entries lose their tail blocks first. Returns how many cached blocks were lost."""
        lost = 0
        while self.total > max(0, free_blocks):
            key, n = next(iter(self._blocks.items()))
            cut = min(n, self.total - max(0, free_blocks))
            lost += cut
            self.total -= cut
            if cut == n:
                del self._blocks[key]
            else:
                self._blocks[key] = n - cut
        return lost


def hit_tokens(cached_blocks: int, context_tokens: int) -> int:
    """Tokens a request of `context_tokens` skips with `cached_blocks` leading blocks cached: whole
    blocks only, and at least its last token is computed (vLLM needs logits for it)."""
    usable = min(cached_blocks, max(0, context_tokens - 1) // KV_BLOCK_TOKENS)
    return usable * KV_BLOCK_TOKENS


__all__ = ["PrefixCache", "hit_tokens"]
