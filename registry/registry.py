"""The model registry: versions, aliases, stages, gates, lineage, evaluations
and audit.

Thread-safety: a Registry may be shared by threads; any number of processes
may open the same store (SQLite file or PostgreSQL) at once. Every mutation is
one transaction that also appends its audit entry, so the log and the state
never disagree.

Governance: stage ``production`` and the ``production`` alias are one fact
written in two places, and every way to change it keeps them equal:
``promote(name, v, "production")`` and ``set_alias(name, "production", v)``
take the same gated move (the model's GatePolicy, approvals included, or
PreconditionFailedError naming each failed rule); archiving the production
version removes the alias with it; ``delete_alias(name, "production")`` and
``delete_version`` of the production version are refused. ``rollback`` is
the one ungated move, the emergency exit: it only restores a version that
was in production before (so it passed the gates then).

Approvals are bound to an identity string, normalised (trimmed, inner
whitespace collapsed, lower case) so that one identity counts once. Callers
name identities by how they were authenticated: the CLI records ``os:<user>``,
the HTTP route ``key:<API key name>``; ``os:alice`` and ``key:alice`` are two
identities (nothing proves they are one person).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from flywheel.registry.db import Db, connect
from flywheel.registry.artifacts import ArtifactStore
from flywheel.registry.gates import GateContext, GatePolicy, evaluate
from flywheel.registry.migrations import migrate
from flywheel.registry.types import (
    STAGES,
    Approval,
    Artifact,
    AuditEntry,
    Evaluation,
    Lineage,
    LineageReport,
    ModelVersion,
    RegisteredModel,
)
from flywheel.protocol.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
PRODUCTION = "production"  # the stage, and the alias that always names its version
_ARTIFACT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_METADATA_BYTES = 64 * 1024
# Allowed stage moves; "archived" is reachable from anywhere, and rollback
# brings an archived former production version back.
_TRANSITIONS = {"none": {"staging"}, "staging": {"production", "none"}, "production": set(), "archived": set()}
_ENC = msgspec.json.Encoder()


def _json(field: str, value: Any) -> str:
    raw = _ENC.encode(value)
    if len(raw) > MAX_METADATA_BYTES:
        raise InvalidInputError(f"{field} is {len(raw)} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return raw.decode()


def identity(actor: str) -> str:
    """The canonical form of an approver's identity: trimmed, inner
    whitespace collapsed to one space, lower case (``" Key:Alice "`` and
    ``"key:alice"`` are one identity). InvalidInputError when empty."""
    if not isinstance(actor, str) or not actor.strip():
        raise InvalidInputError(f"an approval needs a non-empty identity, got {actor!r}")
    return " ".join(actor.split()).lower()


def _check_name(kind: str, value: str, pattern: re.Pattern = _NAME) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidInputError(f"{kind} {value!r} must match {pattern.pattern}")


_EVALUATION_COLUMNS = "id, model, version, dataset, fingerprint, metrics, rows, run_id, created_at, created_by"


def _to_evaluation(row: tuple) -> Evaluation:
    i, model, version, dataset, fp, metrics, rows, run_id, at, by = row
    return Evaluation(i, model, version, dataset, fp, msgspec.json.decode(metrics), rows, run_id, at, by)


def _check_evaluation(dataset: str, fingerprint: str, metrics: Mapping[str, float], rows: int,
                      run_id: str) -> dict[str, float]:
    """The metrics as finite floats; InvalidInputError names the bad field."""
    for field, value in (("dataset", dataset), ("fingerprint", fingerprint)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidInputError(f"{field} must be a non-empty string, got {value!r}")
    if not isinstance(run_id, str):
        raise InvalidInputError(f"run_id must be a string, got {run_id!r}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise InvalidInputError(f"rows must be a non-negative integer, got {rows!r}")
    if not isinstance(metrics, Mapping):
        raise InvalidInputError(f"metrics must be a mapping of name to number, got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"metrics: name {key!r} must be a non-empty string")
        # bool is an int, but True is no measurement
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInputError(f"metrics[{key!r}] must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


_VERSION_COLUMNS = (
    "model, version, stage, signature, metrics, params, tags, data_fingerprint, code_commit, "
    "code_dirty, training_config, parent, job_id, created_at, created_by"
)


def _file_sha256(path: str) -> str:
    """The file's sha256 (hex); "" when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


