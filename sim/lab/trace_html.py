"""`servesim trace --html FILE`: one self-contained page that steps through traces of the real scheduler.

The page is a single HTML file: its stylesheet, its script (sim/lab/trace_page/) and the traces
(as JSON) are inlined, so it needs no server and no network (it works from a USB stick in a
lecture hall). It shows two scenes:

1. the scenario of the config, under the traced engine and, beside it, another engine of the
   config with another KV layout (default: the first one; e.g. llama.cpp slots beside vLLM's
   paged pool), both aligned on simulated time. Each step: the waiting queue, the batch and its
   token budget, every sequence's block table with arrows to its physical blocks, each block's
   tokens, refcount and prefix-cache state, the events in causal order, and KV memory over time;
2. sim.lab.trace_scenes.fork_scene(): prefix caching, fork and copy-on-write (vLLM V0 and the
   paper's parallel sampling).

Everything shown comes from sim.lab.trace records (the scheduler's own calls); the event
sentences are sim.lab.trace_text's, so page and terminal agree word for word.
"""
from __future__ import annotations

import json
from pathlib import Path

from reference.errors import ConfigError
from reference.layout import PagedLayout
from sim.lab.experiment import Experiment
from sim.lab.trace import StepRecord, Trace, rid_key, trace_cell
from sim.lab.trace_scenes import fork_scene
from sim.lab.trace_text import batch_line, describe_event, kv_line, requests_line, token_budget

PAGE_DIR = Path(__file__).with_name("trace_page")
MAX_BLOCKS = 512  # a pool drawn block by block stops being readable well before this
MAX_RECORDS = 5000


def record_data(rec: StepRecord, paged: bool, budget: int | None, recompute: set[str]) -> dict:
    """One record as the page's JSON (times in ms)."""
    refs = rec.refcount
    return {
        "step": rec.step, "t": rec.time_s * 1e3, "dt": rec.dt_s * 1e3, "label": rec.label,
        "chunks": [list(c) for c in rec.chunks],
        "batch": batch_line(rec, budget) if rec.chunks else "",
        "kv": kv_line(rec, paged),
        "events": [{"kind": e.kind, "rid": e.request, "phase": e.phase, "text": describe_event(e, paged, refs),
                    "blocks": list(e.blocks), "shared": list(e.shared), "copies": [list(c) for c in e.copies]}
                   for e in rec.events],
        "tables": {rid: list(t) for rid, t in rec.tables.items()},
        "blocks": [[b, s.fill, s.refs, int(s.cached)] for b, s in sorted(rec.blocks.items())],
        "waiting": list(rec.waiting), "running": list(rec.running),
        "recompute": sorted((r for r in rec.waiting if r in recompute), key=rid_key),
        "held": dict(rec.held_tokens),
        "reserved": rec.reserved_tokens, "stored": rec.stored_tokens, "capacity": rec.capacity_tokens,
    }


def panel_data(records: list[StepRecord], scheduler, name: str, describe: str) -> dict:
    """A panel: one engine's records plus what the page needs to lay it out."""
    layout = scheduler.layout
    paged = isinstance(layout, PagedLayout)
    if paged and layout.num_blocks > MAX_BLOCKS:
        raise ConfigError(f"engines.{name}.num_blocks", f"{layout.num_blocks} blocks are too many to draw one by one",
                          f"at most {MAX_BLOCKS}: --html is for small teaching scenarios (e.g. trace_small.toml)")
    if len(records) > MAX_RECORDS:
        raise ConfigError("workload", f"{len(records)} steps are too many to step through",
                          f"at most {MAX_RECORDS}: fewer or shorter requests")
    budget = token_budget(scheduler)
    steps, preempted = [], set()
    for rec in records:
        preempted |= set(rec.preempted)  # waiting requests preempted so far (this step's included) recompute
        steps.append(record_data(rec, paged, budget, preempted))
    d = {"name": name, "kind": "paged" if paged else "slots", "scheduler": type(scheduler).__name__,
         "describe": describe, "budget": budget, "max_seqs": getattr(scheduler, "max_num_seqs", None),
         "steps": steps}
    if paged:
        d.update(block_size=layout.block_size, num_blocks=layout.num_blocks)
    else:
        d.update(num_slots=layout.num_slots, slot_len=layout.max_len)
    return d


