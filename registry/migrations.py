"""Versioned schema. Opening a registry applies the migrations it lacks.

Never edit a released step: add a new one. Each step runs in one transaction
together with the bump of ``schema_version``.
"""

from __future__ import annotations

from flywheel.registry.db import Db

# (version, statements for every dialect, extra statements per dialect)
_V1 = [
    """CREATE TABLE registered_models (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        tags TEXT NOT NULL,
        next_version INTEGER NOT NULL,
        policy TEXT,
        created_at {real} NOT NULL,
        created_by TEXT NOT NULL)""",
    """CREATE TABLE model_versions (
        model TEXT NOT NULL REFERENCES registered_models(name),
        version INTEGER NOT NULL,
        stage TEXT NOT NULL,
        signature TEXT NOT NULL,
        metrics TEXT NOT NULL,
        params TEXT NOT NULL,
        tags TEXT NOT NULL,
        data_fingerprint TEXT NOT NULL,
        code_commit TEXT NOT NULL,
        code_dirty INTEGER NOT NULL,
        training_config TEXT NOT NULL,
        parent TEXT NOT NULL,
        job_id TEXT NOT NULL,
        created_at {real} NOT NULL,
        created_by TEXT NOT NULL,
        PRIMARY KEY (model, version))""",
    """CREATE TABLE artifacts (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        name TEXT NOT NULL,
        uri TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        PRIMARY KEY (model, version, name),
        FOREIGN KEY (model, version) REFERENCES model_versions(model, version) ON DELETE CASCADE)""",
    """CREATE TABLE aliases (
        model TEXT NOT NULL,
        alias TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (model, alias),
        FOREIGN KEY (model, version) REFERENCES model_versions(model, version) ON DELETE CASCADE)""",
    """CREATE TABLE audit (
        id {serial},
        ts {real} NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        model TEXT NOT NULL,
        version INTEGER,
        before_json TEXT NOT NULL,
        after_json TEXT NOT NULL)""",
]

# v2: approvals for promotion gates, lookup indexes, and an audit log that
# the database itself refuses to edit.
_V2 = [
    """CREATE TABLE approvals (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        actor TEXT NOT NULL,
        comment TEXT NOT NULL,
        ts {real} NOT NULL,
        PRIMARY KEY (model, version, actor),
        FOREIGN KEY (model, version) REFERENCES model_versions(model, version) ON DELETE CASCADE)""",
    "CREATE INDEX audit_by_model ON audit (model, ts)",
    "CREATE INDEX audit_by_actor ON audit (actor, ts)",
    "CREATE INDEX versions_by_data ON model_versions (data_fingerprint)",
    "CREATE INDEX versions_by_parent ON model_versions (parent)",
]
_V2_DIALECT = {
    "sqlite": [
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
           BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
           BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    ],
    "postgresql": [
        """CREATE FUNCTION audit_append_only() RETURNS trigger AS $$
           BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$ LANGUAGE plpgsql""",
        """CREATE TRIGGER audit_no_edit BEFORE UPDATE OR DELETE ON audit
           FOR EACH ROW EXECUTE FUNCTION audit_append_only()""",
    ],
}

# v3: API keys for the serving endpoints, stored as salted hashes only.
_V3 = [
    """CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        roles TEXT NOT NULL,
        salt TEXT NOT NULL,
        hash TEXT NOT NULL,
        created_at {real} NOT NULL,
        created_by TEXT NOT NULL,
        revoked_at {real})""",
]

# v4: the serving router's endpoint state (policies, bandit arms, canaries),
# one JSON document per (deployment, endpoint), so that it outlives the
# processes that route (serving/controller.py).
_V4 = [
    """CREATE TABLE router_state (
        deployment TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_at {real} NOT NULL,
        PRIMARY KEY (deployment, endpoint))""",
]

# v5: the training job queue (training/jobs.py): one row per job, its spec
# and result as JSON; claims scan queued jobs by priority.
_V5 = [
    """CREATE TABLE training_jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        priority INTEGER NOT NULL,
        state TEXT NOT NULL,
        submitted_at {real} NOT NULL,
        started_at {real},
        finished_at {real},
        attempts INTEGER NOT NULL,
        runner TEXT NOT NULL,
        heartbeat_at {real},
        cancel_requested INTEGER NOT NULL,
        error TEXT NOT NULL,
        result TEXT NOT NULL,
        storage TEXT NOT NULL)""",
    "CREATE INDEX training_jobs_by_state ON training_jobs (state, priority)",
]

