"""A float64 series that may outgrow memory, with numpy's exact sum and percentile over it.

FloatSpool holds appended values in memory up to `memory_limit` values, then moves them to an
anonymous temporary file and appends there; its memory stays O(memory_limit) however long the
series. Its reductions give the very floats numpy gives over the whole series held as one
contiguous array, so a summary computed from a spool is byte-identical to one computed in memory:

- sum(): np.add.reduce's pairwise summation (numpy's loops_utils: blocks of <= 128 values summed
  with 8 accumulators, longer runs split at n // 2 rounded down to a multiple of 8). The split is
  followed down to runs of <= `memory_limit` values, and each run is summed by numpy itself: numpy
  gives a contiguous run the same tree it gives that run inside the whole array
  (tests/test_float_spool.py checks this against np.sum);
- percentile(q): np.percentile(x, q) with the default 'linear' method: the two order statistics
  around the virtual index (n - 1) * (q / 100), found by an exact out-of-core radix selection on
  the values' order-preserving 64-bit keys (16 bits a pass, until the candidates fit in memory),
  then numpy's _lerp arithmetic, operation for operation.

NaN is not allowed in a spool (callers filter it, as the summary does before every statistic);
-0.0 and +0.0 are different keys, equal values, so either may be selected, as in np.partition.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator

import numpy as np

PW_BLOCK_MULTIPLE = 8  # numpy's pairwise summation splits at multiples of its unroll factor
PW_BLOCKSIZE = 128  # numpy sums a run this long or shorter without splitting it: a spool reads at least this many
DIGIT_BITS = 16  # key bits resolved per selection pass
_SIGN = np.uint64(1 << 63)


class FloatSpool:
    """Append-only float64 values, in memory up to memory_limit values, on a temporary file beyond."""

    def __init__(self, memory_limit: int = 1 << 17):
        self.memory_limit = max(PW_BLOCKSIZE, int(memory_limit))
        self._memory: list[np.ndarray] = []
        self._in_memory = 0
        self._file = None  # an anonymous temporary file once the values outgrow memory_limit
        self._on_file = 0

    def __len__(self) -> int:
        return self._on_file + self._in_memory

    def append(self, values: np.ndarray) -> None:
        """Add float64 values at the end (NaN only in a spool that is summed, never ranked)."""
        x = np.ascontiguousarray(values, dtype=np.float64)
        if x.size == 0:
            return
        self._memory.append(x.copy())
        self._in_memory += x.size
        if self._in_memory > self.memory_limit:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="servesim-spool-")
        self._file.seek(0, 2)
        for x in self._memory:
            self._file.write(x.tobytes())
        self._on_file += self._in_memory
        self._memory, self._in_memory = [], 0

    def close(self) -> None:
        """Drop the values and the temporary file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory, self._in_memory, self._on_file = [], 0, 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values [start, stop) as a new contiguous array (stop - start <= memory_limit is the caller's care)."""
        parts, i = [], start
        if i < min(stop, self._on_file):
            end = min(stop, self._on_file)
            self._file.seek(8 * i)
            parts.append(np.frombuffer(self._file.read(8 * (end - i)), dtype=np.float64))
            i = end
        offset = self._on_file
        for x in self._memory:
            if i >= stop:
                break
            if i < offset + x.size:
                parts.append(x[i - offset:min(stop, offset + x.size) - offset])
                i = min(stop, offset + x.size)
            offset += x.size
        if not parts:
            return np.empty(0)
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def chunks(self) -> Iterator[np.ndarray]:
        """The values in order, memory_limit at a time."""
        for start in range(0, len(self), self.memory_limit):
            yield self.read(start, min(len(self), start + self.memory_limit))

    # -- reductions --------------------------------------------------------------------

    def sum(self) -> float:
        """np.add.reduce over all values, the same float (module docstring)."""
        return self._pairwise(0, len(self))

    def _pairwise(self, start: int, n: int) -> float:
        if n <= self.memory_limit:
            return float(np.add.reduce(self.read(start, start + n))) if n else 0.0
        n2 = n // 2
        n2 -= n2 % PW_BLOCK_MULTIPLE
        return self._pairwise(start, n2) + self._pairwise(start + n2, n - n2)

    def mean(self) -> float:
        """np.mean over all values (NaN when empty)."""
        n = len(self)
        return self.sum() / n if n else math.nan

    def percentile(self, q: float) -> float:
        """np.percentile(values, q), method 'linear', the same float (NaN when empty)."""
        return self.percentiles([q])[0]

    def percentiles(self, qs: list[float]) -> list[float]:
        """percentile(q) for each q, sharing the selection passes."""
        n = len(self)
        if n == 0:
            return [math.nan] * len(qs)
        plan = []
        for q in qs:
            virtual = (n - 1) * (q / 100)  # numpy: q = true_divide(q, 100); (n - 1) * quantiles
            prev = math.floor(virtual)
            if virtual >= n - 1:  # numpy's _get_indexes: past the last index, both neighbours are the last
                lo = hi = n - 1
                prev = -1
            elif virtual < 0:
                lo = hi = prev = 0
            else:
                lo, hi = prev, prev + 1
            plan.append((virtual, prev, lo, hi))
        stats = self.order_statistics({r for _, _, lo, hi in plan for r in (lo, hi)})
        out = []
        for virtual, prev, lo, hi in plan:
            a, b = stats[lo], stats[hi]
            t = virtual - prev  # numpy's _get_gamma
            diff = b - a  # numpy's _lerp, operation for operation
            out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
        return out

    def order_statistics(self, ranks: set[int]) -> dict[int, float]:
        """{r: the r-th smallest value (0-based)} by exact radix selection, O(memory_limit) memory."""
        n = len(self)
        if any(not 0 <= r < n for r in ranks):
            raise IndexError(f"ranks {sorted(ranks)} out of [0, {n})")
        # Each rank's candidates: keys whose top (64 - shift) bits equal prefix; its rank among them; their count.
        todo = {r: (64, 0, r, n) for r in ranks}
        found: dict[int, float] = {}
        while todo:
            groups: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
            for r, (shift, prefix, k, count) in todo.items():
                if shift == 0:  # one key left: the value itself
                    found[r] = _value_of_key(prefix)
                else:
                    groups.setdefault((shift, prefix, count), []).append((r, k))
            todo = {}
            gather = {g: [] for g in groups if g[2] <= self.memory_limit}
            hist = {g: np.zeros(1 << DIGIT_BITS, dtype=np.int64) for g in groups if g not in gather}
            for x in (self.chunks() if groups else ()):
                keys = _keys(x)
                for g in groups:
                    shift, prefix, _ = g
                    mask = None if shift == 64 else (keys >> np.uint64(shift)) == np.uint64(prefix)
                    if g in gather:
                        gather[g].append(x if mask is None else x[mask])
                    else:
                        sel = keys if mask is None else keys[mask]
                        digits = (sel >> np.uint64(shift - DIGIT_BITS)) & np.uint64((1 << DIGIT_BITS) - 1)
                        hist[g] += np.bincount(digits.astype(np.int64), minlength=1 << DIGIT_BITS)
            for g, parts in gather.items():
                values = np.sort(np.concatenate(parts))
                for r, k in groups[g]:
                    found[r] = float(values[k])
            for g, h in hist.items():
                shift, prefix, _ = g
                cum = np.cumsum(h)
                for r, k in groups[g]:
                    digit = int(np.searchsorted(cum, k, side="right"))
                    below = int(cum[digit - 1]) if digit else 0
                    todo[r] = (shift - DIGIT_BITS, (prefix << DIGIT_BITS) | digit, k - below, int(h[digit]))
        return found


def _keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 keys of float64 values: flip every bit of negatives, the sign bit of the rest."""
    u = x.view(np.uint64)
    return np.where(u & _SIGN, ~u, u | _SIGN)


def _value_of_key(key: int) -> float:
    """The float64 whose _keys is key."""
    u = key & ~(1 << 63) if key >> 63 else ~key & ((1 << 64) - 1)
    return float(np.array([u], dtype=np.uint64).view(np.float64)[0])