def _timeline(panels: list[dict]) -> list[dict]:
    """Frames on simulated time: one per step of the first panel, then one per step the others take after it ends.

    At each frame every panel shows the step under way at that time (-1: none yet), so one key
    press always moves the first panel's story by one step; a comparison panel may move by
    several steps at once (its chart shows them all).
    """
    first = panels[0]["steps"]
    end = first[-1]["t"] if first else 0.0
    times = [s["t"] for s in first] + sorted({s["t"] for p in panels[1:] for s in p["steps"] if s["t"] > end})
    frames, idx = [], [-1] * len(panels)
    for t in times:
        changed = []
        for k, p in enumerate(panels):
            steps = p["steps"]
            while idx[k] + 1 < len(steps) and steps[idx[k] + 1]["t"] <= t:
                idx[k] += 1
                if k not in changed:
                    changed.append(k)
        frames.append({"t": t, "at": list(idx), "changed": changed})
    return frames


def _request_data(traces: list[Trace]) -> dict:
    reqs: dict[str, dict] = {}
    for tr in traces:
        for rid, r in tr.requests.items():
            reqs.setdefault(rid, {"prompt": r.num_prompt_tokens, "max_tokens": r.sampling.max_tokens,
                                  "arrival": r.arrival_time * 1e3})
    return {rid: reqs[rid] for rid in sorted(reqs, key=rid_key)}


def scenario_scene(exp: Experiment, traces: list[Trace]) -> dict:
    """Scene 1: the config's requests under each traced engine, aligned on simulated time."""
    panels = [panel_data(tr.records, tr.scheduler, tr.engine, tr.scheduler.describe()) for tr in traces]
    cost = exp.cost_model.kind if exp.cost_model is not None else "roofline"
    return {"id": "scenario", "title": f"{exp.name}: {' vs '.join(tr.engine for tr in traces)}",
            "subtitle": (exp.description.rstrip(".") + ". " if exp.description else "")
            + f"Requests (prompt + max_tokens): {requests_line(traces[0])}. "
            + f"Frames follow simulated time ({cost} cost model, {exp.hardware.preset or 'reference'} hardware).",
            "panels": panels, "frames": _timeline(panels), "requests": _request_data(traces)}


def fork_scene_data(prompt_tokens: int = 10) -> dict:
    """Scene 2: prefix caching, fork and copy-on-write on the real block manager (sim.lab.trace_scenes)."""
    tracer, records = fork_scene(prompt_tokens)
    panel = panel_data(records, tracer.scheduler, "paged", tracer.scheduler.describe())
    reqs = {rid: {"prompt": r.num_prompt_tokens, "max_tokens": r.sampling.max_tokens, "arrival": r.arrival_time * 1e3}
            for rid, r in tracer.requests.items()}
    reqs["A'"] = {"prompt": reqs["A"]["prompt"], "max_tokens": reqs["A"]["max_tokens"], "arrival": 0.0}
    return {"id": "fork", "title": "Prefix caching, fork and copy-on-write",
            "subtitle": ("Parallel sampling as vLLM V0 and the PagedAttention paper did it: the second answer A' forks "
                         "A's block table and copies a block only when it writes into one still shared. vLLM V1 has "
                         "no fork: it runs n samples as n requests that share the prompt's full blocks through the "
                         "prefix cache, each computing its own last, partial block."),
            "panels": [panel], "frames": [{"t": s["t"], "at": [i], "changed": [0]} for i, s in enumerate(panel["steps"])],
            "requests": reqs}


def page_data(exp: Experiment, traces: list[Trace]) -> dict:
    """Everything the page shows, as JSON-ready data."""
    return {"title": f"servesim trace: {exp.name}", "scenes": [scenario_scene(exp, traces), fork_scene_data()]}


def render_page(data: dict) -> str:
    """The self-contained HTML: template with the stylesheet, the script and the data inlined."""
    html = (PAGE_DIR / "page.html").read_text()
    css = (PAGE_DIR / "viewer.css").read_text()
    js = (PAGE_DIR / "viewer.js").read_text()
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no early </script>
    return (html.replace("{{TITLE}}", _escape(data["title"])).replace("/*{{CSS}}*/", css)
            .replace("/*{{JS}}*/", js).replace("{{DATA}}", payload))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def compare_engine(exp: Experiment, primary: Trace, compare: str | None) -> str | None:
    """The engine shown beside the primary: the one named, none ('none'), or the first with another KV layout."""
    if compare == "none":
        return None
    if compare:
        exp.engine(compare)  # ConfigError naming the engines if unknown
        return compare
    for e in exp.engines:
        if e.name != primary.engine and isinstance(e.layout(exp.plan(e)), PagedLayout) != primary.paged:
            return e.name
    return None


def write_page(exp: Experiment, path: str | Path, trace: Trace, compare: str | None = None, load=None) -> Path:
    """Trace the comparison engine too, and write the page to path."""
    traces = [trace]
    other = compare_engine(exp, trace, compare)
    if other is not None and other != trace.engine:
        traces.append(trace_cell(exp, other, load))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(page_data(exp, traces)), encoding="utf-8")
    return path
