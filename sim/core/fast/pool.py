"""reference.block_manager.BlockManager's policy, event-driven: blocks tracked one by one where prefix caching can hit, counted where it cannot.

The policy (the teaching BlockManager is its definition): a free block is either uncached (handed
out first) or cached (its content registered under a key chained to its parent's, kept in LRU
order: the first freed is evicted first); a request releases its blocks last to first; a full
computed block is registered unless its key is already cached; a new request takes the cached
blocks holding the longest prefix of its tokens.

What is counted instead of done. A request's table splits into
- exact blocks (the first `n_exact`): content another request may hold, e.g. a shared system
  prompt. Each has a handle, a reference count and a key, exactly as in BlockManager;
- private blocks (the rest): content no other request can hold (their keys chain through enough
  random tokens of the request's own; see sim.core.fast.request.LazyRequest.unique_from). Only
  the request itself can ever hit them (after a preemption). A request's registered private
  blocks are kept as runs [lo, hi) of table indices: released last to first, a run sits in the
  LRU queue as one entry and is evicted from its top (hi - 1 first), exactly the order
  BlockManager's queue would hold its blocks in.
Uncached free blocks are interchangeable, so they are a count. Handles are this pool's own
numbers, not BlockManager's block ids: block tables differ by a renaming, and every decision
(what is free, cached, evicted or hit) is the same; tests/test_fastpath.py checks it step by step.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

from reference.request import Request
from sim.core.fast.decode_group import SIM_TOKEN
from sim.core.fast.request import prompt_slice, shared_head

ALL_BLOCKS = 1 << 62  # n_exact of a request whose every block may be shared
_NO_HITS: tuple[list[int], list, int] = ((), (), 0)  # lookup's answer when nothing can hit
_ROOT_HASH = 0  # BlockManager's parent hash of a first block
_HEAD_MEMO_LIMIT = 1024  # shared heads whose keys are remembered (cleared beyond: a workload of many prefixes)


class Run:
    """Cached private blocks [lo, hi) of one request's table, adjacent in the LRU queue (hi - 1 first)."""

    __slots__ = ("owner", "lo", "hi")

    def __init__(self, owner: Holding, lo: int, hi: int):
        self.owner, self.lo, self.hi = owner, lo, hi


class Holding:
    """One request's place in the pool: its exact blocks, keys, registration progress and cached runs."""

    __slots__ = ("n_exact", "real", "keys", "n_chain", "full", "unreg", "runs", "nblocks", "fill_end")

    def __init__(self, n_exact: int):
        self.n_exact = n_exact  # table indices below this are exact blocks
        self.real: list[int] = []  # handles of its exact blocks, in table order
        self.keys: list[tuple[int, tuple[int, ...]]] = []  # cache keys of its first blocks (content never changes)
        self.n_chain = 0  # exact blocks the registration has passed
        self.full = 0  # full blocks the registration has passed (exact and private)
        self.unreg: list[tuple[int, int]] = []  # private index ranges computed but not registered (key was cached)
        self.runs: list[Run] = []  # its cached private runs in the LRU queue
        self.nblocks = 0  # blocks held, kept by the scheduler for requests outside the decode group
        self.fill_end = 0  # positions those blocks cover (written or being written), likewise


