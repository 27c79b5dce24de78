"""servesim's simulator (sim.core) and the lab built on it and on the engine (sim.lab)."""
