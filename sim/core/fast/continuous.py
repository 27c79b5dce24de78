"""reference.schedulers.continuous.ContinuousScheduler's policy at a cost per event, not per token.

The same decisions as the teaching scheduler (its module docstring is the policy), made from
aggregates. What makes that possible, given max_num_seqs <= max_num_batched_tokens:
- Every running request is scheduled every step. Running requests are served in order, one token
  per decoder; at most max_num_seqs - 1 decoders precede any other, so the budget never runs out
  before the last one.
- At most one running request is mid-prompt (the `partial`), and it is the newest: a request is
  admitted only while budget is left, which means every running request before it got all it
  asked for.
- So a step is: every decoder (the decode group, sim.core.fast.decode_group) + the partial's next
  chunk + admissions from the queue (FCFS, while budget, max_num_seqs and blocks allow). The
  decoders that need a new block are counted by phase; when the pool holds enough for all of
  them the step costs O(1) plus its admissions. When it does not, the running requests are
  walked in order exactly as the teaching scheduler walks them, preempting the newest.
- Blocks: sim.core.fast.pool.HybridPool (exact where prefix caching can hit, counted where not).

The replica drives it like the teaching scheduler: add, schedule -> FastStep, update(step, None,
now), abort. Requests in the decode group have their records written when they leave it.
"""
from __future__ import annotations

import itertools
from collections import deque

from reference.errors import ConfigError
from reference.layout import KVUsage, PagedLayout
from reference.request import Outcome, Request, Status
from reference.schedulers.base import QueueCounts
from reference.schedulers.continuous import ContinuousScheduler
from sim.core.fast.decode_group import SIM_TOKEN, DecodeGroup
from sim.core.fast.pool import ALL_BLOCKS, Holding, HybridPool
from sim.core.fast.step import FastStep, empty_step, step_shape


