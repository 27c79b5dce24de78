"""What keeps the runner's step fast on a CPU, checked on the compiled program: the donated KV cache
is updated in place (no copy of a cache-sized array in any step shape)."""
import re

import pytest

from reference.layout import PagedLayout, SlotLayout
from reference.runner import _COMPILED, ModelRunner
from tests.test_runner import CFG, PARAMS


def cache_copies(runner: ModelRunner) -> dict:
    """{step shape: number of copy instructions producing an array as large as one layer's K (or V) cache}."""
    rows, row_len = runner.layout.rows, runner.layout.row_len
    K, D = CFG.num_kv_heads, CFG.head_dim
    cache_array = re.compile(rf"= f32\[({rows},{row_len}|{rows * row_len}),{K},{D}\]\S* copy\(")
    out = {}
    for shape in runner.shapes():
        runner.compile_shape(shape)
        step = runner._abstract_step(shape)
        out[shape] = len(cache_array.findall(_COMPILED[runner._compile_key(step)].as_text()))
    return out


@pytest.mark.parametrize("layout, dynamic", [(PagedLayout(64, 4), True), (PagedLayout(64, 4), False),
                                             (SlotLayout(3, 64), True)])
def test_every_step_shape_updates_the_kv_cache_in_place(layout, dynamic):
    runner = ModelRunner(CFG, PARAMS, layout=layout, min_seqs=1, min_tokens=16, max_seqs=3, max_tokens=24,
                         growth=4, mixed_growth=4, dynamic_context=dynamic, max_context=64, coarse_mixed=True)
    copies = cache_copies(runner)
    assert copies and not any(copies.values()), copies
