"""The lab: experiment configs, workloads, metrics, the simulator and engine benches, profiling, serving,
validation, published claims and their audit, plots, teaching traces, and the `servesim` command line.

It sits on top of both halves: sim.core (the simulator) and reference (the engine).
"""
