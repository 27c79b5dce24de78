"""The simulator core: hardware, weight formats, cost models, memory plans, and the SimPy replica.

It drives the engine's own schedulers (reference.schedulers) on a simulated clock. Nothing here
imports JAX, directly or through the engine: the contract is checked in CI (pyproject.toml).
"""
