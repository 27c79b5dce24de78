"""servesim reference engine: a small, complete LLM serving engine in JAX.

Importing this package does not import JAX: the host-side parts (model shapes, block
manager, schedulers) are shared with the simulator, which must run without JAX.
"""
