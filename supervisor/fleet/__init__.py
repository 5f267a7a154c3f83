"""The fleet of workers: one record per replica (replica.py), written by the fleet alone (core.py);
each replica's process run by its lifecycle (lifecycle.py); GPU room plans carried out at its gate."""

from .core import Fleet
from .group import WorkerGroup
from .process import ExitInfo, Incarnation, InFlight
from .reload import ReloadSummary
from .replica import Replica

__all__ = ["ExitInfo", "Fleet", "InFlight", "Incarnation", "ReloadSummary", "Replica", "WorkerGroup"]