# v6: evaluations of a version on a dataset (a batch run's metrics), for
# lineage and for the evaluated_on promotion gate; found by version and by
# the dataset's fingerprint.
_V6 = [
    """CREATE TABLE evaluations (
        id {serial},
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        dataset TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        metrics TEXT NOT NULL,
        rows BIGINT NOT NULL,
        run_id TEXT NOT NULL,
        created_at {real} NOT NULL,
        created_by TEXT NOT NULL,
        FOREIGN KEY (model, version) REFERENCES model_versions(model, version) ON DELETE CASCADE)""",
    "CREATE INDEX evaluations_by_version ON evaluations (model, version, id)",
    "CREATE INDEX evaluations_by_fingerprint ON evaluations (fingerprint)",
]

# v7: per-key limits on API keys: model scopes (comma-separated globs; empty:
# every model), an expiry, and a request rate / burst (NULL: the server's
# default). Existing keys get none of them, so they keep working as before.
_V7 = [
    "ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE api_keys ADD COLUMN expires_at {real}",
    "ALTER TABLE api_keys ADD COLUMN rate {real}",
    "ALTER TABLE api_keys ADD COLUMN burst INTEGER",
]

# v8: continuous-training loops (loops/): the audit log names the loop run a
# step belongs to; each loop's durable state (paused, trigger memory) is one
# JSON document; each run is a row whose phase a restarted controller
# resumes from; events are the timeline, suppressed triggers included.
_V8 = [
    "ALTER TABLE audit ADD COLUMN loop_run TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX audit_by_loop_run ON audit (loop_run)",
    """CREATE TABLE loop_state (
        deployment TEXT NOT NULL,
        loop TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_at {real} NOT NULL,
        PRIMARY KEY (deployment, loop))""",
    """CREATE TABLE loop_runs (
        id TEXT PRIMARY KEY,
        deployment TEXT NOT NULL,
        loop TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        trigger TEXT NOT NULL,
        reason TEXT NOT NULL,
        phase TEXT NOT NULL,
        outcome TEXT NOT NULL,
        started_at {real} NOT NULL,
        updated_at {real} NOT NULL,
        finished_at {real},
        detail TEXT NOT NULL)""",
    "CREATE INDEX loop_runs_by_loop ON loop_runs (deployment, loop, started_at)",
    """CREATE TABLE loop_events (
        id {serial},
        deployment TEXT NOT NULL,
        loop TEXT NOT NULL,
        run_id TEXT NOT NULL,
        ts {real} NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL)""",
    "CREATE INDEX loop_events_by_loop ON loop_events (deployment, loop, id)",
]

MIGRATIONS: list[tuple[int, list[str], dict[str, list[str]]]] = [
    (1, _V1, {}),
    (2, _V2, _V2_DIALECT),
    (3, _V3, {}),
    (4, _V4, {}),
    (5, _V5, {}),
    (6, _V6, {}),
    (7, _V7, {}),
    (8, _V8, {}),
]
LATEST = MIGRATIONS[-1][0]


def current_version(db: Db) -> int:
    """The schema version by a plain read (no lock); 0 when there is none yet."""
    try:
        rows = db.execute("SELECT version FROM schema_version")
    except Exception:  # no such table (sqlite3 / psycopg raise their own types)
        return 0
    return rows[0][0] if rows else 0


_PG_MIGRATION_LOCK = 0x466C7977  # any constant; pg_advisory_lock key


def migrate(db: Db, target: int = LATEST) -> int:
    """Apply every missing step up to ``target``; returns the schema version.
    Concurrent openers are safe: PostgreSQL openers take an advisory lock,
    SQLite ones serialise on BEGIN IMMEDIATE, and each step re-checks the
    version inside its transaction."""
    if current_version(db) >= target:
        # Up to date: take no write lock, so that opening a registry works
        # while another process holds a long write transaction.
        return target
    if db.dialect == "postgresql":
        db.execute("SELECT pg_advisory_lock(?)", (_PG_MIGRATION_LOCK,))
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        _apply(db, target)
    finally:
        if db.dialect == "postgresql":
            db.execute("SELECT pg_advisory_unlock(?)", (_PG_MIGRATION_LOCK,))
    return current_version(db)


def _apply(db: Db, target: int) -> None:
    for version, statements, per_dialect in MIGRATIONS:
        if version > target:
            break
        with db.tx():
            rows = db.execute("SELECT version FROM schema_version")
            have = rows[0][0] if rows else 0
            if have >= version:
                continue
            for sql in [*statements, *per_dialect.get(db.dialect, [])]:
                db.execute(sql)
            if rows:
                db.execute("UPDATE schema_version SET version = ?", (version,))
            else:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
