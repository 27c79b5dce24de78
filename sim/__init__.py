"""servesim simulator: SimPy replicas that run the reference engine's schedulers against a cost model.

Nothing under sim/ imports JAX.
"""
