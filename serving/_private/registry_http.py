"""The registry as the console reads and changes it (see console_http.py).

    GET  /v2/registry/models                                   ModelList          (operate)
    GET  /v2/registry/models/{name}                            ModelDetail        (operate)
    GET  /v2/registry/models/{name}/versions/{v}               VersionView        (operate)
    GET  /v2/registry/models/{name}/versions/{v}/lineage       LineageGraph       (operate)
    POST /v2/registry/models/{name}/versions/{v}/approve       {"comment"?}       (admin)
    POST /v2/registry/models/{name}/versions/{v}/promote       {"stage"}          (admin)
    POST /v2/registry/models/{name}/versions/{v}/alias         {"alias"}          (admin)
    POST /v2/registry/models/{name}/rollback                   {"to"?}            (admin)
    GET  /v2/audit?actor=&action=&model=&since=&until=&limit=  AuditPage          (operate)

Each ``plan`` checks the path, method, query and body on the ingress's
loop (a 4xx costs no database work) and answers what to run in a worker
thread: ``(call(console, actor), status, acts)``.
"""

from __future__ import annotations

import msgspec

from flywheel.registry.registry import identity
from flywheel.registry.types import ModelVersion, RegisteredModel
from flywheel.serving._private import console_http as c
from flywheel.serving._private.console_types import (
    AliasBody, ApprovalResult, ApproveBody, AuditPage, LineageEdge, LineageGraph, LineageNode, ModelDetail,
    ModelList, ModelSummary, PromoteBody, RollbackBody, VersionView,
)
from flywheel.serving._private.http_server import Request

_GET = ("GET",)
_POST = ("POST",)
_VERSION_ACTIONS = ("approve", "promote", "alias")
AUDIT_PARAMS = ("actor", "action", "model", "since", "until", "limit")
DEFAULT_AUDIT_LIMIT = 100
# the stages from which a version can still be promoted: gates are shown for these
_PROMOTABLE = ("none", "staging")


def plan(method: str, req: Request, parts: list[str]):
    """``parts``: the split path after ``/v2/registry``."""
    if not parts or parts[0] != "models" or any(not p for p in parts):
        return c.no_route(req)
    rest = parts[1:]
    c.query(req, ())  # no route here takes parameters
    if not rest:
        return c.only(req, method, _GET) or (_models, 200, False)
    name = rest[0]
    if len(rest) == 1:
        return c.only(req, method, _GET) or (lambda con, _a: _detail(con, name), 200, False)
    if rest[1:] == ["rollback"]:
        if refused := c.only(req, method, _POST):
            return refused
        body = c.decode_body(req, RollbackBody, '{"to": integer}, or no body')
        return lambda con, actor: _version_view(con, con.registry().rollback(name, actor=actor, to=body.to)), 200, True
    if rest[1] != "versions" or len(rest) not in (3, 4):
        return c.no_route(req)
    if len(rest) == 4 and rest[3] not in (*_VERSION_ACTIONS, "lineage"):
        return c.no_route(req)
    action = rest[3] if len(rest) == 4 else ""
    if refused := c.only(req, method, _POST if action in _VERSION_ACTIONS else _GET):
        return refused
    version = c.version_segment(rest[2])
    if action == "":
        return lambda con, _a: _version_view(con, con.registry().get_version(name, version)), 200, False
    if action == "lineage":
        return lambda con, _a: _lineage(con, name, version), 200, False
    if action == "approve":
        comment = c.decode_body(req, ApproveBody, '{"comment": string}, or no body').comment
        return lambda con, actor: _approve(con, name, version, actor, comment), 200, "identity"
    if action == "promote":
        stage = c.decode_body(req, PromoteBody, '{"stage": "none" | "staging" | "production" | "archived"}').stage
        return lambda con, actor: _version_view(con, con.registry().promote(name, version, stage, actor=actor)), \
            200, True
    alias = c.decode_body(req, AliasBody, '{"alias": string}').alias

    def move(con, actor):
        con.registry().set_alias(name, alias, version, actor=actor)
        return _version_view(con, con.registry().get_version(name, version))

    return move, 200, True


