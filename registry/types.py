"""Registry records: plain msgspec structs, returned by the Registry API."""

from __future__ import annotations

from typing import Any

import msgspec

STAGES = ("none", "staging", "production", "archived")


class Lineage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a version was produced.

    data_fingerprint: sha256 of the training data (or of its manifest).
    code_commit / code_dirty: git commit of the training code and whether the
        work tree had uncommitted changes.
    training_config: the full job configuration.
    parent: "name/version" this one derives from (fine-tune, quantized or
        exported variant), or "".
    job_id: the training job that produced it.
    """

    data_fingerprint: str = ""
    code_commit: str = ""
    code_dirty: bool = False
    training_config: dict[str, Any] = {}
    parent: str = ""
    job_id: str = ""


class Artifact(msgspec.Struct, frozen=True):
    name: str
    uri: str
    sha256: str
    size: int


class RegisteredModel(msgspec.Struct, frozen=True):
    name: str
    description: str
    tags: dict[str, str]
    created_at: float
    created_by: str
    aliases: dict[str, int] = {}
    latest_version: int = 0


class ModelVersion(msgspec.Struct, frozen=True):
    name: str
    version: int
    stage: str
    signature: dict[str, Any]
    metrics: dict[str, float]
    params: dict[str, Any]
    tags: dict[str, str]
    lineage: Lineage
    artifacts: dict[str, Artifact]
    created_at: float
    created_by: str
    aliases: list[str] = []

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


class AuditEntry(msgspec.Struct, frozen=True):
    id: int
    ts: float
    actor: str
    action: str
    model: str
    version: int | None
    before: Any
    after: Any
    loop_run: str = ""  # the loop run this step belongs to ("" = none)


class Approval(msgspec.Struct, frozen=True):
    """One approval of a version: the normalised identity, its comment and
    when it was given (Unix seconds)."""

    actor: str
    comment: str
    ts: float


class Evaluation(msgspec.Struct, frozen=True):
    """One evaluation of a version on a dataset (a batch run's result).

    dataset: the URI or name the user gave (e.g. "s3://b/holdout/").
    fingerprint: sha256 of the dataset's manifest (each file's name and
        content hash): what the data was, whatever it is called. A gate
        that names the dataset matches by name; one that must hold for
        exactly this data names the fingerprint.
    rows: how many rows were scored; run_id: the run that produced it.
    """

    id: int
    model: str
    version: int
    dataset: str
    fingerprint: str
    metrics: dict[str, float]
    rows: int
    run_id: str
    created_at: float
    created_by: str

    @property
    def ref(self) -> str:
        return f"{self.model}/{self.version}"


class LineageReport(msgspec.Struct, frozen=True):
    """A version, the chain of versions it derives from (nearest first) and
    the version's own evaluations (oldest first)."""

    version: ModelVersion
    ancestors: list[ModelVersion]
    evaluations: list[Evaluation] = []
