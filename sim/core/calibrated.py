"""The calibrated cost model: a linear law fitted to step latencies measured on the reference engine or a server.

A non-negative least-squares fit to a step-latency table that `servesim profile` measured. For
the reference engine its features are the sizes of the padded arrays the reference runner
builds for the step (reference.buckets: decode rows x padded context, query tiles x padded
context, flat tokens, output rows), because the runner computes its padded shapes, not the
batch's real tokens. A server profiled as a black box (`servesim profile --url`, profile
metadata `shapes: server`) pads nothing of the reference runner's: its law prices the step's
real tokens, sequences and attention work (ServerShapes), with at most the server's own
rounding of the K/V it reads (`context_pad`).

Plain Python + numpy (fitting only) + pandas (reading the table), no JAX.
"""
from __future__ import annotations

import bisect
import io
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reference.batch import StepShape
from reference.buckets import Padding
from reference.errors import ConfigError
from reference.layout import PagedLayout, SlotLayout
from sim.core.costmodel import CostModel, StepCost, StepPhysics, _nonneg, _zero_cost
from sim.core.hardware import Hardware, get_hardware

#: Features of the calibrated law t = sum(c_i * feature_i), in this order. They are the sizes of the
#: padded arrays the reference runner builds for the step (reference.buckets), because that is what
#: it computes. A decode-only step and a step with a prefill part run two different compiled
#: programs, so each has its own terms: decode-only steps cost decode_step + decode_rows per padded
#: row + decode_kv per K/V token gathered (rows x padded context); steps with a prefill part cost
#: step + tokens per flat token (every layer's matmuls) + rows per output row (LM head, sampling)
#: + mixed_decode_kv for their decode part's gather + prefill_kv per K/V token the query tiles gather.
FEATURES = ("decode_step", "decode_rows", "decode_kv", "step", "tokens", "rows", "mixed_decode_kv", "prefill_kv")
PROFILE_COLUMNS = ("kind", "batch_size", "context_len", "prefill_tokens", "cached_context", "median_ms")
PROFILE_KINDS = ("decode", "prefill", "mixed")
PROFILE_LAYOUTS = ("paged", "contiguous")  # the optional `layout` column (default paged)
#: Profile rows of this kind time the engine's host work per step (schedule + update): batch_size
#: decoding requests, or (prefill_tokens > 0) the admission of batch_size prompts. They calibrate
#: HOST_FEATURES (per step, per sequence, per prefill token: admission and prefix hashing), added
#: to every step, not the device law.
HOST_KIND = "host"
HOST_FEATURES = ("step", "seq", "prefill_token")