class HybridPool:
    """A paged KV pool of num_blocks (block 0 the null block) of block_size tokens; prefix caching on or off."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_usable = num_blocks - 1
        self.caching = enable_prefix_caching
        self.free_total = self.num_usable  # free blocks, cached or not (BlockManager.num_free_blocks)
        self.free_uncached = self.num_usable
        self.lru: OrderedDict[int | Run, None] = OrderedDict()  # cached free blocks (handles) and runs, oldest first
        self.ref: dict[int, int] = {}  # handle -> reference count (0: cached and free)
        self.key_of: dict[int, tuple | None] = {}  # handle -> its cache key (None: not registered)
        self.cached: dict[tuple, int] = {}  # key -> handle
        self.dup = 0  # sum over exact blocks of (references - 1): tokens counted twice in a sum of fills, / block_size
        self.num_evictions = 0
        self._handles = itertools.count(1)
        self._head_keys: dict[int, tuple[object, list]] = {}  # id(head) -> (head, keys of its whole blocks)

    def holding(self, unique_from: int | None) -> Holding:
        """A fresh holding for a request whose content is unique from position unique_from on (None: never)."""
        if not self.caching:
            return Holding(0)  # nothing is ever cached, so nothing needs tracking
        return Holding(ALL_BLOCKS if unique_from is None else unique_from // self.block_size)

    def cached_free_private(self) -> int:
        """Free private blocks whose content is still cached (the runs in the LRU queue)."""
        return sum(e.hi - e.lo for e in self.lru if e.__class__ is Run)

    def registered_private(self, hold: Holding, num_computed: int) -> int:
        """Private blocks of a held table whose content is registered, given its num_computed_tokens."""
        if not self.caching:
            return 0
        return sum(hi - lo for lo, hi in _minus(len(hold.real), num_computed // self.block_size, hold.unreg))

    # ---- keys ----------------------------------------------------------------------------------
    def keys_upto(self, hold: Holding, req: Request, n: int) -> list[tuple[int, tuple[int, ...]]]:
        """BlockManager's cache keys of req's first n blocks, (hash of the parent's key, its tokens), computed once."""
        keys = hold.keys
        bs = self.block_size
        if len(keys) < n:
            # A block inside the shared head has the same key in every request with that head (the key is its
            # tokens and its parent's key): computed once per head, not once per request.
            head = shared_head(req)
            if len(head) >= bs:
                shared = self._keys_of_head(head)
                if len(keys) < len(shared):
                    keys.extend(shared[len(keys):n])
        while len(keys) < n:
            j = len(keys)
            keys.append(_next_key(keys, _block_tokens(req, j * bs, (j + 1) * bs)))
        return keys

    def _keys_of_head(self, head) -> list[tuple[int, tuple[int, ...]]]:
        """The cache keys of the whole blocks of a shared head, as keys_upto computes them (remembered per head)."""
        memo = self._head_keys.get(id(head))
        if memo is not None and memo[0] is head:
            return memo[1]
        bs, keys = self.block_size, []
        for j in range(len(head) // bs):
            keys.append(_next_key(keys, tuple(head[j * bs:(j + 1) * bs])))
        if len(self._head_keys) >= _HEAD_MEMO_LIMIT:
            self._head_keys.clear()
        self._head_keys[id(head)] = (head, keys)  # holding the head keeps its id from being reused
        return keys

    # ---- admission -----------------------------------------------------------------------------
    def lookup(self, hold: Holding, req: Request, limit: int) -> tuple[list[int], list[Run], int]:
        """Cached blocks holding a prefix of req's tokens, at most limit of them (no references taken).

        Returns (exact hits' handles, the private runs hit, number of private blocks they hold).
        """
        if not self.caching or limit <= 0 or (not hold.n_exact and not hold.runs):
            return _NO_HITS
        n_ex = min(hold.n_exact, limit)
        hits: list[int] = []
        cached = self.cached
        keys = self.keys_upto(hold, req, n_ex)
        for i in range(n_ex):
            h = cached.get(keys[i])
            if h is None:
                return hits, [], 0
            hits.append(h)
        if n_ex == limit or not hold.runs:
            return hits, [], 0
        pos, taken = hold.n_exact, []
        for run in sorted(hold.runs, key=_run_lo):
            if run.lo != pos:
                break
            pos = run.hi
            taken.append(run)
        if pos > limit:  # the registered blocks of a waiting request never pass its last token
            raise AssertionError(f"{req.request_id}: cached private blocks up to {pos}, limit {limit}")
        return hits, taken, pos - hold.n_exact

    def admit(self, hold: Holding, hits: list[int], runs: list[Run], private_hits: int, needed: int) -> bool:
        """Take the hits and grow the table to `needed` blocks; False, changing nothing, when the pool is too small."""
        ref = self.ref
        revived = 0  # hits that are free (cached, in the LRU queue)
        for h in hits:
            if ref[h] == 0:
                revived += 1
        fresh = needed - len(hits) - private_hits
        if private_hits + revived + fresh > self.free_total:
            return False
        lru = self.lru
        for h in hits:  # one more reference each; a free one leaves the LRU queue
            r = ref[h]
            if r:
                ref[h] = r + 1
            else:
                del lru[h]
                ref[h] = 1
        self.free_total -= revived
        self.dup += len(hits) - revived
        hold.real.extend(hits)
        for run in runs:
            del self.lru[run]
            hold.runs.remove(run)
            self.free_total -= run.hi - run.lo
        hold.n_chain = len(hits)
        hold.full = len(hits) + private_hits
        if hold.unreg:
            hold.unreg = []
        self.grow(hold, fresh, len(hits) + private_hits)
        hold.nblocks = needed
        return True

    # ---- allocation ----------------------------------------------------------------------------
    def grow(self, hold: Holding, n: int, first_index: int) -> None:
        """Hand n fresh blocks to a table now first_index blocks long (the caller checked n <= free_total)."""
        if n <= 0:
            return
        self.pop(n)
        for i in range(first_index, min(first_index + n, hold.n_exact)):
            h = next(self._handles)
            self.ref[h] = 1
            self.key_of[h] = None
            hold.real.append(h)

    def pop(self, n: int) -> None:
        """Take n free blocks: uncached ones first, then the least recently used cached ones (evicted)."""
        self.free_total -= n
        take = n if n <= self.free_uncached else self.free_uncached
        self.free_uncached -= take
        n -= take
        lru = self.lru
        while n:
            entry = next(iter(lru))
            if entry.__class__ is int:
                del lru[entry]
                del self.cached[self.key_of.pop(entry)]
                del self.ref[entry]
                self.num_evictions += 1
                n -= 1
            else:
                k = min(n, entry.hi - entry.lo)
                entry.hi -= k
                self.num_evictions += k
                n -= k
                if entry.hi == entry.lo:
                    del lru[entry]
                    entry.owner.runs.remove(entry)

    # ---- after a step --------------------------------------------------------------------------
    def register(self, hold: Holding, req: Request, num_computed: int) -> None:
        """BlockManager.cache_full_blocks: req's blocks full of computed K/V are registered (keys not yet cached)."""
        if not self.caching or (not hold.n_exact and not hold.runs):
            return  # nothing exact, and no older copies of its own: its private blocks register, counted at free
        num_full = num_computed // self.block_size
        stop = min(num_full, hold.n_exact)
        if stop > hold.n_chain:
            keys = self.keys_upto(hold, req, stop)
            cached, key_of, real = self.cached, self.key_of, hold.real
            for i in range(hold.n_chain, stop):
                key = keys[i]
                h = real[i]
                if key not in cached and key_of[h] is None:
                    cached[key] = h
                    key_of[h] = key
            hold.n_chain = stop
        lo = max(hold.full, hold.n_exact)
        if num_full > lo:
            for run in hold.runs:  # its own older blocks still hold these keys: the new ones stay unregistered
                a, b = max(lo, run.lo), min(num_full, run.hi)
                if a < b:
                    hold.unreg.append((a, b))
        if num_full > hold.full:
            hold.full = num_full

    def free(self, hold: Holding, fill_end: int, num_computed: int) -> None:
        """BlockManager.free: release the table (fill_end positions, num_computed of them computed), last block first."""
        bs = self.block_size
        total = -(-fill_end // bs)
        real = hold.real
        n_real = len(real)
        private = total - n_real
        if private > 0:
            full = num_computed // bs
            if not self.caching or full <= n_real:
                pieces = ()
            elif hold.unreg:
                pieces = _minus(n_real, full, hold.unreg)
            else:
                pieces = ((n_real, full),)
            registered = 0
            for lo, hi in reversed(pieces):
                run = Run(hold, lo, hi)
                self.lru[run] = None
                hold.runs.append(run)
                registered += hi - lo
            self.free_uncached += private - registered
            self.free_total += private
        if real:
            ref, key_of, lru = self.ref, self.key_of, self.lru
            shared = freed = uncached = 0
            for h in reversed(real):  # last to first: a block that becomes free joins the LRU queue in that order
                r = ref[h] - 1
                if r > 0:
                    ref[h] = r
                    shared += 1
                elif key_of[h] is not None:
                    ref[h] = 0
                    lru[h] = None
                    freed += 1
                else:
                    del ref[h], key_of[h]
                    uncached += 1
            self.dup -= shared
            self.free_total += freed + uncached
            self.free_uncached += uncached
            hold.real = []
        if hold.unreg:
            hold.unreg = []
        hold.n_chain = hold.full = hold.nblocks = 0

    def reserved_blocks(self) -> int:
        """Blocks held by some request."""
        return self.num_usable - self.free_total


def _next_key(keys: list, tokens: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """The key of the block after those keyed in `keys` whose tokens are `tokens` (BlockManager's chain)."""
    return (hash(keys[-1]) if keys else _ROOT_HASH, tokens)


def _block_tokens(req: Request, start: int, stop: int) -> tuple[int, ...]:
    """Token ids at positions [start, stop) of req; outputs are the simulator's token."""
    p = req.num_prompt_tokens
    if stop <= p:
        return tuple(prompt_slice(req, start, stop))
    if start >= p:
        return (SIM_TOKEN,) * (stop - start)
    return tuple(prompt_slice(req, start, p)) + (SIM_TOKEN,) * (stop - p)


def _minus(lo: int, hi: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) without the ranges in holes, as ascending disjoint ranges."""
    if hi <= lo:
        return []
    if not holes:
        return [(lo, hi)]
    out, pos = [], lo
    for a, b in sorted(holes):
        if b <= pos:
            continue
        if a >= hi:
            break
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < hi:
        out.append((pos, hi))
    return out


def _run_lo(run: Run) -> int:
    return run.lo
