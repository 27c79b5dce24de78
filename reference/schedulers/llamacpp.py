"""llama-server's slot loop with its prompt caches, as the vendored llama.cpp (commit 0c1e570) does it.

SequentialScheduler is the slots-and-queue policy; this subclass adds what llama-server does
beyond it, each read from tools/server/server-context.cpp:

- Slot choice (get_available_slot): among idle slots holding cached tokens, the one whose
  longest common prefix (LCP) with the new prompt is the largest share of the prompt, if above
  slot_prompt_similarity (default 0.1); otherwise the least recently used idle slot (ties go to
  the last slot in order: `slot.t_last_used <= t_last`, all -1 at start).
- Prompt cache (cache_prompt, default on): a slot keeps the tokens of its last request (prompt
  and generated tokens but the last) after it is released; a new prompt in that slot recomputes
  only what follows their LCP (update_slots, SLOT_STATE_STARTED: n_past = get_common_prefix), and
  at least one token (n_past = n_tokens - 1 when the whole prompt matches, [TAG_PROMPT_LOGITS]).
- RAM prompt cache (--cache-ram, default 8 GiB; server-task.cpp server_prompt_cache): when a slot
  is chosen by LRU (or by LCP keeping under half of its tokens) its tokens are saved, and the
  cached prompt with the best LCP replaces them (and leaves the cache) if it keeps at least a
  quarter of that cached prompt (f_keep >= 0.25) and beats the slot's own on both shares (load).
  With cache_idle_slots (default on) every idle slot is saved when a task starts. A save is
  skipped when a cached prompt already starts with it, and removes cached prompts it starts
  with (alloc); past ram_cache_tokens (the byte limit over the K/V bytes per token) the oldest
  go first (update).
- Batch order (pre_decode): every generating slot's sampled token first, then prompt tokens of
  the slots still processing their prompt, in slot order (not arrival order), until n_batch.
- Waiting (queue_tasks.defer / pop_deferred_task): a request with no idle slot waits FIFO and
  takes the next slot released; llama-server itself has no queue limit (Ollama's 512 is
  max_queue).

What is not modelled: n_cache_reuse chunk shifting (off by default), context shift (off by
default: generation stops at the slot's context; here such a request is refused at arrival, as
SequentialScheduler does), speculative decoding, multimodal chunks.
"""
from __future__ import annotations

from collections import OrderedDict

from reference.batch import SchedulerOutput
from reference.errors import ConfigError
from reference.request import Request
from reference.schedulers.sequential import SequentialScheduler

