"""Block manager invariants under random operation sequences (hypothesis stateful test).

A shadow copy of every physical block's contents is the independent truth: whatever the
manager does, each live sequence must read back exactly its own tokens, and a prefix hit must
return blocks that hold exactly the tokens asked for.
"""
from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from reference.block_manager import NULL_BLOCK, BlockManager
from reference.errors import ConfigError


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = None
        self.tokens = {}  # seq -> its tokens
        self.computed = {}  # seq -> tokens whose K/V are written
        self.content = {}  # physical block -> {offset: token}, the shadow device memory
        self.next_id = 0

    @rule(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 3, 4, 8]), caching=st.booleans())
    @precondition(lambda self: self.bm is None)
    def create(self, num_blocks, block_size, caching):
        self.bm = BlockManager(num_blocks, block_size, caching)

    def _write(self, seq, start, end):
        """What a model step does: write K/V of tokens [start, end) into the sequence's blocks."""
        bs = self.bm.block_size
        table = self.bm.block_table(seq)
        for pos in range(start, end):
            block = table[pos // bs]
            assert block != NULL_BLOCK
            self.content.setdefault(block, {})[pos % bs] = self.tokens[seq][pos]
        self.computed[seq] = end
        self.bm.cache_full_blocks(seq, end, lambda a, b: self.tokens[seq][a:b])

    def _apply_copies(self, copies):
        for src, dst in copies:
            self.content[dst] = dict(self.content.get(src, {}))

    def _snapshot(self):
        bm = self.bm
        return (list(bm.ref_count), list(bm.free_queue), {k: list(v) for k, v in bm.tables.items()},
                bm.usage())

    @precondition(lambda self: self.bm is not None)
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=20), chunk=st.integers(1, 20))
    def new_sequence(self, tokens, chunk):
        bm = self.bm
        hits = bm.get_computed_blocks(tokens)
        bs = bm.block_size
        assert len(hits) <= (len(tokens) - 1) // bs
        for i, block in enumerate(hits):  # a hit holds exactly the tokens asked for
            assert [self.content[block].get(o) for o in range(bs)] == tokens[i * bs:(i + 1) * bs]
        seq = self.next_id
        self.next_id += 1
        num_computed = len(hits) * bs
        num_new = min(chunk, len(tokens) - num_computed)
        before = self._snapshot()
        copies = bm.allocate_slots(seq, num_computed, num_new, hits)
        if copies is None:
            assert self._snapshot() == before, "a failed allocation must change nothing"
            blocks = bm.blocks_needed(num_computed + num_new) - len(hits)
            revived = sum(1 for b in hits if bm.ref_count[b] == 0)
            assert blocks + revived > bm.num_free_blocks
            return
        assert copies == []
        self.tokens[seq] = list(tokens)
        self.computed[seq] = num_computed
        self._write(seq, num_computed, num_computed + num_new)

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), max_size=9))
    def extend(self, data, extra):
        """Compute more of a sequence: the rest of its prompt, or newly generated tokens."""
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.tokens[seq].extend(extra)
        start = self.computed[seq]
        num_new = len(self.tokens[seq]) - start
        if num_new == 0:
            return
        before = self._snapshot()
        copies = self.bm.allocate_slots(seq, start, num_new)
        if copies is None:
            assert self._snapshot() == before
            del self.tokens[seq][len(self.tokens[seq]) - len(extra):]
            return
        table = self.bm.block_table(seq)
        for i in range(start // self.bm.block_size, self.bm.blocks_needed(start + num_new)):
            assert self.bm.ref_count[table[i]] == 1, "a block about to be written must not be shared"
        self._apply_copies(copies)
        self._write(seq, start, start + num_new)

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self.next_id
        self.next_id += 1
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent][:self.computed[parent]])
        self.tokens[parent] = self.tokens[parent][:self.computed[parent]]
        self.computed[child] = self.computed[parent]

    @precondition(lambda self: self.bm is not None and self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq)
        del self.tokens[seq], self.computed[seq]

    @precondition(lambda self: self.bm is not None and self.bm.enable_prefix_caching)
    @rule(tokens=st.lists(st.integers(100, 10**6), min_size=1, max_size=20, unique=True))
    def committed_prefix_is_found(self, tokens):
        """A prefix just computed and still held is found whole by the next lookup."""
        bm = self.bm
        seq = self.next_id
        self.next_id += 1
        if bm.allocate_slots(seq, 0, len(tokens)) is None:
            return
        self.tokens[seq] = list(tokens)
        self._write(seq, 0, len(tokens))
        hits = bm.get_computed_blocks(tokens + [1])
        assert len(hits) == len(tokens) // bm.block_size  # contents are checked in new_sequence

    @invariant()
    def accounting(self):
        bm = self.bm
        if bm is None:
            return
        holders = Counter(b for table in bm.tables.values() for b in table)
        assert NULL_BLOCK not in holders and bm.ref_count[NULL_BLOCK] == 0
        for block in range(1, bm.num_blocks):
            assert bm.ref_count[block] == holders.get(block, 0), "refcount = number of tables holding it"
        free = list(bm.free_queue)
        assert len(free) == len(set(free)), "a block freed twice"
        assert set(free) == {b for b in range(1, bm.num_blocks) if bm.ref_count[b] == 0}, "leaked block"
        usage = bm.usage()
        assert usage.reserved_tokens == len(holders) * bm.block_size <= usage.capacity_tokens
        assert usage.stored_tokens == sum(bm.fill[b] for b in holders)
        assert all(key == bm.block_key[b] for key, b in bm.cached.items())
        for seq, tokens in self.tokens.items():  # every live sequence reads back its own tokens
            table = bm.block_table(seq)
            for pos in range(self.computed[seq]):
                block = table[pos // bm.block_size]
                assert self.content[block][pos % bm.block_size] == tokens[pos]


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestBlockManager = BlockManagerMachine.TestCase


def test_lru_evicts_least_recently_freed_cached_block():
    bm = BlockManager(num_blocks=5, block_size=2)
    for seq, tokens in (("a", [1, 2, 9]), ("b", [3, 4, 9])):
        bm.allocate_slots(seq, 0, 3)
        bm.cache_full_blocks(seq, 3, lambda s, e, t=tokens: t[s:e])
    bm.free("a")
    bm.free("b")
    # Two uncached (partial) blocks are handed out before any cached one; the third evicts "a"'s.
    assert bm.allocate_slots("c", 0, 6) == []
    assert bm.get_computed_blocks([1, 2, 0]) == [] and bm.get_computed_blocks([3, 4, 0]) != []
    assert bm.num_evictions == 1


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_blocks=10, block_size=0), "block_size"),
    (dict(num_blocks=1, block_size=16), "num_blocks"),
])
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        BlockManager(**kwargs)
