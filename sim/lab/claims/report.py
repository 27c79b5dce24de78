"""Printing a claims run: the side-by-side table, the sweeps, the counts by class and verdict.

Plain Python, no JAX.
"""
from __future__ import annotations

import math

import pandas as pd

from sim.lab.audit import fmt_num
from sim.lab.claims.schema import CLASSES
from sim.lab.claims.verdicts import VERDICTS


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _num(v) -> str:
    return fmt_num(float(v)) if _finite(v) else "-"


def simulated_text(r) -> str:
    """'182' (one value, or every seed the same), '1.25 (1.2-1.31)' (median and range over seeds)."""
    if not _finite(r["simulated"]):
        return "-"
    lo, hi = r.get("sim_min"), r.get("sim_max")
    if _finite(lo) and _finite(hi) and fmt_num(float(lo)) != fmt_num(float(hi)):
        return f"{_num(r['simulated'])} ({_num(lo)}-{_num(hi)})"
    return _num(r["simulated"])


def verdict_text(r) -> str:
    """'reproduced', 'flips (2 of 5 reproduced)', 'identity (disagrees)'."""
    v = r["verdict"]
    if v == "flips":
        seeds = str(r["seed_verdicts"]).split(";")
        return f"flips ({seeds.count('reproduced')} of {len(seeds)} reproduced)"
    if v in CLASSES and v != "test":
        return f"{v} ({r['check']})" if isinstance(r.get("check"), str) and r["check"] else v
    return v


def counts(table: pd.DataFrame) -> dict:
    """{'figures': n, 'classes': {class: n}, 'verdicts': {verdict: n over tests}, 'checks': {check: n}}."""
    cls = table["class"].value_counts().to_dict() if len(table) else {}
    tests = table[table["class"] == "test"] if len(table) else table
    return {"figures": len(table), "classes": {c: int(cls.get(c, 0)) for c in CLASSES},
            "verdicts": {v: int((tests["verdict"] == v).sum()) for v in VERDICTS} if len(tests) else
            dict.fromkeys(VERDICTS, 0),
            "checks": table[table["class"] != "test"]["check"].value_counts().to_dict() if len(table) else {}}


def counts_text(table: pd.DataFrame) -> str:
    """'17 figures: 10 tests (3 reproduced, 6 differs, 1 physically implausible), 6 identities, 1 input'."""
    c = counts(table)
    tests = c["classes"]["test"]
    verdicts = ", ".join(f"{n} {v}" for v, n in c["verdicts"].items() if n)
    parts = [f"{tests} test{'s' if tests != 1 else ''}" + (f" ({verdicts})" if verdicts else "")]
    names = {"input": ("input", "inputs"), "identity": ("identity", "identities"), "fit": ("fit", "fits")}
    for cls, (one, many) in names.items():
        n = c["classes"][cls]
        if n:
            parts.append(f"{n} {one if n == 1 else many}")
    return f"{c['figures']} figures: " + ", ".join(parts)


def format_table(table: pd.DataFrame, notes: bool = True) -> str:
    """The side-by-side table: id, class, claim, cell, published, simulated (range over seeds), ratio, verdict."""
    if table.empty:
        return "(no published figures)"
    rows = []
    for _, r in table.iterrows():
        rows.append({"id": r["id"], "class": r["class"], "claim": str(r["claim"])[:34], "cell": r["cell"],
                     "unit": r["unit"] if isinstance(r["unit"], str) else "", "published": r["published_text"],
                     "simulated": simulated_text(r),
                     "ratio": f"{r['ratio']:.2f}" if _finite(r["ratio"]) else "-", "bound": _num(r["bound"]),
                     "verdict": verdict_text(r)})
    text = pd.DataFrame(rows).to_string(index=False)
    if notes:
        extra = [f"  {r['id']}: {r['notes']}" for _, r in table.iterrows()
                 if r["class"] == "test" and r["verdict"] != "reproduced" and isinstance(r["notes"], str)
                 and r["notes"].strip()]
        if extra:
            text += "\n\nWhy figures differ (config notes):\n" + "\n".join(extra)
        queue = [f"  {r['id']}: {r['queueing']}" for _, r in table.iterrows()
                 if isinstance(r.get("queueing"), str) and r["queueing"]]
        if queue:
            text += "\n\nPublished figures that break the queueing bound:\n" + "\n".join(queue)
    return text


def value_text(v) -> str:
    """A sweep value as written in the config: 4, 0.5, 16384."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_sweeps(sweeps: pd.DataFrame) -> str:
    """Per sweep: each value's simulated figures, and the values at which each is within tolerance."""
    if sweeps is None or sweeps.empty:
        return ""
    out = []
    for sid, g in sweeps.groupby("sweep", sort=False):
        out.append(f"Sweep {sid}: {g['title'].iloc[0]} ({g['param'].iloc[0]})")
        values = list(dict.fromkeys(g["value"]))
        lines = []
        for fid, gi in g.groupby("id", sort=False):
            row = {"id": fid, "published": gi["published_text"].iloc[0]}
            for v in values:
                sim = gi[gi["value"] == v]["simulated"]
                row[value_text(v)] = _num(sim.iloc[0]) if len(sim) else "-"
            lines.append(row)
        out.append(pd.DataFrame(lines).to_string(index=False))
        hit = g[(g["verdict"] == "reproduced") | (g["check"] == "agrees")]
        hits = hit.groupby("id", sort=False)["value"].apply(lambda v: ", ".join(value_text(x) for x in v))
        if len(hits):
            out.append("  within tolerance at: " + "; ".join(f"{k}: {v}" for k, v in hits.items()))
        out.append("")
    return "\n".join(out)