SLOT_PROMPT_SIMILARITY = 0.1  # common/common.h: slot_prompt_similarity
RAM_CACHE_MIN_KEEP = 0.25  # server-task.cpp server_prompt_cache::load: "don't trash large prompts"
UPDATE_CACHE_BELOW_KEEP = 0.5  # get_available_slot: a slot chosen by LCP keeping less than this saves its prompt


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaServerScheduler(SequentialScheduler):
    """llama-server's slots: choice by prompt similarity or LRU, per-slot and RAM prompt caches, slot-order batches."""

    def __init__(self, num_parallel: int = 1, num_ctx: int = 4096, max_queue: int = 0, n_batch: int = 2048,
                 slot_prompt_similarity: float = SLOT_PROMPT_SIMILARITY, ram_cache_tokens: int = 1 << 20):
        """ram_cache_tokens: tokens the RAM prompt cache holds (0 = no RAM cache, llama-server --cache-ram 0)."""
        super().__init__(num_parallel, num_ctx, max_queue, n_batch)
        if not 0.0 <= slot_prompt_similarity < 1.0:
            raise ConfigError("slot_prompt_similarity", f"must be in [0, 1), got {slot_prompt_similarity!r}")
        if not isinstance(ram_cache_tokens, int) or ram_cache_tokens < 0:
            raise ConfigError("ram_cache_tokens", f"must be an integer >= 0, got {ram_cache_tokens!r}")
        self.slot_prompt_similarity = slot_prompt_similarity
        self.ram_cache = ram_cache_tokens > 0
        self.ram_cache_tokens = ram_cache_tokens
        self.slot_tokens: list[tuple[int, ...]] = [()] * num_parallel  # what each slot's KV holds
        self.t_last_used: list[int] = [-1] * num_parallel  # release order (a counter, as ggml_time_us orders them)
        self.ram: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # the RAM cache's prompts, oldest first
        self._ram_by_first: dict[int, list[int]] = {}  # first token -> entry ids (an LCP > 0 needs it)
        self._ram_tokens = 0
        self._next_entry = 0
        self._releases = 0
        self.num_cached_tokens = 0  # prompt tokens reused from a cache (llamacpp:prompt_tokens_cached_total)

    # ---- slot choice (get_available_slot) --------------------------------------------------
    def _choose_slot(self, prompt: list[int]) -> int:
        idle = sorted(self.free_slots)
        best, best_sim = None, 0.0
        if self.slot_prompt_similarity > 0:
            for s in idle:
                if not self.slot_tokens[s]:
                    continue
                sim = common_prefix(self.slot_tokens[s], prompt) / len(prompt)
                if sim > best_sim and sim > self.slot_prompt_similarity:
                    best, best_sim = s, sim
        update_cache = False
        if best is not None:
            held = len(self.slot_tokens[best])
            update_cache = best_sim * len(prompt) / held < UPDATE_CACHE_BELOW_KEEP
        else:
            t_last = -1
            for s in idle:  # the least recently used; on ties the last one in slot order
                if best is None or self.t_last_used[s] <= t_last:
                    best, t_last = s, self.t_last_used[s]
            update_cache = True
        if update_cache and self.ram_cache:
            self._save(self.slot_tokens[best])
            self._load(best, prompt)
        return best

    def _save(self, tokens: tuple[int, ...]) -> None:
        """server_prompt_cache::alloc + update: keep tokens unless a cached prompt starts with them."""
        if not tokens:
            return
        same_start = self._ram_by_first.get(tokens[0], [])
        if any(common_prefix(self.ram[e], tokens) == len(tokens) for e in same_start):
            return
        for e in [e for e in same_start if common_prefix(self.ram[e], tokens) == len(self.ram[e])]:
            self._drop(e)  # obsolete: the new prompt starts with it
        self.ram[self._next_entry] = tokens
        self._ram_by_first.setdefault(tokens[0], []).append(self._next_entry)
        self._ram_tokens += len(tokens)
        self._next_entry += 1
        while self._ram_tokens > self.ram_cache_tokens and self.ram:
            self._drop(next(iter(self.ram)))  # the oldest first

    def _drop(self, entry: int) -> None:
        tokens = self.ram.pop(entry)
        self._ram_by_first[tokens[0]].remove(entry)
        self._ram_tokens -= len(tokens)

    def _load(self, slot: int, prompt: list[int]) -> None:
        """server_prompt_cache::load: the cached prompt that keeps the most of itself and of the new prompt."""
        own = self.slot_tokens[slot]
        lcp = common_prefix(own, prompt)
        keep_best = lcp / len(own) if own else -1.0
        sim_best = lcp / len(prompt)
        chosen = None
        for e in self._ram_by_first.get(prompt[0], ()):
            entry = self.ram[e]
            n = common_prefix(entry, prompt)
            keep, sim = n / len(entry), n / len(prompt)
            if keep < RAM_CACHE_MIN_KEEP:
                continue
            if keep_best < keep and sim_best < sim:
                keep_best, sim_best, chosen = keep, sim, e
        if chosen is not None:
            self.slot_tokens[slot] = self.ram[chosen]
            self._drop(chosen)  # its state moves into the slot

    # ---- the loop ----------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        """Launch waiting requests into idle slots, then one update_slots batch within n_batch."""
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            prompt = req.prompt_token_ids
            slot = self._choose_slot(prompt)
            self.free_slots.remove(slot)
            self.slot_of[req.request_id] = slot
            if self.ram_cache:  # cache_idle_slots: every idle slot is saved when a task starts
                for s in self.free_slots:
                    self._save(self.slot_tokens[s])
            n_past = common_prefix(self.slot_tokens[slot], prompt)
            n_past = min(n_past, len(prompt) - 1)  # at least one token is computed, for its logits
            req.num_computed_tokens = n_past
            if req.first_scheduled_time is None:
                req.num_cached_prompt_tokens = n_past
            self.num_cached_tokens += n_past
            self.slot_tokens[slot] = tuple(prompt[:n_past])
            self._start(req, now)
        # update_slots walks the slots in slot order, so prompt tokens are batched in that order.
        return self._batch(sorted(self.running, key=lambda r: self.slot_of[r.request_id]))

    def _release_kv(self, req: Request) -> None:
        slot = self.slot_of[req.request_id]
        # The slot keeps what its KV holds: the prompt and the generated tokens fed back (all but the last).
        self.slot_tokens[slot] = tuple(req.token_ids(0, req.num_computed_tokens))
        self._releases += 1
        self.t_last_used[slot] = self._releases
        super()._release_kv(req)

    def describe(self) -> str:
        """Slots, their size, the caches."""
        return (f"llama-server: {self.layout.num_slots} slots x {self.layout.max_len} tokens, prompt cache per slot"
                f"{' and in RAM' if self.ram_cache else ''}, slot choice by prompt similarity > "
                f"{self.slot_prompt_similarity:g} else LRU")