class FastContinuousScheduler(QueueCounts):
    """Continuous batching over a paged pool, event-driven; decision-identical to ContinuousScheduler."""

    event_driven = True  # the replica feeds it update(step, None, now): every generated token is SIM_TOKEN

    def __init__(self, num_blocks: int, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 8192,
                 enable_chunked_prefill: bool = True, enable_prefix_caching: bool = True, max_queue: int = 0):
        # The teaching scheduler validates the configuration (and is the policy's definition).
        teaching = ContinuousScheduler(num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len,
                                       enable_chunked_prefill, enable_prefix_caching, max_queue)
        if max_num_seqs > max_num_batched_tokens:
            raise ConfigError("max_num_seqs", f"{max_num_seqs} > max_num_batched_tokens={max_num_batched_tokens}: "
                              "decoders could run out of budget, which the fast path does not model",
                              f"<= {max_num_batched_tokens} (or run the teaching path)")
        self._describe = teaching.describe()
        self.layout = PagedLayout(num_blocks, block_size)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.enable_chunked_prefill = enable_chunked_prefill
        self.pool = HybridPool(num_blocks, block_size, enable_prefix_caching)
        self.group = DecodeGroup(block_size)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # id(request) -> request, in running order (oldest first)
        self.prefilling: dict[int, tuple[Request, int]] = {}  # running, not decoding: id -> (request, seq)
        self.partial: Request | None = None  # the running request mid-prompt between steps, if any
        self.holdings: dict[int, Holding] = {}  # id(request) -> its place in the pool (running or looked up)
        self.num_preemptions = 0
        self._seq = itertools.count()

    @classmethod
    def like(cls, s: ContinuousScheduler) -> FastContinuousScheduler:
        """The fast twin of a (fresh) teaching scheduler, same configuration."""
        return cls(s.blocks.num_blocks, s.layout.block_size, s.max_num_seqs, s.max_num_batched_tokens,
                   s.max_model_len, s.enable_chunked_prefill, s.blocks.enable_prefix_caching, s.max_queue)

    # ---- the Scheduler interface ---------------------------------------------------------------
    def describe(self) -> str:
        """As the teaching scheduler says it."""
        return self._describe

    def add(self, req: Request, now: float) -> bool:
        """Queue the request; refuse it when it can never run (ContinuousScheduler.add)."""
        need = req.max_total_tokens
        if need > self.max_model_len:
            return _refuse(req, now, f"prompt + max_tokens = {need} exceeds max_model_len={self.max_model_len}")
        blocks = self.layout.blocks_for(need)
        if blocks > self.layout.num_usable_blocks:
            return _refuse(req, now, f"needs {blocks} KV blocks, the pool has {self.layout.num_usable_blocks}")
        if self.max_queue and len(self.waiting) >= self.max_queue:
            return _refuse(req, now, f"server busy: {len(self.waiting)} requests queued (max_queue={self.max_queue})")
        self.waiting.append(req)
        return True

    def kv_usage(self) -> KVUsage:
        """Blocks reserved by running requests versus tokens they hold (BlockManager.usage)."""
        g, bs = self.group, self.block_size
        stored = g.sum_key + len(g) * g.last_scheduled if len(g) else 0
        for req, _ in self.prefilling.values():
            stored += self.holdings[id(req)].fill_end
        stored -= bs * self.pool.dup
        return KVUsage(self.layout.num_usable_blocks * bs, self.pool.reserved_blocks() * bs, stored)

    def kv_usage_perc(self) -> float:
        """The reserved share of capacity (vLLM's kv_cache_usage_perc / 100)."""
        return self.kv_usage().usage_fraction

    # ---- scheduling -------------------------------------------------------------------------------
    def schedule(self, now: float) -> FastStep:
        """One step: the decoders, the partial's next chunk, then admissions if no one was preempted."""
        g, pool, bs = self.group, self.pool, self.block_size
        k = g.next_step
        budget = self.max_num_batched_tokens
        preempted: list[Request] = []
        specials: list[tuple[Request, int, int]] = []
        partial = self.partial
        n_dec = len(g)
        need = g.crossing(k) if n_dec else 0
        p_new = p_need = 0
        if partial is not None:
            hold_p = self.holdings[id(partial)]
            p_new = min(partial.num_tokens - partial.num_computed_tokens, budget - n_dec)
            p_need = -(-(partial.num_computed_tokens + p_new) // bs) - hold_p.nblocks
        if need + p_need <= pool.free_total:
            if need:
                exact = g.exact_crossing(k) if g.num_exact else ()
                pool.pop(need - len(exact))
                for d in exact:
                    pool.grow(self.holdings[id(d.req)], 1, d.position_at(k) // bs)
            if partial is not None:
                self._extend(partial, hold_p, p_new, p_need, specials)
            budget -= n_dec + p_new
        else:
            budget = self._schedule_running_short_of_blocks(k, budget, preempted, specials)
        if not preempted:
            self._admit(now, budget, specials)
        n_dec = len(g)
        if not n_dec and not specials:
            return empty_step(k, preempted)
        shape = step_shape(n_dec, g.context_sum(k), g.max_key() + k if n_dec else 0, specials)
        return FastStep(g.begin(), n_dec, specials, preempted, shape)

    def _extend(self, req: Request, hold: Holding, num_new: int, need: int, specials: list) -> None:
        """The partial's next chunk of num_new tokens, with need more blocks."""
        self.pool.grow(hold, need, hold.nblocks)
        hold.nblocks += need
        start = req.num_computed_tokens
        hold.fill_end = start + num_new
        specials.append((req, start, num_new))

    def _schedule_running_short_of_blocks(self, k: int, budget: int, preempted: list, specials: list) -> int:
        """The teaching scheduler's running loop when the pool is short, preempting the newest as blocks run out.

        That loop walks every running request in order. The running requests are the decoders, then
        the partial (the newest); a decoder starting no block at step k takes nothing from the pool
        and one token of budget, which never runs out before the partial (max_num_seqs <=
        max_num_batched_tokens). So only the decoders that start a block at step k are visited, in
        running order, then the partial: the same pool operations in the same order. Victims are the
        newest (the tail of `running`), so the walk ends at the first request preempted, and everyone
        still running was visited.
        """
        g, pool, bs, running = self.group, self.pool, self.block_size, self.running
        if len(running) != len(g) + (self.partial is not None):
            raise AssertionError("a running request neither decoding nor the partial: the fast path's invariant is broken")
        needers = g.crossing_decoders(k)
        i, n = 0, len(needers)
        while i < n:
            d = needers[i]
            if not d.active:
                return budget - len(g)  # preempted as a victim: so is everyone after it
            if pool.free_total < 1:
                victim = running[next(reversed(running))]
                self._preempt(victim, preempted)
                if victim is d.req:
                    return budget - len(g)
                continue
            # The next free_total needers get their block with no preemption in between; taking n blocks at once
            # is taking one n times (uncached first, then least recently used), so the plain ones pop together.
            stop, plain = min(n, i + pool.free_total), 0
            while i < stop:
                d = needers[i]
                if not d.active:
                    break
                if d.exact:
                    pool.grow(self.holdings[id(d.req)], 1, d.position_at(k) // bs)
                else:
                    plain += 1
                i += 1
            pool.pop(plain)
        budget -= len(g)
        req = self.partial
        if req is None:
            return budget
        hold = self.holdings[id(req)]
        num_new = min(req.num_tokens - req.num_computed_tokens, budget)
        need = -(-(req.num_computed_tokens + num_new) // bs) - hold.nblocks
        if need > pool.free_total:  # the partial is the newest: the first victim is itself
            self._preempt(req, preempted)
            return budget
        self._extend(req, hold, num_new, need, specials)
        return budget - num_new

    def _admit(self, now: float, budget: int, specials: list) -> None:
        """Waiting requests FCFS while the budget, max_num_seqs and the pool allow, with their prefix-cache hits."""
        pool, bs = self.pool, self.block_size
        waiting, running = self.waiting, self.running
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            req = waiting[0]
            rid = id(req)
            hold = self.holdings.get(rid)
            if hold is None:
                hold = self.holdings[rid] = pool.holding(getattr(req, "unique_from", None))
            num_tokens = req.num_tokens
            hits, runs, private_hits = pool.lookup(hold, req, (num_tokens - 1) // bs)
            num_computed = (len(hits) + private_hits) * bs
            num_new = num_tokens - num_computed
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            if not pool.admit(hold, hits, runs, private_hits, -(-(num_computed + num_new) // bs)):
                break
            waiting.popleft()
            if req.first_scheduled_time is None:
                req.num_cached_prompt_tokens = num_computed
                req.first_scheduled_time = now
            req.num_computed_tokens = num_computed
            req.status = Status.RUNNING
            running[rid] = req
            self.prefilling[rid] = (req, next(self._seq))
            hold.fill_end = num_computed + num_new
            specials.append((req, num_computed, num_new))
            budget -= num_new

    def _preempt(self, req: Request, preempted: list) -> None:
        """Free the request's blocks and put it back at the head of the queue (ContinuousScheduler._preempt)."""
        self._release(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        preempted.append(req)

    def _release(self, req: Request, keep_holding: bool = True) -> None:
        """Take a running request out (its record written) and free its blocks."""
        rid = id(req)
        del self.running[rid]
        hold = self.holdings[rid] if keep_holding else self.holdings.pop(rid)
        g = self.group
        d = g.members.get(rid)
        if d is not None:
            fill_end = g.fill_end(d)
            g.leave(req)
        else:
            fill_end = hold.fill_end
            del self.prefilling[rid]
            if self.partial is req:
                self.partial = None
        self.pool.free(hold, fill_end, req.num_computed_tokens)

    # ---- after a step ---------------------------------------------------------------------------
    def update(self, step: FastStep, tokens: list[int] | None, now: float) -> list[Request]:
        """Apply a finished step (every sampled token is SIM_TOKEN; `tokens` is ignored); returns who finished.

        Runs once per step: Request.append_token and is_done_generating are inlined (the sampled
        token is SIM_TOKEN, never a stop token of a request that reaches here, see Decoder).
        """
        specials = step.specials
        if not step.num_decodes and not specials:
            return []
        g, pool, holdings = self.group, self.pool, self.holdings
        done = g.end(now)
        if g.num_exact:  # exact decoders whose block just filled register it, in running order
            k = step.index
            for d in g.exact_crossing(k + 1):
                pool.register(holdings[id(d.req)], d.req, d.position_at(k) + 1)
        finished = [d.req for d in done] if done else []
        partial = None
        running = Status.RUNNING
        for req, start, n in specials:
            if req.status is not running:
                continue  # aborted while the step ran
            end = start + n
            req.num_computed_tokens = end
            hold = holdings[id(req)]
            if hold.n_exact or hold.runs:
                pool.register(hold, req, end)
            if end == req.num_tokens:  # the chunk reached its last token: it samples one
                if req.first_token_time is None:
                    req.first_token_time = now
                out = req.output_token_ids
                out.append(SIM_TOKEN)
                req.token_times.append(now)
                if len(out) >= req.sampling.max_tokens or SIM_TOKEN in req.sampling.stop_token_ids:
                    finished.append(req)
                else:
                    _, seq = self.prefilling.pop(id(req))
                    g.join(req, seq, exact=hold.n_exact >= ALL_BLOCKS)
            else:
                if partial is not None:
                    raise AssertionError("two running requests mid-prompt: the fast path's invariant is broken")
                partial = req
        self.partial = partial
        for req in finished:
            self._release(req, keep_holding=False)
            req.finish(Outcome.COMPLETED, now)
        return finished

    def abort(self, req: Request, now: float, outcome: Outcome, reason: str = "") -> None:
        """End a request early wherever it is and free its KV (Scheduler.abort)."""
        if req.status is Status.FINISHED:
            return
        if req.status is Status.RUNNING:
            self._release(req, keep_holding=False)
        else:
            self.waiting.remove(req)
            self.holdings.pop(id(req), None)
        req.finish(outcome, now, reason)

    # ---- inspection (tests) --------------------------------------------------------------------
    def settle(self) -> None:
        """Write every decoding request's record up to the last completed step (for inspection)."""
        for d in self.group.members.values():
            self.group.settle(d)

    def blocks_held(self, req: Request) -> int:
        """Blocks in the request's table now."""
        d = self.group.members.get(id(req))
        if d is not None:
            return -(-self.group.fill_end(d) // self.block_size)
        return self.holdings[id(req)].nblocks


def _refuse(req: Request, now: float, reason: str) -> bool:
    req.finish(Outcome.REFUSED, now, reason)
    return False