@dataclass(frozen=True, slots=True)
class ServerShapes:
    """The law's features for a server that computes the step's real shape (a black-box profile).

    Same FEATURES, real sizes: decode rows = decoding sequences, tokens = new tokens, rows =
    sequences; the attention terms count (query, key) pairs. context_pad = 1 (vLLM's paged
    attention reads each sequence's own blocks; llama.cpp's CPU flash attention skips the masked
    cells of its padded K/V view): the decode part reads its contexts, the prefill part its causal
    pairs (a mixed step's decode part is priced as decode_seqs x its longest context, exact when
    the decodes have equal contexts). context_pad > 1, for a server whose attention does compute
    over padded K/V: every query reads the batch's longest context rounded up to a multiple of
    context_pad (as llama.cpp's K/V view is padded to 256 cells, src/llama-kv-cache.cpp get_n_kv),
    so a part of the step with n queries costs n x pad(longest context) pairs.
    """

    context_pad: int = 1

    def __post_init__(self):
        if not isinstance(self.context_pad, int) or self.context_pad < 1:
            raise ConfigError("context_pad", f"must be an integer >= 1, got {self.context_pad!r}")

    def pad(self, context: int) -> int:
        """Tokens of K/V read for a longest context of `context` tokens."""
        q = self.context_pad
        return -(-context // q) * q

    def features(self, s: StepShape) -> tuple[float, ...]:
        """The law's features of step s, in FEATURES order."""
        if self.context_pad > 1:
            longest = self.pad(max(s.decode_max_context, s.prefill_max_context))
            decode_kv, prefill_kv = s.decode_seqs * longest, s.prefill_tokens * longest
        else:
            decode_kv = s.decode_seqs * s.decode_max_context if s.prefill_seqs else s.attn_q_ctx
            prefill_kv = max(0, s.attn_q_ctx - decode_kv)
        if not s.prefill_seqs:
            return (1.0, s.decode_seqs, decode_kv, 0.0, 0.0, 0.0, 0.0, 0.0)
        return (0.0, 0.0, 0.0, 1.0, s.new_tokens, s.num_seqs, decode_kv, prefill_kv)

    def metadata(self) -> str:
        """The '# shapes:' metadata line's value."""
        return f"server context_pad={self.context_pad}"


StepFeatures = Padding | ServerShapes  # how a profiled step's shape becomes the law's features


def features(s: StepShape, padding: StepFeatures) -> tuple[float, ...]:
    """The calibrated law's features of a step, in FEATURES order, for a runner that pads with `padding`
    (or a server that computes the real shape: ServerShapes)."""
    if isinstance(padding, ServerShapes):
        return padding.features(s)
    p = padding.step(s.decode_seqs, s.decode_max_context, s.prefill_seqs, s.prefill_tokens, s.prefill_max_context)
    decode_kv = p.decode_rows * p.decode_context
    if not p.prefill_rows:
        return (1.0, p.decode_rows, decode_kv, 0.0, 0.0, 0.0, 0.0, 0.0)
    return (0.0, 0.0, 0.0, 1.0, p.tokens, p.rows, decode_kv, p.prefill_tiles * p.prefill_context)


def server_shapes(metadata: Mapping[str, str]) -> ServerShapes | None:
    """ServerShapes when the profile's '# shapes:' line says it timed a server ('server context_pad=N'), else None."""
    words = metadata.get("shapes", "").split()
    if not words or words[0] != "server":
        return None
    pad = 1
    for item in words[1:]:
        key, _, value = item.partition("=")
        if key == "context_pad":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError("profile.shapes", f"context_pad={value!r} is not an integer >= 1",
                                  "server context_pad=<tokens>")
            pad = int(value)
    return ServerShapes(pad)


def profile_padding(metadata: Mapping[str, str], model_cfg=None, layout: str = "paged") -> StepFeatures:
    """The padding of the runner a profile's rows of this layout were measured with, from its metadata.

    Its '# padding:' line (min_tokens=16 min_seqs=4 ...), block_size and kv_pool_blocks (paged) or
    contiguous_slots ('N x L tokens'); the runner's defaults for what a profile does not say
    (profiles written before padding was recorded). A server's profile ('# shapes: server ...')
    gives its ServerShapes, whatever the layout.
    """
    shapes = server_shapes(metadata)
    if shapes is not None:
        return shapes
    rules = {}
    for item in metadata.get("padding", "").split():
        key, _, value = item.partition("=")
        if key in ("min_tokens", "min_seqs", "min_blocks", "query_tile", "min_context") and value.isdigit():
            rules[key] = int(value)
    if layout == "contiguous":
        words = metadata.get("contiguous_slots", "").split()
        slot_len = int(words[2]) if len(words) > 2 and words[2].isdigit() else 1 << 20
        return Padding.for_layout(SlotLayout(1, slot_len), slot_len, **rules)
    bs = metadata.get("block_size", "16")
    bs = int(bs) if bs.isdigit() else 16
    pool = metadata.get("kv_pool_blocks", "")
    max_position = model_cfg.max_position if model_cfg is not None else 1 << 20
    num_blocks = int(pool) if pool.isdigit() else -(-max_position // bs) + 1  # unknown pool: no cap from it
    return Padding.for_layout(PagedLayout(num_blocks, bs), max_position, **rules)


def shape_from_profile_row(kind: str, batch_size: int, context_len: int, prefill_tokens: int,
                           cached_context: int) -> StepShape:
    """The step a profile row timed.

    decode:  batch_size sequences decoding one token, each with context_len tokens after the step.
    prefill: one chunk of prefill_tokens new tokens on top of cached_context cached ones (batch_size ignored).
    mixed:   both in one step.
    """
    if kind == "decode":
        return StepShape.decode(batch_size, context_len)
    if kind == "prefill":
        return StepShape.prefill(prefill_tokens, cached_context)
    if kind == "mixed":
        return StepShape.decode(batch_size, context_len) + StepShape.prefill(prefill_tokens, cached_context)
    raise ConfigError("profile.kind", f"unknown row kind {kind!r}", ", ".join(PROFILE_KINDS))


def nnls(a, b, tol: float = 1e-12, max_iter: int | None = None):
    """Non-negative least squares min ||a x - b|| s.t. x >= 0 (Lawson-Hanson active set)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    for _ in range(max_iter or 10 * n):
        if passive.all() or np.max(np.where(passive, -np.inf, w)) <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(z[passive] > 0):
                break
            bad = passive & (z <= 0)
            denom = x[bad] - z[bad]
            alpha = float(np.min(np.where(denom > 0, x[bad] / np.where(denom > 0, denom, 1.0), 0.0)))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = z
        w = a.T @ (b - a @ x)
    return x


@dataclass(frozen=True)
class FitReport:
    """How well the calibrated law reproduces the table it was fitted to (relative errors)."""

    rows: int
    mean_rel_error: float
    median_rel_error: float
    p90_rel_error: float
    max_rel_error: float
    unconstrained: tuple[str, ...] = ()  # features the table never exercised (coefficient left at 0)
    layout: str = "paged"  # the KV layout of the rows fitted

    def summary(self) -> str:
        text = (f"fit over {self.rows} {self.layout} rows: relative error mean {self.mean_rel_error:.2%}, "
                f"median {self.median_rel_error:.2%}, p90 {self.p90_rel_error:.2%}, max {self.max_rel_error:.2%}")
        if self.unconstrained:
            text += f"; not exercised by the table: {', '.join(self.unconstrained)}"
        return text


class CalibratedCostModel(CostModel):
    """t = sum of c_f * f over FEATURES: one linear law for decode-only steps, one for steps with a prefill part.

    The features (FEATURES) are the padded sizes of the step on the reference runner, computed
    with `padding`: the rules of the runner that was profiled, applied to the KV layout of the
    engine being simulated; or, for a server profiled as a black box, the step's real sizes
    (`padding` a ServerShapes). Coefficients (s per unit) are non-negative, so predictions never
    decrease with more work. The fixed terms are reported as overhead, the token and row terms as
    compute, the K/V gather terms as kv_reads. host_coefficients (s, s per sequence, s per prefill
    token; from the profile's 'host' rows) price the engine's host work per step
    (scheduler.schedule + update): h_step + h_seq * num_seqs + h_prefill_token * prefill_tokens,
    added to overhead. With model_cfg given, bytes_moved and flops are filled in from StepPhysics
    for reporting.

    decode_table_s ({batch size: ((K/V per sequence, s), ...)}, a server's profile): a decode-only
    step of B sequences costs what the server was measured to take for B sequences, interpolated
    linearly in the K/V feature per sequence (features[2] / B: the context each one reads, padded
    as the server pads), extrapolated past the measured contexts with decode_kv per K/V token;
    between measured batch sizes interpolated linearly at the same context, past the largest
    extrapolated with decode_rows per sequence. Measured rather than fitted, because a real
    server's kernels are not linear in a small batch (llama.cpp on one CPU core: 1 sequence ~8 ms,
    2 ~20, 3 ~26, 4 ~24) nor in the context (experiments/results/peers).
    """

    def __init__(self, coefficients: Mapping[str, float], *, padding: StepFeatures | None = None,
                 fit_report: FitReport | None = None, metadata: Mapping[str, str] | None = None, model_cfg=None,
                 weight_format: str = "fp16", kv_dtype: str = "fp16", tp: int = 1,
                 hardware: Hardware | str | None = None, host_coefficients: Mapping[str, float] | None = None,
                 decode_table_s: Mapping[int, Iterable[tuple[float, float]]] | None = None):
        """padding: the runner's bucket rules for the simulated engine's layout (default: the profile's)."""
        unknown = set(coefficients) - set(FEATURES)
        if unknown:
            raise ConfigError("coefficients", f"unknown features {sorted(unknown)}", ", ".join(FEATURES))
        self.coefficients = {f: _nonneg(float(coefficients.get(f, 0.0)), f"coefficients.{f}") for f in FEATURES}
        self.fit_report = fit_report
        self.metadata = dict(metadata or {})
        self.padding = padding or profile_padding(self.metadata, model_cfg)
        self.model_cfg = model_cfg
        self.hardware = get_hardware(hardware) if isinstance(hardware, str) else hardware
        self.physics = StepPhysics(model_cfg, weight_format, kv_dtype, tp) if model_cfg is not None else None
        self._c = tuple(self.coefficients[f] for f in FEATURES)
        host = dict(host_coefficients or {})
        if set(host) - set(HOST_FEATURES):
            raise ConfigError("host_coefficients", f"unknown features {sorted(set(host) - set(HOST_FEATURES))}",
                              ", ".join(HOST_FEATURES))
        self.host_coefficients = {f: _nonneg(float(host.get(f, 0.0)), f"host_coefficients.{f}")
                                  for f in HOST_FEATURES}
        self._h = tuple(self.host_coefficients[f] for f in HOST_FEATURES)
        self.decode_table_s: dict[int, tuple[tuple[float, float], ...]] = {}
        for b, pts in sorted((decode_table_s or {}).items()):
            pts = tuple(sorted((float(x), _nonneg(float(t), f"decode_table_s[{b}]")) for x, t in pts))
            if not isinstance(b, numbers.Integral) or b < 1 or not pts:
                raise ConfigError("decode_table_s", f"needs batch sizes >= 1 with at least one point, got {b}: {pts}")
            self.decode_table_s[int(b)] = pts
        self._decode_sizes = list(self.decode_table_s)

    def _decode_at(self, batch: int, x: float) -> float:
        """The measured decode time of a tabled batch size at K/V feature x per sequence (s)."""
        pts = self.decode_table_s[batch]
        slope = self._c[2] * batch
        if x <= pts[0][0]:
            return max(0.0, pts[0][1] - slope * (pts[0][0] - x))
        if x >= pts[-1][0]:
            return pts[-1][1] + slope * (x - pts[-1][0])
        i = bisect.bisect_right([p[0] for p in pts], x)
        (x0, t0), (x1, t1) = pts[i - 1], pts[i]
        return t0 + (t1 - t0) * (x - x0) / (x1 - x0)

    def _decode_seconds(self, batch: int, kv: float) -> float:
        """A decode-only step of batch sequences with K/V feature kv, from decode_table_s (s)."""
        x = kv / batch
        sizes = self._decode_sizes
        if batch in self.decode_table_s:
            return self._decode_at(batch, x)
        if batch < sizes[0]:
            return self._decode_at(sizes[0], x)
        if batch > sizes[-1]:
            return self._decode_at(sizes[-1], x) + self._c[1] * (batch - sizes[-1])
        i = bisect.bisect_right(sizes, batch)
        lo, hi = sizes[i - 1], sizes[i]
        w = (batch - lo) / (hi - lo)
        return (1 - w) * self._decode_at(lo, x) + w * self._decode_at(hi, x)

    @classmethod
    def from_profile(cls, profile, *, model_cfg=None, padding: StepFeatures | None = None, weight_format: str = "fp16",
                     kv_dtype: str = "fp16", tp: int = 1, hardware: Hardware | str | None = None,
                     field: str = "profile", check_model: bool = True) -> CalibratedCostModel:
        """Fit the law to a profile CSV (path) or DataFrame written by `servesim profile`.

        The rows are priced with the profiled runner's padding (profile_padding); predictions use
        `padding` (the simulated engine's layout), default the same. A server's profile
        ('# shapes: server') is priced on real shapes for fitting and predicting alike: the
        server, not the reference runner, computes the simulated steps. Rows are weighted by
        1 / median_ms so the fit minimises relative error (step times span milliseconds to
        seconds). With check_model, a profile whose metadata names a different preset than
        model_cfg is refused.
        """
        df, metadata = read_profile(profile, field)
        if server_shapes(metadata) is not None:
            padding = None  # the server's own shapes, whatever the simulated layout
        host_rows = df[df["kind"] == HOST_KIND]
        df = df[df["kind"] != HOST_KIND]
        # Contiguous slots and paged blocks gather K/V differently: fit the rows of the simulated layout.
        layout = "contiguous" if isinstance(padding, Padding) and padding.block_size is None else "paged"
        if not (df["layout"] == layout).any():  # an older profile, or contiguous rows that did not fit
            layout = str(df["layout"].iloc[0]) if len(df) else layout
        df = df[df["layout"] == layout]
        if (host_rows["layout"] == layout).any():  # host rows of the same layout's scheduler
            host_rows = host_rows[host_rows["layout"] == layout]
        if check_model and model_cfg is not None:
            measured = metadata.get("preset") or metadata.get("model")
            if measured and measured != model_cfg.name:
                raise ConfigError(field, f"profile was measured on preset {measured!r}, not {model_cfg.name!r}",
                                  f"a profile of {model_cfg.name}")
        shapes = [shape_from_profile_row(str(k), int(b), int(c), int(p), int(cc))
                  for k, b, c, p, cc in zip(df["kind"], df["batch_size"], df["context_len"],
                                            df["prefill_tokens"], df["cached_context"])]
        for name in ("prefill_tokens", "decode_seqs"):
            if not any(getattr(s, name) for s in shapes):
                raise ConfigError(field, f"no row has {name} > 0, so its cost cannot be calibrated",
                                  "a profile with decode and prefill rows")
        profiled = profile_padding(metadata, model_cfg, layout)
        t = df["median_ms"].to_numpy(dtype=float) / 1e3
        a = np.array([features(s, profiled) for s in shapes], dtype=float)
        aw = a / t[:, None]  # relative-error weighting
        norms = np.linalg.norm(aw, axis=0)
        used = norms > 0
        coef = np.zeros(len(FEATURES))
        coef[used] = nnls(aw[:, used] / norms[used], np.ones(len(t))) / norms[used]
        table = {}
        if isinstance(profiled, ServerShapes):
            table = _decode_table(shapes, a, t, coef)
            _refit_with_decode_kv(shapes, a, t, coef)
        pred = a @ coef
        if table:
            fitted = cls(dict(zip(FEATURES, map(float, coef))), padding=profiled, decode_table_s=table)
            for i, s in enumerate(shapes):
                if not s.prefill_seqs:
                    pred[i] = fitted._decode_seconds(s.decode_seqs, a[i, 2])
        rel = np.abs(pred - t) / t
        report = FitReport(rows=len(t), mean_rel_error=float(rel.mean()), median_rel_error=float(np.median(rel)),
                           p90_rel_error=float(np.quantile(rel, 0.9)), max_rel_error=float(rel.max()),
                           unconstrained=tuple(f for f, u in zip(FEATURES, used) if not u), layout=layout)
        host = {}
        if len(host_rows):  # t_host = h_step + h_seq * batch_size + h_tok * prefill_tokens, relative error, >= 0
            th = host_rows["median_ms"].to_numpy(dtype=float) / 1e3
            ah = np.stack([np.ones(len(th)), host_rows["batch_size"].to_numpy(dtype=float),
                           host_rows["prefill_tokens"].to_numpy(dtype=float)], axis=1) / th[:, None]
            nh = np.linalg.norm(ah, axis=0)
            fit = np.zeros(len(HOST_FEATURES))
            fit[nh > 0] = nnls(ah[:, nh > 0] / nh[nh > 0], np.ones(len(th))) / nh[nh > 0]
            host = dict(zip(HOST_FEATURES, map(float, fit)))
        return cls(dict(zip(FEATURES, map(float, coef))), padding=padding or profiled, fit_report=report,
                   metadata=metadata, model_cfg=model_cfg, weight_format=weight_format, kv_dtype=kv_dtype, tp=tp,
                   hardware=hardware, host_coefficients=host, decode_table_s=table)

    def device_seconds(self, batch: StepShape) -> float:
        """The runner's part of the step (prepare + forward + sampling), without host scheduling work (s)."""
        f = features(batch, self.padding)
        if self.decode_table_s and not batch.prefill_seqs:
            return self._decode_seconds(batch.decode_seqs, f[2])
        return sum(c * x for c, x in zip(self._c, f))

    def host_seconds(self, batch: StepShape) -> float:
        """The engine's scheduling work around the step (schedule + update) (s)."""
        return self._h[0] + self._h[1] * (batch.prefill_seqs + batch.decode_seqs) + self._h[2] * batch.prefill_tokens

    def step_time(self, batch: StepShape) -> StepCost:
        if batch.prefill_tokens + batch.decode_seqs == 0:
            return _zero_cost()
        f = features(batch, self.padding)
        c = self._c
        t_fixed = c[0] * f[0] + c[3] * f[3] + self.host_seconds(batch)
        t_kv = c[2] * f[2] + c[6] * f[6] + c[7] * f[7]
        t_c = c[1] * f[1] + c[4] * f[4] + c[5] * f[5]
        if self.decode_table_s and not batch.prefill_seqs:  # measured per batch size and context: one figure
            t_fixed, t_kv, t_c = self._decode_seconds(batch.decode_seqs, f[2]) + self.host_seconds(batch), 0.0, 0.0
        total = t_fixed + t_kv + t_c
        ph = self.physics
        return StepCost(
            total,
            {"weights": 0.0, "kv_reads": t_kv, "compute": t_c, "communication": 0.0, "overhead": t_fixed},
            ph.bytes_moved(batch) if ph is not None else 0.0,
            ph.flops(batch) if ph is not None else 0.0,
            "calibrated",
        )

    def describe(self) -> dict:
        pad = self.padding
        padding = ({"shapes": pad.metadata()} if isinstance(pad, ServerShapes) else
                   {"block_size": pad.block_size, "context_cap": pad.context_cap, "rules": pad.metadata()})
        out = {"kind": "calibrated", "coefficients": dict(self.coefficients),
               "host_coefficients": dict(self.host_coefficients), "padding": padding, "metadata": dict(self.metadata)}
        if self.decode_table_s:
            out["decode_table_s"] = {b: [list(p) for p in pts] for b, pts in self.decode_table_s.items()}
        if self.fit_report is not None:
            out["fit"] = self.fit_report.summary()
        return out


def _decode_table(shapes: list[StepShape], a: np.ndarray, t: np.ndarray,
                  coef: np.ndarray) -> dict[int, tuple[tuple[float, float], ...]]:
    """The decode-only rows as a table {B: ((K/V feature per sequence, s), ...)}, repeated points averaged.

    Also refits the law's decode_kv slope (coef[2], in place; for extrapolating past the table's
    contexts) as the one slope shared by all batch sizes: t = x_B + decode_kv x f_kv, non-negative,
    relative error.
    """
    rows = [i for i, s in enumerate(shapes) if not s.prefill_seqs and s.decode_seqs]
    if not rows:
        return {}
    sizes = sorted({shapes[i].decode_seqs for i in rows})
    col = {b: j for j, b in enumerate(sizes)}
    m = np.zeros((len(rows), len(sizes) + 1))
    for r, i in enumerate(rows):
        m[r, col[shapes[i].decode_seqs]] = 1.0
        m[r, -1] = a[i, 2]
    tt = t[rows]
    mw = m / tt[:, None]
    norms = np.linalg.norm(mw, axis=0)
    used = norms > 0
    x = np.zeros(m.shape[1])
    x[used] = nnls(mw[:, used] / norms[used], np.ones(len(tt))) / norms[used]
    coef[2] = x[-1]
    points: dict[int, dict[float, list[float]]] = {}
    for i in rows:
        b = shapes[i].decode_seqs
        points.setdefault(b, {}).setdefault(float(a[i, 2]) / b, []).append(float(t[i]))
    return {b: tuple((xk, float(np.mean(v))) for xk, v in sorted(pts.items())) for b, pts in sorted(points.items())}


def _refit_with_decode_kv(shapes: list[StepShape], a: np.ndarray, t: np.ndarray, coef: np.ndarray) -> None:
    """A server's steps with a prompt: their decodes' K/V cost as in decode-only steps (coef[6] = coef[2]), the
    other terms of that law refitted (in place).

    A profile's mixed rows have decoders of a few dozen tokens of context, which cannot tell the
    decode part's K/V cost from the rest: fitted freely it came out 14x the decode-only slope
    (vLLM, 26 vs 1.9 us per token) and priced a mixed step of 13 decodes at ~200 tokens of context
    60% above the measured gaps. The attention a decode does is the same with or without a prompt
    beside it.
    """
    rows = [i for i, s in enumerate(shapes) if s.prefill_seqs]
    if not rows:
        return
    coef[6] = coef[2]
    free = [3, 4, 5, 7]  # step, tokens, rows, prefill_kv
    tt = t[rows] - coef[6] * a[rows, 6]
    m = a[np.ix_(rows, free)] / t[rows][:, None]
    norms = np.linalg.norm(m, axis=0)
    used = norms > 0
    x = np.zeros(len(free))
    x[used] = nnls(m[:, used] / norms[used], tt / t[rows]) / norms[used]
    coef[free] = x


def read_profile(profile, field: str = "profile"):
    """(DataFrame, metadata) from a profile CSV path or a DataFrame (metadata from df.attrs).

    Leading '#' lines are metadata: '# key: value' or '# key=value'. '# time_column: NAME' makes
    that column the step times (in median_ms of the frame returned).
    """
    metadata: dict[str, str] = {}
    if isinstance(profile, pd.DataFrame):
        df = profile.copy()
        metadata.update({str(k): str(v) for k, v in profile.attrs.items()})
    else:
        path = os.fspath(profile)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError as e:
            raise ConfigError(field, f"cannot read {path!r}: {e.strerror or e}") from None
        body_start = 0
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("#"):
                text = stripped.lstrip("#").strip()
                sep = min((p for p in (text.find(":"), text.find("=")) if p > 0), default=-1)
                if sep > 0:
                    metadata[text[:sep].strip().lower()] = text[sep + 1:].strip()
                body_start = i + 1
            elif stripped:
                break
            else:
                body_start = i + 1
        try:
            df = pd.read_csv(io.StringIO("".join(lines[body_start:])))
        except Exception as e:  # pandas raises several types for malformed CSV
            raise ConfigError(field, f"cannot parse {path!r} as CSV: {e}") from None
    missing = [c for c in PROFILE_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(field, f"profile lacks columns {missing}", ", ".join(PROFILE_COLUMNS))
    df = df.copy()
    time_column = metadata.get("time_column", "median_ms")
    if time_column != "median_ms":  # the statistic the law is fitted to (a server's profile: the mean gap)
        if time_column not in df.columns:
            raise ConfigError(f"{field}.time_column", f"no column {time_column!r}", ", ".join(map(str, df.columns)))
        df["median_ms"] = df[time_column]
    df["kind"] = df["kind"].astype(str).str.strip()
    df["layout"] = df["layout"].astype(str).str.strip() if "layout" in df.columns else "paged"
    bad = sorted(set(df["layout"]) - set(PROFILE_LAYOUTS))
    if bad:
        raise ConfigError(f"{field}.layout", f"unknown layouts {bad}", ", ".join(PROFILE_LAYOUTS))
    bad = sorted(set(df["kind"]) - set(PROFILE_KINDS) - {HOST_KIND})
    if bad:
        raise ConfigError(f"{field}.kind", f"unknown row kinds {bad}", ", ".join(PROFILE_KINDS + (HOST_KIND,)))
    for col in ("batch_size", "context_len", "prefill_tokens", "cached_context"):
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(0).astype(int)
        if (df[col] < 0).any():
            raise ConfigError(f"{field}.{col}", "negative values")
    df["median_ms"] = pd.to_numeric(df["median_ms"], errors="coerce")
    df = df[df["median_ms"].notna() & (df["median_ms"] > 0)]
    if (df["kind"] != HOST_KIND).sum() < len(FEATURES):
        raise ConfigError(field, f"need at least {len(FEATURES)} step rows with a positive median_ms, "
                                 f"got {(df['kind'] != HOST_KIND).sum()}")
    return df.reset_index(drop=True), metadata
