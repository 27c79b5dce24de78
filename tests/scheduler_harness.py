"""A fake model that checks each step's batch is well-formed and answers with a token that depends
on the whole context, so a scheduler that loses or reorders context changes the outputs."""
from reference.batch import SchedulerOutput
from reference.request import Request, SamplingParams
from reference.layout import PagedLayout


def context_token(tokens: list[int], vocab: int = 97) -> int:
    """Deterministic 'next token' of a context."""
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + len(tokens)) % vocab


def check_and_sample(sched, out: SchedulerOutput) -> list[int]:
    """What a model runner would do, with invariants every scheduler must keep."""
    seen = set()
    for chunk in out.chunks:
        req = chunk.request
        assert id(req) not in seen, "a request scheduled twice in one step"
        seen.add(id(req))
        assert chunk.start == req.num_computed_tokens and 0 < chunk.num_tokens
        assert chunk.end <= req.num_tokens
        if isinstance(sched.layout, PagedLayout):
            assert len(chunk.block_table) * sched.layout.block_size >= chunk.end
            assert 0 not in chunk.block_table
        else:
            assert 0 <= chunk.slot < sched.layout.num_slots
    if not isinstance(sched.layout, PagedLayout):
        slots = [c.slot for c in out.chunks]
        assert len(slots) == len(set(slots)), "two requests share a KV slot"
    return [context_token(c.request.token_ids(0, c.end)) for c in out.chunks if c.samples]


def make_requests(specs, max_tokens_cap=None):
    """Requests from (prompt tokens, max_tokens) pairs."""
    return [Request(f"r{i}", list(p), SamplingParams(max_tokens=m)) for i, (p, m) in enumerate(specs)]


def run_to_completion(sched, reqs, arrivals=None, max_steps=100_000):
    """Drive a scheduler with a unit-time clock; returns the per-step outputs."""
    arrivals = arrivals or [0] * len(reqs)
    pending = sorted(zip(arrivals, range(len(reqs))))
    t, steps = 0, []
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= t:
            _, i = pending.pop(0)
            reqs[i].arrival_time = t
            sched.add(reqs[i], t)
        out = sched.schedule(t)
        tokens = check_and_sample(sched, out)
        t += 1
        sched.update(out, tokens, t)
        steps.append(out)
        assert len(steps) < max_steps
    return steps


def expected_output(prompt, max_tokens):
    """What any correct scheduler must produce for a request (no stop tokens)."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(context_token(tokens))
    return tokens[len(prompt):]
