"""Scheduling policies, plain Python (no JAX): the same objects run in the engine and in the simulator."""
from reference.schedulers.base import Scheduler
from reference.schedulers.continuous import ContinuousScheduler
from reference.schedulers.orca import OrcaScheduler
from reference.schedulers.sequential import SequentialScheduler
from reference.schedulers.static import StaticScheduler

__all__ = ["Scheduler", "ContinuousScheduler", "OrcaScheduler", "SequentialScheduler", "StaticScheduler"]
