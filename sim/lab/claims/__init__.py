"""Reproduce published figures: run a claims config and set each figure beside its simulation.

A claims config is an ordinary experiment TOML whose `[published]` table says what it targets:

    [published]
    source = "Ollama vs vLLM (GPU-cloud vendor blog, March 2026)"   # default source of every figure
    notes = "..."                                                    # the group's assumptions
    seeds = 5                        # test figures are simulated at seeds seed .. seed + 4 (default 5)

    [[published.figures]]
    id = "A.2"                       # unique within the file
    class = "test"                   # test | input | identity | fit (schema.CLASSES); fixed before simulating
    class_note = "..."               # required for input / identity / fit: why it is not a test
    reading = "..."                  # optional: how the published figure is read (one reading, fixed up front)
    claim = "single-user throughput" # as the source words it
    metric = "output_throughput"     # a summary.json metric or one of DERIVED_METRICS
    engine = "vllm"                  # an engine of this config
    concurrency = 1                  # the cell (closed loop); or rate = 2.0 (open loop)
    value = 510.0                    # or [lo, hi] for a published range
    unit = "tok/s"
    op = "~"                         # ~ (within 25%), or <, <=, >, >= for qualitative claims
    ratio_to = "orca_max"            # optional: simulated = metric(engine) / metric(ratio_to)
    set = { "workload.num_requests" = 40 }   # optional: measured in this variant of the config
    notes = "why it differs, if it does"

    [[published.sweeps]]             # optional: vary one assumption and re-check some figures
    id = "A.s1"
    title = "Ollama OLLAMA_NUM_PARALLEL"
    param = "engines.ollama.num_parallel"  # a dotted key of the experiment document
    values = [1, 2, 4, 8]
    engines = ["ollama"]             # optional subset of engines to run
    loads = [1, 8, 32]               # optional subset of clients / rates
    figures = ["A.1", "A.3"]         # figures re-evaluated at every value
    notes = "..."

Only test figures get a verdict (verdicts.py): "physically implausible" when the published figure
lies beyond the physical bound of sim.lab.audit (roofline or queueing), whatever the simulation
says; "reproduced" when the simulated figure is within 25% (inside a range widened by 25%, or
satisfying op); "differs" otherwise; "flips" when the seeds disagree. Inputs, identities and fits
are checked ("agrees" / "disagrees"), not judged.

Modules: schema ([published] parsing, derived experiments), verdicts, results (reading a run),
run (run_claims: variants, seeds, sweeps, claims.csv / sweeps.csv / audit.txt), report (printing).

Plain Python, no JAX.
"""
from __future__ import annotations

from sim.lab.claims.report import (counts, counts_text, format_sweeps, format_table, simulated_text, value_text,
                                   verdict_text)
from sim.lab.claims.results import (TIMESERIES_ROWS_PER_CELL, Results, cell_stats_from_timeseries, max_concurrent,
                                    update_cell_stats)
from sim.lab.claims.run import CLAIMS_COLUMNS, ClaimsReport, Run, evaluate, load_report, run_claims
from sim.lab.claims.schema import (CLASSES, DEFAULT_SEEDS, DERIVED_METRICS, ENGINE_LEVEL, OPS, Claims, Figure, Sweep,
                                   derive_experiment, parse_claims, sweep_experiment, variant_label)
from sim.lab.claims.verdicts import CHECKS, TOLERANCE, VERDICTS, across_seeds, check, ratio, verdict

__all__ = ["CHECKS", "CLAIMS_COLUMNS", "CLASSES", "Claims", "ClaimsReport", "DEFAULT_SEEDS", "DERIVED_METRICS",
           "ENGINE_LEVEL", "Figure", "OPS", "Results", "Run", "Sweep", "TIMESERIES_ROWS_PER_CELL", "TOLERANCE",
           "VERDICTS", "across_seeds", "cell_stats_from_timeseries", "check", "counts", "counts_text",
           "derive_experiment", "evaluate", "format_sweeps", "format_table", "load_report", "max_concurrent",
           "parse_claims", "ratio", "run_claims", "simulated_text", "sweep_experiment", "update_cell_stats",
           "value_text", "variant_label", "verdict", "verdict_text"]
