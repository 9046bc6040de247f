"""Flywheel model registry: versions, aliases, stages, gates, lineage,
evaluations, audit.

No Ray here. SQLite by default, PostgreSQL for a cluster (same API, chosen by
the URI); artifacts on a local folder or any fsspec URI.
"""

from flywheel.registry.gates import GatePolicy, load_policy, parse_policy
from flywheel.registry.loop_store import LoopEvent, LoopRun, LoopStore
from flywheel.registry.lineage import code_version, fingerprint_arrays, fingerprint_files
from flywheel.registry.registry import Registry
from flywheel.registry.router_state import RouterStateStore
from flywheel.registry.types import (
    STAGES,
    Artifact,
    AuditEntry,
    Evaluation,
    Lineage,
    LineageReport,
    ModelVersion,
    RegisteredModel,
)

__all__ = [
    "STAGES",
    "Artifact",
    "AuditEntry",
    "Evaluation",
    "GatePolicy",
    "Lineage",
    "LineageReport",
    "LoopEvent",
    "LoopRun",
    "LoopStore",
    "ModelVersion",
    "RegisteredModel",
    "Registry",
    "RouterStateStore",
    "code_version",
    "fingerprint_arrays",
    "fingerprint_files",
    "load_policy",
    "parse_policy",
]