def plan_audit(method: str, req: Request, parts: list[str]):
    """``/v2/audit`` (``parts``: the path after it, which must be empty)."""
    if parts:
        return c.no_route(req)
    if refused := c.only(req, method, _GET):
        return refused
    params = c.query(req, AUDIT_PARAMS)
    limit = c.int_param(params, "limit", DEFAULT_AUDIT_LIMIT, 1, 10_000)
    since, until = c.time_param(params, "since"), c.time_param(params, "until")
    if since is not None and until is not None and since > until:
        raise c.FieldError("until", f"until ({until}) is before since ({since})")
    filters = {k: c.text_param(params, k) for k in ("actor", "action", "model")}

    def read(con, _actor):
        return AuditPage(con.registry().audit(since=since, until=until, limit=limit, newest_first=True, **filters), limit)

    return read, 200, False


# -- what runs in the worker thread -------------------------------------------------

def _summary(con, m: RegisteredModel) -> ModelSummary:
    return ModelSummary(m.name, m.description, m.tags, m.created_at, m.created_by, m.latest_version, m.aliases,
                        con.registry().production_version(m.name))


def _models(con, _actor) -> ModelList:
    return ModelList([_summary(con, m) for m in con.registry().list_models()])


def _version_view(con, v: ModelVersion) -> VersionView:
    reg = con.registry()
    gates = reg.check_gates(v.name, v.version) if v.stage in _PROMOTABLE else []
    return VersionView(v.name, v.version, v.stage, v.aliases, v.metrics, v.params, v.tags, v.lineage, v.artifacts,
                       v.created_at, v.created_by, reg.approval_records(v.name, v.version), gates)


def _detail(con, name: str) -> ModelDetail:
    reg = con.registry()
    model = reg.get_model(name)  # NotFoundError naming it
    return ModelDetail(_summary(con, model), msgspec.to_builtins(reg.get_policy(name)),
                       [_version_view(con, v) for v in reg.list_versions(name)])


def _approve(con, name: str, version: int, actor: str, comment: str) -> ApprovalResult:
    reg = con.registry()
    reg.approve(name, version, actor=actor, comment=comment)
    return ApprovalResult(name, version, identity(actor), reg.approval_records(name, version),
                          reg.check_gates(name, version))


def _lineage(con, name: str, version: int) -> LineageGraph:
    """The version, the versions it derives from and those deriving from it,
    each with its data, code and job; the version's evaluations."""
    reg = con.registry()
    report = reg.lineage(f"{name}/{version}")
    nodes: dict[str, LineageNode] = {}
    edges: list[LineageEdge] = []

    def add(node: LineageNode) -> str:
        nodes.setdefault(node.id, node)
        return node.id

    for v in [report.version, *report.ancestors, *reg.derivatives(name, version)]:
        me = add(LineageNode(v.ref, "version", v.ref, {"stage": v.stage, "metrics": v.metrics,
                                                       "created_at": v.created_at}))
        lin = v.lineage
        if lin.parent:
            edges.append(LineageEdge(me, lin.parent, "derived_from"))
        if lin.data_fingerprint:
            edges.append(LineageEdge(me, add(LineageNode(f"data:{lin.data_fingerprint}", "data",
                                                         lin.data_fingerprint[:12])), "trained_on"))
        if lin.code_commit:
            label = lin.code_commit[:12] + ("+dirty" if lin.code_dirty else "")
            edges.append(LineageEdge(me, add(LineageNode(f"code:{lin.code_commit}", "code", label,
                                                         {"dirty": lin.code_dirty})), "built_from"))
        if lin.job_id:
            edges.append(LineageEdge(me, add(LineageNode(f"job:{lin.job_id}", "job", lin.job_id)), "produced_by"))
    for e in report.evaluations:
        target = add(LineageNode(f"data:{e.fingerprint}", "evaluation", e.dataset))
        edges.append(LineageEdge(report.version.ref, target, "evaluated_on"))
    return LineageGraph(report.version.ref, list(nodes.values()), edges)
