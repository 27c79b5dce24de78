"""Verdicts: a published figure against its simulation, one seed at a time, then across seeds.

Only test figures get a verdict: "physically implausible" when the published figure lies beyond
the physical bound of its setup (sim.lab.audit), whatever the simulation says; else "reproduced"
when the simulated figure is within TOLERANCE of the published one (inside a range widened by
TOLERANCE, or satisfying op); else "differs". Across seeds: the common verdict when every seed
gives the same, else "flips" (reported with each seed's verdict, never the lucky one).

Figures of other classes are checked, not judged: "agrees" / "disagrees" (the same arithmetic,
without a bound).

Plain Python.
"""
from __future__ import annotations

import math

from sim.lab.audit import Bound

TOLERANCE = 0.25
VERDICTS = ("reproduced", "differs", "physically implausible", "flips")
CHECKS = ("agrees", "disagrees")


def verdict(published: float | tuple[float, float], simulated: float | None, op: str = "~",
            bound: Bound | None = None, tolerance: float = TOLERANCE) -> str:
    """'physically implausible' if published lies beyond bound, else 'reproduced' or 'differs'.

    op "~": within tolerance of a point (|sim / pub - 1| <= tolerance), or inside a range
    [lo, hi] widened to [lo x (1 - tolerance), hi x (1 + tolerance)]. Other ops compare
    simulated with published literally (simulated >= published for ">=").
    """
    if bound is not None:
        edge = published if not isinstance(published, tuple) else (
            published[0] if bound.kind == "upper" else published[1])
        if bound.violated_by(edge):
            return "physically implausible"
    if simulated is None or not math.isfinite(simulated):
        return "differs"
    if op == "~":
        if isinstance(published, tuple):
            lo, hi = published
            ok = lo * (1 - tolerance) <= simulated <= hi * (1 + tolerance)
        else:
            ok = abs(simulated - published) <= tolerance * abs(published)
    else:
        ok = {"<": simulated < published, "<=": simulated <= published, ">": simulated > published,
              ">=": simulated >= published}[op]
    return "reproduced" if ok else "differs"


def check(published: float | tuple[float, float], simulated: float | None, op: str = "~") -> str:
    """'agrees' or 'disagrees': a non-test figure against the config's arithmetic (verdict without a bound)."""
    return "agrees" if verdict(published, simulated, op) == "reproduced" else "disagrees"


def across_seeds(verdicts: list[str]) -> str:
    """The verdict every seed gives, or 'flips' when they differ."""
    if not verdicts:
        return "differs"
    return verdicts[0] if all(v == verdicts[0] for v in verdicts) else "flips"


def ratio(published: float | tuple[float, float], simulated: float) -> float:
    """simulated / published; for a range, to its nearest end (1.0 inside it)."""
    if simulated is None or not math.isfinite(simulated):
        return math.nan
    if isinstance(published, tuple):
        lo, hi = published
        if lo <= simulated <= hi:
            return 1.0
        published = lo if simulated < lo else hi
    return simulated / published if published else math.nan
