"""Wire types of the console's JSON read API (``/v2/registry``, ``/v2/jobs``,
``/v2/audit``, ``/v2/drift``): what each route answers and what each action takes.

Declared once, here: the handlers encode these, the OpenAPI document's
schemas are generated from them (``schemas()``), so a field cannot drift
between the answer and its description. Shaped for a page to render as
they come (versions with their approvals and gates; lineage as nodes and
edges; a job with its epochs and the tail of its log).
"""

from __future__ import annotations

from typing import Any

import msgspec

from flywheel.registry.types import Approval
from flywheel.registry.types import Artifact, AuditEntry, Lineage


class ModelSummary(msgspec.Struct, frozen=True):
    """One registered model; ``production_version``: None when none is."""

    name: str
    description: str
    tags: dict[str, str]
    created_at: float
    created_by: str
    latest_version: int
    aliases: dict[str, int]
    production_version: int | None


class ModelList(msgspec.Struct, frozen=True):
    models: list[ModelSummary]


class VersionView(msgspec.Struct, frozen=True):
    """A version as a page shows it. ``gates``: what would stop it from
    going to production now (empty: nothing), one message per failed rule."""

    name: str
    version: int
    stage: str
    aliases: list[str]
    metrics: dict[str, float]
    params: dict[str, Any]
    tags: dict[str, str]
    lineage: Lineage
    artifacts: dict[str, Artifact]
    created_at: float
    created_by: str
    approvals: list[Approval]
    gates: list[str]


class ModelDetail(msgspec.Struct, frozen=True):
    """A model, its gate policy (as configured) and its versions, oldest first."""

    model: ModelSummary
    policy: dict[str, Any]
    versions: list[VersionView]


class LineageNode(msgspec.Struct, frozen=True):
    """``kind``: version, data (a training data fingerprint), code (a commit),
    job (a training job) or evaluation (a dataset a version was scored on)."""

    id: str
    kind: str
    label: str
    detail: dict[str, Any] = {}


class LineageEdge(msgspec.Struct, frozen=True):
    """``source`` -> ``target``; ``relation``: derived_from (a version from
    its parent), trained_on, built_from, produced_by, evaluated_on."""

    source: str
    target: str
    relation: str


class LineageGraph(msgspec.Struct, frozen=True):
    """``root``: the node id of the version asked about (``name/version``)."""

    root: str
    nodes: list[LineageNode]
    edges: list[LineageEdge]


class AuditPage(msgspec.Struct, frozen=True):
    """Entries matching the filters, newest first; ``limit``: how many were
    asked for at most (fewer entries: nothing older matched)."""

    entries: list[AuditEntry]
    limit: int


class JobSummary(msgspec.Struct, frozen=True):
    id: str
    name: str
    state: str
    priority: int
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    cancel_requested: bool
    error: str
    result: dict[str, Any]


class JobList(msgspec.Struct, frozen=True):
    """Newest submission first."""

    jobs: list[JobSummary]


class EpochMetrics(msgspec.Struct, frozen=True):
    """One finished epoch (training/loop.py writes them); a figure the job
    did not measure is None."""

    epoch: int
    global_step: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    samples_per_s: float | None = None
    lr: float | None = None


class JobDetail(msgspec.Struct, frozen=True):
    """A job, its spec, its epochs (oldest first), its latest step
    (``progress``: None before the first) and the last lines of its log."""

    job: JobSummary
    spec: dict[str, Any]
    epochs: list[EpochMetrics]
    progress: dict[str, Any] | None
    log_tail: list[str]


class ApprovalResult(msgspec.Struct, frozen=True):
    """After an approval: every approval of the version, and what still
    stops it from going to production."""

    model: str
    version: int
    by: str
    approvals: list[Approval]
    gates: list[str]


class DriftPoint(msgspec.Struct, frozen=True):
    """One scored window's figures for one feature; ``p_value`` is the
    adjusted one the flag was decided on (None for psi, which has none)."""

    ts: float
    statistic: float | None
    p_value: float | None
    drift: bool


class DriftSeries(msgspec.Struct, frozen=True):
    """One test's figures for one feature over time, oldest first; a joint
    test (mmd) scores all features at once: one series, feature ``0``."""

    test: str
    feature: str
    points: list[DriftPoint]


class DriftWindow(msgspec.Struct, frozen=True):
    """A scored window that drifted: when, which test, which features."""

    ts: float
    test: str
    features: list[str]


class DriftHistory(msgspec.Struct, frozen=True):
    """The drift monitor's recent history of one served model version."""

    model: str
    version: str
    series: list[DriftSeries]
    flagged: list[DriftWindow]


# -- action bodies (decoded once, at the edge) --------------------------------

class ApproveBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    comment: str = ""


class PromoteBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``stage``: none, staging, production or archived."""

    stage: str


class AliasBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``alias``: moved to the version in the path; ``production`` passes the gates."""

    alias: str


class RollbackBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``to``: the former production version to restore (None: the latest)."""

    to: int | None = None


RESPONSES = (ModelList, ModelDetail, VersionView, LineageGraph, AuditPage, JobList, JobDetail, JobSummary,
             ApprovalResult, DriftHistory)
BODIES = (ApproveBody, PromoteBody, AliasBody, RollbackBody)


def schemas() -> dict[str, dict]:
    """OpenAPI 3.0 component schemas of every type above (and the types
    they hold), named as the classes are."""
    _, components = msgspec.json.schema_components(
        (*RESPONSES, *BODIES), ref_template="#/components/schemas/{name}")
    return {name: _openapi30(schema) for name, schema in components.items()}


def _openapi30(node: Any) -> Any:
    """JSON Schema as msgspec writes it, in OpenAPI 3.0's dialect: an
    optional value is ``nullable`` rather than a union with ``{"type": "null"}``."""
    if isinstance(node, list):
        return [_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _openapi30(v) for k, v in node.items() if not (k == "required" and v == [])}  # 3.0: non-empty
    options = node.get("anyOf")
    if options is not None and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        node.pop("anyOf")
        base = rest[0] if len(rest) == 1 else {"anyOf": rest}
        if "$ref" in base:  # siblings of $ref are ignored in 3.0: wrap it
            base = {"allOf": [base]}
        node.update(base)
        node["nullable"] = True
    return node
