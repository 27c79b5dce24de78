"""Host-side pool of paged KV blocks: reference counts, prefix caching, LRU eviction, copy-on-write.

Plain Python, no JAX: the reference engine and the simulator use this same object.

Vocabulary
- A *block* holds the K/V of `block_size` consecutive tokens of one sequence.
- Block 0 is the null block: never handed out, it pads block tables (in JAX an index of -1
  would silently read the last block).
- A full block whose K/V are computed is *cached*: it is registered under a key chained to its
  parent's key, (parent_hash, its tokens), so a later sequence with the same prefix reuses it.
- A block with refcount 0 is *free*. Free blocks sit in one queue: blocks with no cached content
  at the front (handed out first), cached blocks behind them in the order they were freed, so the
  least recently used cached block is evicted first.

Running out of blocks is not an exception: allocate_slots returns None and changes nothing, and
the scheduler decides what to do (wait, or preempt someone).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from reference.layout import NULL_BLOCK, KVUsage, PagedLayout

_ROOT_HASH = 0

SeqId = Hashable
TokenSlice = Callable[[int, int], Sequence[int]]  # (start, stop) -> token ids in [start, stop)


class BlockManager:
    """The paged KV pool's bookkeeping. Block ids index the device pool's first axis."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        """num_blocks counts the null block, so num_blocks - 1 blocks are usable."""
        self.layout = PagedLayout(num_blocks, block_size)  # validates both
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.fill = [0] * num_blocks  # token positions of the block written (or being written this step)
        self.block_key: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks  # its cache key
        self.cached: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent_hash, tokens) -> block
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(NULL_BLOCK + 1, num_blocks))
        self.tables: dict[SeqId, list[int]] = {}
        self.chain: dict[SeqId, list[int]] = {}  # hashes of each sequence's cached full blocks, in order
        self._reserved_blocks = 0  # blocks with refcount > 0
        self._stored_tokens = 0  # sum of fill over blocks with refcount > 0
        self.num_evictions = 0

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can hold tokens (all but the null block)."""
        return self.layout.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks with refcount 0, cached or not: what allocation can draw on."""
        return len(self.free_queue)

    def block_table(self, seq_id: SeqId) -> list[int]:
        """Physical block of each logical block of the sequence (not padded)."""
        return self.tables[seq_id]

    def has_seq(self, seq_id: SeqId) -> bool:
        """True when the sequence holds blocks."""
        return seq_id in self.tables

    def usage(self) -> KVUsage:
        """Reserved and stored token slots now."""
        return KVUsage(self.num_usable_blocks * self.block_size,
                       self._reserved_blocks * self.block_size, self._stored_tokens)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens positions."""
        return self.layout.blocks_for(num_tokens)

    def _key(self, parent_hash: int, tokens: Sequence[int]) -> tuple[int, tuple[int, ...]]:
        if len(tokens) != self.block_size:
            raise ValueError(f"a cached block holds exactly {self.block_size} tokens, got {len(tokens)}")
        return (parent_hash, tuple(tokens))

    def get_computed_blocks(self, token_ids: Sequence[int]) -> list[int]:
        """Cached blocks that hold a prefix of token_ids, longest match first to last (no refs taken).

        At most (len - 1) // block_size blocks: the last token is always computed, because its
        logits are needed to sample the next token.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        blocks: list[int] = []
        parent = _ROOT_HASH
        for i in range((len(token_ids) - 1) // bs):
            key = self._key(parent, token_ids[i * bs:(i + 1) * bs])
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
            parent = hash(key)
        return blocks

    # ---- allocation ------------------------------------------------------------------------
    def can_allocate(self, num_new_blocks: int) -> bool:
        """True when that many more blocks can be handed out now."""
        return num_new_blocks <= len(self.free_queue)

    def allocate_slots(self, seq_id: SeqId, num_computed: int, num_new: int,
                       computed_blocks: Sequence[int] = ()) -> list[tuple[int, int]] | None:
        """Make the sequence's table cover positions [0, num_computed + num_new) before a step writes them.

        computed_blocks: prefix-cache hits for a sequence seen for the first time (from
        get_computed_blocks); num_computed then counts their tokens.
        Returns the (src, dst) block copies the step must do first (copy-on-write of a shared
        block about to be written), or None, changing nothing, when the pool is too small.
        """
        bs = self.block_size
        table = self.tables.get(seq_id)
        end = num_computed + num_new
        if table is None:
            if len(computed_blocks) * bs > num_computed:
                raise ValueError(f"{len(computed_blocks)} cached blocks cover more than num_computed={num_computed}")
            revived = sum(1 for b in computed_blocks if self.ref_count[b] == 0)
            fresh = self.blocks_needed(end) - len(computed_blocks)
            if revived + fresh > len(self.free_queue):
                return None
            table = self.tables[seq_id] = []
            self.chain[seq_id] = []
            for block in computed_blocks:
                self._take(block)
                table.append(block)
                self.chain[seq_id].append(hash(self.block_key[block]))
            self._grow(table, fresh)
            self._set_fill(table, num_computed, end)
            return []
        # Blocks written this step that another table shares must be copied first.
        first_written = num_computed // bs
        shared = [i for i in range(first_written, min(len(table), self.blocks_needed(end)))
                  if self.ref_count[table[i]] > 1]
        fresh = max(0, self.blocks_needed(end) - len(table))
        if fresh + len(shared) > len(self.free_queue):
            return None
        copies = []
        for i in shared:
            src = table[i]
            dst = self._pop_free()
            self._release(src)
            self.fill[dst] = self.fill[src]
            self._stored_tokens += self.fill[dst]
            table[i] = dst
            copies.append((src, dst))
        self._grow(table, fresh)
        self._set_fill(table, num_computed, end)
        return copies

    def reserve(self, seq_id: SeqId, num_tokens: int) -> None:
        """Grow the sequence's table to hold num_tokens positions now, before they are computed.

        Orca-style max-length reservation; the caller checks can_allocate first (ValueError if the
        pool cannot hold it). The reserved blocks hold no tokens until steps write them.
        """
        table = self.tables[seq_id]
        more = max(0, self.blocks_needed(num_tokens) - len(table))
        if more > len(self.free_queue):
            raise ValueError(f"cannot reserve {more} more blocks for {seq_id!r}: {len(self.free_queue)} free")
        self._grow(table, more)

    def cache_full_blocks(self, seq_id: SeqId, num_computed: int, token_slice: TokenSlice) -> None:
        """Register the sequence's blocks that are now full of computed K/V in the prefix cache.

        Called after a step has written them, so a cached block always holds real K/V.
        token_slice(start, stop) returns the sequence's token ids in [start, stop).
        """
        if not self.enable_prefix_caching:
            return
        chain = self.chain[seq_id]
        num_full = num_computed // self.block_size
        if num_full <= len(chain):
            return
        bs = self.block_size
        table = self.tables[seq_id]
        parent = chain[-1] if chain else _ROOT_HASH
        for i in range(len(chain), num_full):
            key = self._key(parent, token_slice(i * bs, (i + 1) * bs))
            parent = hash(key)
            block = table[i]
            if key not in self.cached and self.block_key[block] is None:
                self.cached[key] = block
                self.block_key[block] = key
            chain.append(parent)

    def free(self, seq_id: SeqId) -> None:
        """Drop the sequence's references; blocks nobody holds return to the free queue.

        Its last blocks are queued to be evicted first: a later request is more likely to share
        a sequence's beginning than its end.
        """
        table = self.tables.pop(seq_id)
        self.chain.pop(seq_id)
        for block in reversed(table):
            self._release(block)

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """Give child_id the parent's blocks, shared (parallel sampling); writes copy on demand."""
        if child_id in self.tables:
            raise ValueError(f"sequence {child_id!r} already holds blocks")
        table = list(self.tables[parent_id])
        for block in table:
            self.ref_count[block] += 1
        self.tables[child_id] = table
        self.chain[child_id] = list(self.chain[parent_id])

    # ---- internals -------------------------------------------------------------------------
    def _grow(self, table: list[int], count: int) -> None:
        for _ in range(count):
            table.append(self._pop_free())

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        key = self.block_key[block]
        if key is not None:  # evict its cached content
            self.num_evictions += 1
            del self.cached[key]
            self.block_key[block] = None
        self.ref_count[block] = 1
        self.fill[block] = 0
        self._reserved_blocks += 1
        return block

    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free_queue[block]
            self._reserved_blocks += 1
            self._stored_tokens += self.fill[block]
        self.ref_count[block] += 1

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self._reserved_blocks -= 1
            self._stored_tokens -= self.fill[block]
            self.free_queue[block] = None
            if self.block_key[block] is None:
                self.free_queue.move_to_end(block, last=False)  # nothing cached in it: reuse it first

    def _set_fill(self, table: list[int], start: int, end: int) -> None:
        """Blocks covering positions [start, end) now hold (or are about to hold) those tokens."""
        bs = self.block_size
        for i in range(start // bs, self.blocks_needed(end)):
            block = table[i]
            new = min(bs, end - i * bs)
            if new > self.fill[block]:
                self._stored_tokens += new - self.fill[block]
                self.fill[block] = new
