"""Decoding requests advanced together, one token each per step, in O(1) per step.

Under the continuous and slot policies every running request that has sampled its first token
decodes exactly one token every step (see sim.core.fast.continuous for why), so its context grows
by one per step. A decoder that joins before step k0 with T0 tokens (prompt + outputs) has, after
step k >= k0, a context of T0 + (k - k0) = key + k tokens (key = T0 - k0), and writes position
T0 - 1 + (k - k0). So the step's aggregates (how many decode, the sum and the maximum of their
contexts) follow from the sum of keys and a max-heap of keys; the decoders that start a new KV
block at step k are those of one phase, (k0 - T0 + 1) mod block_size; the step where a decoder
reaches max_tokens is known when it joins.

Per-request records (output token ids, token times, num_computed_tokens) are written when a
decoder leaves the group (finish, preemption, abort): its token times are a slice of the step
end times (`times`), one per step it decoded.
"""
from __future__ import annotations

import heapq
from array import array

from reference.request import Request
from sim.core.replica import SIM_TOKEN

_TRIM_EVERY = 1 << 16  # step times kept before dropping the ones no decoder needs any more
_COMPACT_SLACK = 1024  # stale heap entries beyond the member count before the heap is rebuilt (amortized O(1))


class Decoder:
    """One request in the group: what it was when it joined (step k0) and when it finishes."""

    __slots__ = ("req", "seq", "k0", "t0", "out0", "key", "phase", "k_fin", "exact", "active")

    def __init__(self, req: Request, seq: int, k0: int, block_size: int, exact: bool):
        t0 = req.num_tokens
        self.req = req
        self.seq = seq  # position in the running order (admission counter): lower runs first
        self.k0 = k0
        self.t0 = t0
        self.out0 = req.num_output_tokens
        self.key = t0 - k0  # context after step k = key + k
        self.phase = (k0 - t0 + 1) % block_size  # starts a new block at steps k with k % block_size == phase
        if SIM_TOKEN in req.sampling.stop_token_ids:
            raise ValueError(f"{req.request_id}: the simulator's token {SIM_TOKEN} is a stop token")
        self.k_fin = k0 + req.sampling.max_tokens - self.out0 - 1  # the step whose token is its last
        self.exact = exact  # its blocks are tracked one by one (the pool needs each new block)
        self.active = True

    def position_at(self, k: int) -> int:
        """The position it writes at step k (its num_computed_tokens before the step)."""
        return self.t0 - 1 + k - self.k0