class Registry:
    """Open with :meth:`open`; see the module docstring."""

    def __init__(self, db: Db, artifacts: ArtifactStore, cache_dir: str) -> None:
        self._db = db
        self._store = artifacts
        self._cache = cache_dir
        migrate(db)

    @classmethod
    def open(cls, uri: str, artifacts: str, *, cache_dir: str | None = None) -> Registry:
        """``uri``: ``sqlite:///path.db`` / a path / ``postgresql://...``;
        ``artifacts``: a folder or fsspec URI. Migrates an older schema."""
        db = connect(uri)
        cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "flywheel", "artifacts")
        return cls(db, ArtifactStore(artifacts), cache)

    def close(self) -> None:
        self._db.close()

    # -- internals ----------------------------------------------------------
    def _audit(self, actor: str, action: str, model: str, version: int | None, before: Any, after: Any,
               loop_run: str = "") -> None:
        self._db.execute(
            "INSERT INTO audit (ts, actor, action, model, version, before_json, after_json, loop_run) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), actor, action, model, version, _ENC.encode(before).decode(), _ENC.encode(after).decode(),
             loop_run),
        )

    def record(self, actor: str, action: str, model: str, version: int | None = None, detail: Any = None, *,
               loop_run: str = "") -> None:
        """Append one entry to the audit log for a step taken outside the
        registry's own operations (a loop's trigger, job, canary, outcome),
        tagged with the loop run it belongs to."""
        _check_name("audit action", action)
        with self._db.tx():
            self._audit(actor, action, model, version, None, detail, loop_run)

    def _require_model(self, name: str) -> tuple:
        rows = self._db.execute(
            "SELECT name, description, tags, next_version, policy, created_at, created_by FROM registered_models WHERE name = ?",
            (name,),
        )
        if not rows:
            raise NotFoundError(f"unknown model {name!r}")
        return rows[0]

    def _version_row(self, name: str, version: int) -> tuple:
        rows = self._db.execute(f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE model = ? AND version = ?", (name, version))
        if not rows:
            self._require_model(name)
            raise NotFoundError(f"model {name!r} has no version {version}")
        return rows[0]

    def _to_version(self, row: tuple) -> ModelVersion:
        (model, version, stage, signature, metrics, params, tags, fp, commit, dirty, cfg, parent, job, at, by) = row
        arts = {
            n: Artifact(n, uri, sha, size)
            for n, uri, sha, size in self._db.execute(
                "SELECT name, uri, sha256, size FROM artifacts WHERE model = ? AND version = ? ORDER BY name", (model, version)
            )
        }
        aliases = [a for (a,) in self._db.execute(
            "SELECT alias FROM aliases WHERE model = ? AND version = ? ORDER BY alias", (model, version))]
        d = msgspec.json.decode
        return ModelVersion(
            name=model, version=version, stage=stage, signature=d(signature), metrics=d(metrics), params=d(params),
            tags=d(tags), lineage=Lineage(fp, commit, bool(dirty), d(cfg), parent, job), artifacts=arts,
            created_at=at, created_by=by, aliases=aliases,
        )

    # -- models -------------------------------------------------------------
    def create_model(self, name: str, *, description: str = "", tags: Mapping[str, str] | None = None,
                     actor: str) -> RegisteredModel:
        """Register a new model name; AlreadyExistsError if it exists."""
        _check_name("model name", name)
        tags_json = _json("tags", dict(tags or {}))
        _json("description", description)  # size check
        with self._db.tx():
            if self._db.execute("SELECT 1 FROM registered_models WHERE name = ?", (name,)):
                raise AlreadyExistsError(f"model {name!r} is already registered")
            now = time.time()
            self._db.execute(
                "INSERT INTO registered_models (name, description, tags, next_version, policy, created_at, created_by) "
                "VALUES (?, ?, ?, 1, NULL, ?, ?)",
                (name, description, tags_json, now, actor),
            )
            self._audit(actor, "create_model", name, None, None, {"description": description, "tags": dict(tags or {})})
        return self.get_model(name)

    def get_model(self, name: str) -> RegisteredModel:
        name_, desc, tags, next_version, _policy, at, by = self._require_model(name)
        aliases = dict(self._db.execute("SELECT alias, version FROM aliases WHERE model = ? ORDER BY alias", (name,)))
        return RegisteredModel(name_, desc, msgspec.json.decode(tags), at, by, aliases, next_version - 1)

    def list_models(self) -> list[RegisteredModel]:
        return [self.get_model(n) for (n,) in self._db.execute("SELECT name FROM registered_models ORDER BY name")]

    # -- versions -----------------------------------------------------------
    def register_version(
        self,
        name: str,
        artifacts: Mapping[str, str | Path | bytes],
        *,
        actor: str,
        signature: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        lineage: Lineage | None = None,
        create_model: bool = True,
    ) -> ModelVersion:
        """Store the artifacts (content-addressed, hashed) and record a new
        version with the next number for ``name``. Nothing is recorded unless
        everything was stored: the DB rows are written in one transaction after
        the blobs are in place."""
        _check_name("model name", name)
        if not artifacts:
            raise InvalidInputError("a version needs at least one artifact")
        for art in artifacts:
            _check_name("artifact name", art, _ARTIFACT)
        lineage = lineage or Lineage()
        fields = {
            "signature": _json("signature", dict(signature or {})),
            "metrics": _json("metrics", {k: float(v) for k, v in (metrics or {}).items()}),
            "params": _json("params", dict(params or {})),
            "tags": _json("tags", dict(tags or {})),
            "training_config": _json("lineage.training_config", lineage.training_config),
        }
        if lineage.parent:
            pname, _, pver = lineage.parent.partition("/")
            if not pver.isdigit():
                raise InvalidInputError(f"lineage.parent {lineage.parent!r} must be 'name/version'")
            self._version_row(pname, int(pver))
        stored = {art: self._store.put(src) for art, src in artifacts.items()}
        if create_model and not self._db.execute("SELECT 1 FROM registered_models WHERE name = ?", (name,)):
            try:
                self.create_model(name, actor=actor)
            except AlreadyExistsError:
                pass  # a concurrent writer created it first
        with self._db.tx():
            rows = self._db.execute(
                "UPDATE registered_models SET next_version = next_version + 1 WHERE name = ? RETURNING next_version",
                (name,),
            )
            if not rows:
                raise NotFoundError(f"unknown model {name!r} (create it first, or pass create_model=True)")
            version = rows[0][0] - 1
            now = time.time()
            self._db.execute(
                f"INSERT INTO model_versions ({_VERSION_COLUMNS}) VALUES (?, ?, 'none', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, fields["signature"], fields["metrics"], fields["params"], fields["tags"],
                 lineage.data_fingerprint, lineage.code_commit, int(lineage.code_dirty), fields["training_config"],
                 lineage.parent, lineage.job_id, now, actor),
            )
            for art, (uri, sha, size) in stored.items():
                self._db.execute(
                    "INSERT INTO artifacts (model, version, name, uri, sha256, size) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, version, art, uri, sha, size),
                )
            self._audit(actor, "register", name, version, None,
                        {"artifacts": {a: s[1] for a, s in stored.items()}, "lineage": msgspec.to_builtins(lineage)})
        return self.get_version(name, version)

    def get_version(self, name: str, version: int) -> ModelVersion:
        return self._to_version(self._version_row(name, int(version)))

    def list_versions(self, name: str) -> list[ModelVersion]:
        self._require_model(name)
        rows = self._db.execute(f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE model = ? ORDER BY version", (name,))
        return [self._to_version(r) for r in rows]

    def resolve(self, ref: str) -> ModelVersion:
        """``name@alias``, ``name/version`` or ``name`` (its latest version)."""
        if "@" in ref:
            name, alias = ref.split("@", 1)
            self._require_model(name)
            rows = self._db.execute("SELECT version FROM aliases WHERE model = ? AND alias = ?", (name, alias))
            if not rows:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}")
            return self.get_version(name, rows[0][0])
        if "/" in ref:
            name, version = ref.split("/", 1)
            if not version.isdigit():
                raise InvalidInputError(f"reference {ref!r}: version must be a number")
            return self.get_version(name, int(version))
        rows = self._db.execute("SELECT max(version) FROM model_versions WHERE model = ?", (ref,))
        if not rows or rows[0][0] is None:
            self._require_model(ref)
            raise NotFoundError(f"model {ref!r} has no versions")
        return self.get_version(ref, rows[0][0])

    def set_tag(self, name: str, version: int, key: str, value: str, *, actor: str) -> ModelVersion:
        with self._db.tx():
            row = self._version_row(name, version)
            tags = msgspec.json.decode(row[6])
            before = dict(tags)
            tags[key] = value
            self._db.execute("UPDATE model_versions SET tags = ? WHERE model = ? AND version = ?",
                             (_json("tags", tags), name, version))
            self._audit(actor, "tag", name, version, before, tags)
        return self.get_version(name, version)

    def delete_version(self, name: str, version: int, *, actor: str) -> None:
        """Remove a version (its aliases, approvals and evaluations go with it;
        blobs stay, content-addressed, possibly shared)."""
        with self._db.tx():
            row = self._version_row(name, version)
            if row[2] == "production":
                raise PreconditionFailedError(
                    f"{name}/{version} is in production: promote another version or roll back first"
                )
            self._db.execute("DELETE FROM model_versions WHERE model = ? AND version = ?", (name, version))
            self._audit(actor, "delete_version", name, version, {"stage": row[2]}, None)

    # -- artifacts ----------------------------------------------------------
    def _artifact(self, ref: str, artifact: str) -> tuple[ModelVersion, Artifact]:
        mv = self.resolve(ref)
        art = mv.artifacts.get(artifact)
        if art is None:
            raise NotFoundError(f"{mv.ref} has no artifact {artifact!r}; it has {sorted(mv.artifacts)}")
        return mv, art

    def read_artifact(self, ref: str, artifact: str) -> bytes:
        """An artifact's bytes, verified against its recorded sha256."""
        mv, art = self._artifact(ref, artifact)
        return self._store.read_verified(art.uri, art.sha256, f"{mv.ref}:{artifact}")

    def artifact_path(self, ref: str, artifact: str) -> tuple[ModelVersion, str]:
        """A local path to the verified artifact (hashed on every call) and
        the version it belongs to."""
        mv, art = self._artifact(ref, artifact)
        return mv, self._store.local_verified(art.uri, art.sha256, f"{mv.ref}:{artifact}", self._cache)

    def version_folder(self, ref: str) -> tuple[ModelVersion, str]:
        """A local folder holding every artifact of the version, each under
        its own name (``model.py``, ``weights.npz``...), for a backend that
        loads a folder (the python backend), and the version.

        The folder lives in the cache, named by the artifacts' names and
        digests, so versions with equal artifacts share it; it is built in a
        temporary folder renamed into place, and its files are re-hashed on
        every call (one that fails is rebuilt from the verified blobs)."""
        mv = self.resolve(ref)
        arts = sorted(mv.artifacts.items())
        key = hashlib.sha256("".join(f"{n}\0{a.sha256}\n" for n, a in arts).encode()).hexdigest()
        folder = os.path.join(self._cache, "versions", key)
        if os.path.isdir(folder) and all(_file_sha256(os.path.join(folder, n)) == a.sha256 for n, a in arts):
            return mv, folder
        tmp = f"{folder}.{uuid.uuid4().hex}"
        os.makedirs(tmp)
        try:
            for n, a in arts:
                src = self._store.local_verified(a.uri, a.sha256, f"{mv.ref}:{n}", self._cache)
                shutil.copyfile(src, os.path.join(tmp, n))
            if os.path.isdir(folder):  # damaged: its files no longer match their digests
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(tmp, folder)
            except OSError:  # another loader put an equal folder there first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return mv, folder

    # -- aliases, stages, approvals, gates -------------------------------------
    def set_alias(self, name: str, alias: str, version: int, *, actor: str) -> None:
        """Point ``name@alias`` at ``version`` (atomically moving it).

        ``production`` is no plain pointer: setting it is the gated move to
        production that ``promote(name, version, "production")`` takes
        (from any stage but archived: the alias path skips staging), so the
        version's stage follows and the former production version is
        archived; PreconditionFailedError names each failed gate and nothing
        changes. Setting it to the version already there changes nothing."""
        _check_name("alias", alias, _ALIAS)
        with self._db.tx():
            stage = self._version_row(name, version)[2]
            if alias == PRODUCTION:
                if stage == "archived":
                    raise PreconditionFailedError(
                        f"{name}/{version} is archived: bring it back with `rollback` (to a version that was "
                        "in production before), not by moving the production alias"
                    )
                self._to_production(name, version, stage, actor)
            else:
                self._move_alias(name, alias, version, actor)

    def _move_alias(self, name: str, alias: str, version: int, actor: str) -> None:
        rows = self._db.execute("SELECT version FROM aliases WHERE model = ? AND alias = ?", (name, alias))
        before = rows[0][0] if rows else None
        if rows:
            self._db.execute("UPDATE aliases SET version = ? WHERE model = ? AND alias = ?", (version, name, alias))
        else:
            self._db.execute("INSERT INTO aliases (model, alias, version) VALUES (?, ?, ?)", (name, alias, version))
        self._audit(actor, "alias", name, version, {"alias": alias, "version": before},
                    {"alias": alias, "version": version})

    def _drop_alias(self, name: str, alias: str, version: int, actor: str) -> None:
        self._db.execute("DELETE FROM aliases WHERE model = ? AND alias = ?", (name, alias))
        self._audit(actor, "delete_alias", name, version, {"alias": alias, "version": version}, None)

    def _production(self, name: str) -> int | None:
        rows = self._db.execute("SELECT version FROM model_versions WHERE model = ? AND stage = 'production'", (name,))
        return rows[0][0] if rows else None

    def production_version(self, name: str) -> int | None:
        """The version in production (stage and alias agree), or None."""
        self._require_model(name)
        return self._production(name)

    def delete_alias(self, name: str, alias: str, *, actor: str) -> None:
        """Remove ``name@alias``. PreconditionFailedError for ``production``
        while a version is in stage production: the alias and the stage would
        disagree (archive the version to take it out of production)."""
        with self._db.tx():
            rows = self._db.execute("SELECT version FROM aliases WHERE model = ? AND alias = ?", (name, alias))
            if not rows:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}")
            current = self._production(name) if alias == PRODUCTION else None
            if current is not None:
                raise PreconditionFailedError(
                    f"{name}@{PRODUCTION} names {name}/{current}, which is in stage production: deleting the alias "
                    f"would make them disagree; archive it instead (promote {name} {current} archived), which "
                    "removes the alias too"
                )
            self._drop_alias(name, alias, rows[0][0], actor)

    def approve(self, name: str, version: int, *, actor: str, comment: str = "") -> None:
        """Record the approval of a version by the identity ``actor`` (see
        :func:`identity`: normalised, and counted once toward a policy's
        ``approvals`` rule). The caller vouches for the identity: the CLI
        passes the OS user (``os:<user>``), the HTTP route the API key's
        name (``key:<name>``). AlreadyExistsError when that identity already
        approved this version; InvalidInputError for an empty identity."""
        who = identity(actor)
        _json("comment", comment)  # size check
        with self._db.tx():
            self._version_row(name, version)
            approvers = {identity(a) for (a,) in self._db.execute(
                "SELECT actor FROM approvals WHERE model = ? AND version = ?", (name, version))}
            if who in approvers:
                raise AlreadyExistsError(f"{who} already approved {name}/{version}; an identity counts once")
            self._db.execute("INSERT INTO approvals (model, version, actor, comment, ts) VALUES (?, ?, ?, ?, ?)",
                             (name, version, who, comment, time.time()))
            self._audit(who, "approve", name, version, None, {"comment": comment})

    def approvals(self, name: str, version: int) -> list[str]:
        """The distinct identities that approved ``name/version``, sorted."""
        self._version_row(name, version)
        return sorted({identity(a) for (a,) in self._db.execute(
            "SELECT actor FROM approvals WHERE model = ? AND version = ?", (name, version))})

    def approval_records(self, name: str, version: int) -> list[Approval]:
        """Every approval of ``name/version`` with its comment and time,
        oldest first."""
        self._version_row(name, version)
        rows = self._db.execute(
            "SELECT actor, comment, ts FROM approvals WHERE model = ? AND version = ? ORDER BY ts", (name, version))
        return [Approval(a, c or "", float(ts)) for a, c, ts in rows]

    def set_policy(self, name: str, policy: GatePolicy, *, actor: str) -> None:
        with self._db.tx():
            before = self._require_model(name)[4]
            after = _json("policy", policy)
            self._db.execute("UPDATE registered_models SET policy = ? WHERE name = ?", (after, name))
            self._audit(actor, "policy", name, None, msgspec.json.decode(before) if before else None,
                        msgspec.json.decode(after))

    def get_policy(self, name: str) -> GatePolicy:
        raw = self._require_model(name)[4]
        return msgspec.json.decode(raw, type=GatePolicy) if raw else GatePolicy()

    def check_gates(self, name: str, version: int) -> list[str]:
        """What would stop ``version`` from going to production (empty:
        nothing), one message per failed rule, each starting with the rule's
        name. ``not_worse_than_production`` compares the newest evaluation
        the version and the production version share a dataset fingerprint
        on, else their training metrics (registry/gates.py)."""
        mv = self.get_version(name, version)
        prod = self._production(name)
        prod_metrics = self.get_version(name, prod).metrics if prod is not None else None
        prod_evaluations = tuple(self.evaluations(name, prod)) if prod is not None else ()
        approvers = frozenset(self.approvals(name, version))
        evaluations = tuple(self.evaluations(name, version))
        return evaluate(self.get_policy(name),
                        GateContext(mv.metrics, prod_metrics, approvers, evaluations, prod_evaluations))

    def promote(self, name: str, version: int, stage: str, *, actor: str) -> ModelVersion:
        """Move a version to ``stage`` (none -> staging -> production; anything
        -> archived). Production passes the model's gates first; the previous
        production version is archived and the ``staging``/``production``
        alias follows, all in one transaction. Archiving the production
        version takes the ``production`` alias away with it (nothing is in
        production afterwards)."""
        if stage not in STAGES:
            raise InvalidInputError(f"stage {stage!r} must be one of {', '.join(STAGES)}")
        with self._db.tx():
            current = self._version_row(name, version)[2]
            if stage != "archived" and stage not in _TRANSITIONS[current]:
                raise PreconditionFailedError(
                    f"{name}/{version} is in stage {current!r}; it can move to "
                    f"{sorted(_TRANSITIONS[current] | {'archived'})}, not {stage!r}"
                )
            if stage == PRODUCTION:
                self._to_production(name, version, current, actor)
                return self.get_version(name, version)
            self._set_stage(name, version, current, stage, actor)
            if stage == "staging":
                self._move_alias(name, stage, version, actor)
            if current == PRODUCTION:  # archived: nothing is in production now
                rows = self._db.execute("SELECT version FROM aliases WHERE model = ? AND alias = ?",
                                        (name, PRODUCTION))
                if rows:
                    self._drop_alias(name, PRODUCTION, rows[0][0], actor)
        return self.get_version(name, version)

    def _to_production(self, name: str, version: int, current: str, actor: str) -> None:
        """The one gated move to production (inside a transaction): gates,
        then the former production version archived, this one's stage and
        the alias moved together."""
        alias = self._db.execute("SELECT version FROM aliases WHERE model = ? AND alias = ?", (name, PRODUCTION))
        if current == PRODUCTION and alias and alias[0][0] == version:
            return  # already there: nothing to check or move
        failures = self.check_gates(name, version)
        if failures:
            raise PreconditionFailedError(
                f"promotion of {name}/{version} to production refused: " + "; ".join(failures)
            )
        for (old,) in self._db.execute(
            "SELECT version FROM model_versions WHERE model = ? AND stage = 'production' AND version != ?",
            (name, version),
        ):
            self._set_stage(name, old, PRODUCTION, "archived", actor)
        if current != PRODUCTION:
            self._set_stage(name, version, current, PRODUCTION, actor)
        self._move_alias(name, PRODUCTION, version, actor)

    def _set_stage(self, name: str, version: int, before: str, after: str, actor: str) -> None:
        self._db.execute("UPDATE model_versions SET stage = ? WHERE model = ? AND version = ?", (after, name, version))
        self._audit(actor, "stage", name, version, {"stage": before}, {"stage": after})

    def rollback(self, name: str, *, actor: str, to: int | None = None) -> ModelVersion:
        """Put an earlier production version back in production, archiving
        the current one; stage and alias move together. No gates: this is
        the emergency exit, and it only restores a version that was in
        production before (it passed the gates then, or was put there
        before they existed). ``to``: which one (default: the most recent
        other than the current); ``to`` equal to the current production
        version changes nothing. PreconditionFailedError when nothing is in
        production or ``to`` never was."""
        with self._db.tx():
            current = self._production(name)
            if current is None:
                self._require_model(name)
                raise PreconditionFailedError(f"model {name!r} has nothing in production to roll back")
            if to is not None and int(to) == current:
                return self.get_version(name, current)
            history = self._db.execute(
                "SELECT version, after_json FROM audit WHERE model = ? AND action = 'stage' ORDER BY id DESC", (name,)
            )
            previous = next(
                (v for v, after in history
                 if v != current and (to is None or v == int(to))
                 and msgspec.json.decode(after).get("stage") == PRODUCTION
                 and self._db.execute("SELECT 1 FROM model_versions WHERE model = ? AND version = ?", (name, v))),
                None,
            )
            if previous is None:
                if to is not None:
                    self._version_row(name, int(to))
                    raise PreconditionFailedError(
                        f"{name}/{to} was never in production: rollback only restores a version that was "
                        "(promote it instead, through the gates)"
                    )
                raise PreconditionFailedError(f"model {name!r} has no earlier production version to roll back to")
            self._set_stage(name, current, PRODUCTION, "archived", actor)
            before = self._version_row(name, previous)[2]
            self._set_stage(name, previous, before, PRODUCTION, actor)
            self._move_alias(name, PRODUCTION, previous, actor)
            self._audit(actor, "rollback", name, previous, {"production": current}, {"production": previous})
        return self.get_version(name, previous)

    # -- lineage and audit ------------------------------------------------------
    def lineage(self, ref: str) -> LineageReport:
        """How the version behind ``ref`` was produced, with its ancestors."""
        mv = self.resolve(ref)
        chain, seen, parent = [], {mv.ref}, mv.lineage.parent
        while parent and parent not in seen:
            seen.add(parent)
            p = self.resolve(parent)
            chain.append(p)
            parent = p.lineage.parent
        return LineageReport(mv, chain, self.evaluations(mv.name, mv.version))

    def trained_from(self, data_fingerprint: str) -> list[ModelVersion]:
        rows = self._db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE data_fingerprint = ? ORDER BY model, version",
            (data_fingerprint,),
        )
        return [self._to_version(r) for r in rows]

    def derivatives(self, name: str, version: int) -> list[ModelVersion]:
        """Every version that derives from ``name/version``, transitively."""
        self._version_row(name, version)
        out, frontier = [], [f"{name}/{version}"]
        while frontier:
            ref = frontier.pop()
            for row in self._db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE parent = ? ORDER BY model, version", (ref,)
            ):
                mv = self._to_version(row)
                out.append(mv)
                frontier.append(mv.ref)
        return out

    # -- evaluations ----------------------------------------------------------
    def add_evaluation(self, name: str, version: int, *, dataset: str, fingerprint: str,
                       metrics: Mapping[str, float], rows: int, run_id: str, actor: str) -> Evaluation:
        """Record that ``name/version`` was evaluated on a dataset.

        ``dataset``: the URI or name the user gave; ``fingerprint``: sha256 of
        the dataset's manifest; ``metrics``: finite numbers; ``rows``: rows
        scored; ``run_id``: the run that produced it. The record and its audit
        entry (action "evaluate") are written in one transaction.

        Raises NotFoundError (no such model or version) and InvalidInputError
        naming the bad field (empty dataset or fingerprint, a non-finite or
        non-numeric metric, negative rows)."""
        version = int(version)
        clean = _check_evaluation(dataset, fingerprint, metrics, rows, run_id)
        metrics_json = _json("metrics", clean)
        _json("dataset", dataset)  # size check
        with self._db.tx():
            self._version_row(name, version)
            now = time.time()
            eid = self._db.execute(
                "INSERT INTO evaluations (model, version, dataset, fingerprint, metrics, rows, run_id, created_at, "
                "created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (name, version, dataset, fingerprint, metrics_json, rows, run_id, now, actor),
            )[0][0]
            self._audit(actor, "evaluate", name, version, None, {
                "dataset": dataset, "fingerprint": fingerprint, "metrics": clean, "rows": rows, "run_id": run_id})
        return Evaluation(eid, name, version, dataset, fingerprint, clean, rows, run_id, now, actor)

    def evaluations(self, name: str, version: int | None = None, *, dataset: str | None = None) -> list[Evaluation]:
        """A model's evaluations (of one version when given), oldest first.
        ``dataset`` keeps those whose dataset string or fingerprint equals it.
        NotFoundError for an unknown model or version."""
        if version is None:
            self._require_model(name)
            where, args = "model = ?", [name]
        else:
            self._version_row(name, int(version))
            where, args = "model = ? AND version = ?", [name, int(version)]
        if dataset is not None:
            where += " AND (dataset = ? OR fingerprint = ?)"
            args += [dataset, dataset]
        rows = self._db.execute(f"SELECT {_EVALUATION_COLUMNS} FROM evaluations WHERE {where} ORDER BY id", args)
        return [_to_evaluation(r) for r in rows]

    def evaluated_on(self, fingerprint: str) -> list[Evaluation]:
        """Every evaluation, of any version, on the data with this fingerprint
        (by model, version, then oldest first)."""
        rows = self._db.execute(
            f"SELECT {_EVALUATION_COLUMNS} FROM evaluations WHERE fingerprint = ? ORDER BY model, version, id",
            (fingerprint,),
        )
        return [_to_evaluation(r) for r in rows]

    def audit(self, *, model: str | None = None, actor: str | None = None, since: float | None = None,
              until: float | None = None, loop_run: str | None = None, action: str | None = None,
              limit: int = 1000, newest_first: bool = False) -> list[AuditEntry]:
        """Audit entries filtered by model, actor, time, loop run and action:
        the first ``limit``, oldest first, or the latest ``limit``, newest
        first (what a page of the log shows)."""
        where, args = [], []
        for col, op, val in (("model", "=", model), ("actor", "=", actor), ("ts", ">=", since), ("ts", "<=", until),
                             ("loop_run", "=", loop_run), ("action", "=", action)):
            if val is not None:
                where.append(f"{col} {op} ?")
                args.append(val)
        sql = "SELECT id, ts, actor, action, model, version, before_json, after_json, loop_run FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + f" ORDER BY id{' DESC' if newest_first else ''} LIMIT ?", (*args, int(limit)))
        d = msgspec.json.decode
        return [AuditEntry(i, ts, a, act, m, v, d(b), d(af), lr) for i, ts, a, act, m, v, b, af, lr in rows]