class DecodeGroup:
    """The decoding requests of one scheduler; steps are numbered 0, 1, ... as they are scheduled."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.next_step = 0  # index of the next step to schedule
        self.last_scheduled = -1  # index of the last step scheduled (in flight until its update)
        self.members: dict[int, Decoder] = {}  # id(request) -> its decoder
        self.sum_key = 0
        self._heap: list[tuple[int, int, Decoder]] = []  # (-key, seq, decoder), stale entries dropped lazily
        self._stale = 0  # an upper bound on the heap's entries of decoders that left
        self._by_phase: list[dict[int, Decoder]] = [{} for _ in range(block_size)]  # seq -> decoder, by phase
        self._exact_by_phase: list[dict[int, Decoder]] = [{} for _ in range(block_size)]  # seq -> exact decoder
        self.num_exact = 0
        self._finish_at: dict[int, list[Decoder]] = {}
        self.times = array("d")  # end time (s) of step base + i
        self.base = 0

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, req: Request) -> bool:
        return id(req) in self.members

    # ---- membership --------------------------------------------------------------------------
    def join(self, req: Request, seq: int, exact: bool = False) -> Decoder:
        """req (its first token sampled, not finished) decodes from the next step on."""
        d = Decoder(req, seq, self.next_step, self.block_size, exact)
        self.members[id(req)] = d
        self.sum_key += d.key
        heapq.heappush(self._heap, (-d.key, seq, d))
        self._by_phase[d.phase][seq] = d
        if exact:
            self._exact_by_phase[d.phase][seq] = d
            self.num_exact += 1
        self._finish_at.setdefault(d.k_fin, []).append(d)
        return d

    def leave(self, req: Request) -> Decoder:
        """Take req out of the group and write its record up to the last step whose update ran."""
        d = self.members.pop(id(req))
        d.active = False
        self.sum_key -= d.key
        del self._by_phase[d.phase][d.seq]
        if d.exact:
            del self._exact_by_phase[d.phase][d.seq]
            self.num_exact -= 1
        self.settle(d)
        d.req = None  # its stale heap and finish-list entries must not keep the request (and its token times) alive
        self._stale += 1
        if self._stale > len(self.members) + _COMPACT_SLACK:
            self._heap = [e for e in self._heap if e[2].active]
            heapq.heapify(self._heap)
            self._stale = len(self._heap) - len(self.members)
        return d

    def settle(self, d: Decoder) -> None:
        """Write the decoder's outputs, token times and num_computed_tokens as of the last completed step."""
        completed = self.next_step - 1  # a step in flight (begun, not ended) has index next_step
        req = d.req
        have = req.num_output_tokens - d.out0  # already written by an earlier settle
        m = completed - d.k0 + 1  # steps it decoded
        if m > have:
            req.output_token_ids.extend([SIM_TOKEN] * (m - have))
            req.token_times.extend(self.times[d.k0 + have - self.base:completed + 1 - self.base])
        req.num_computed_tokens = d.t0 - 1 + max(m, 0)

    def fill_end(self, d: Decoder) -> int:
        """Positions its KV blocks cover: its context after the last scheduled step."""
        return d.key + max(self.last_scheduled, d.k0 - 1)

    # ---- one step ----------------------------------------------------------------------------
    def crossing(self, k: int) -> int:
        """Decoders that start a new KV block at step k."""
        return len(self._by_phase[k % self.block_size])

    def crossing_decoders(self, k: int) -> list[Decoder]:
        """The decoders that start a new KV block at step k, in running order."""
        group = self._by_phase[k % self.block_size]
        return [group[s] for s in sorted(group)] if group else []

    def exact_crossing(self, k: int) -> list[Decoder]:
        """The exact decoders that start a new KV block at step k, in running order."""
        group = self._exact_by_phase[k % self.block_size]
        return [group[s] for s in sorted(group)] if group else []

    def max_key(self) -> int:
        """The largest key among members (their number must be > 0)."""
        heap = self._heap
        while not heap[0][2].active:
            heapq.heappop(heap)
        return -heap[0][0]

    def context_sum(self, k: int) -> int:
        """Sum over members of their context after step k."""
        return self.sum_key + len(self.members) * k

    def begin(self) -> int:
        """Step next_step is scheduled (in flight); returns its index."""
        self.last_scheduled = self.next_step
        return self.last_scheduled

    def end(self, now: float) -> list[Decoder]:
        """Step last_scheduled ended at now (s): every member got a token; returns the members it finished, in running order."""
        k = self.last_scheduled
        self.times.append(now)
        self.next_step = k + 1
        done = self._finish_at.pop(k, None)
        if len(self.times) >= _TRIM_EVERY and (k & (_TRIM_EVERY - 1)) == 0:
            self._trim()
        if not done:
            return []
        done = [d for d in done if d.active]
        if len(done) > 1:
            done.sort(key=_by_seq)
        return done

    def _trim(self) -> None:
        """Drop step times older than the oldest member's first decode (memory flat in the number of steps)."""
        keep_from = min((d.k0 for d in self.members.values()), default=self.next_step)
        cut = keep_from - self.base
        if cut > 0:
            del self.times[:cut]
            self.base = keep_from


def _by_seq(d: Decoder) -> int:
    return d.seq
