"""The OpenAPI 3 description of the V2 HTTP API, served at /v2/openapi.json.

Written by hand from PROTOCOL.md (the server has no framework to derive it
from), except the console's schemas, generated from its wire types
(console_types.py); schemathesis fuzzes the server against it in the tests, so a route
or status that drifts from this document fails there.
"""

from __future__ import annotations

from flywheel.protocol.datatypes import V2_DATATYPES
from flywheel.serving._private import console_types
from flywheel.serving.router import SERVER_VERSION

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


# A key over its request rate: the body says why, Retry-After when to retry
# (absent when the in-flight cap refused, which has no known delay).
_TOO_MANY = {
    **_ERROR,
    "description": "the API key's request rate or requests in flight are used up",
    "headers": {"Retry-After": {"description": "whole seconds until the key's rate allows a request",
                                "schema": {"type": "integer", "minimum": 1}}},
}


def _errors(*codes: int) -> dict:
    return {str(c): _TOO_MANY if c == 429 else _ERROR for c in codes}


_AUTH_ERRORS = (401, 403, 429)
_MODEL = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}

_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(V2_DATATYPES)},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
        "outputs": {
            "type": "array",
            "items": {"type": "object", "required": ["name"],
                      "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}},
        },
    },
}
_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
    },
}
_TENSOR_META = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                   "shape": {"type": "array", "items": {"type": "integer"}}},
}
_MODEL_META = {
    "type": "object",
    "required": ["name", "versions", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": _TENSOR_META},
        "outputs": {"type": "array", "items": _TENSOR_META},
        # where the replica runs the model and why (serving/_private/execution.py)
        "parameters": {"type": "object"},
    },
}


def _ok(schema: dict | None = None, description: str = "ok") -> dict:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _model_ops(with_version: bool) -> dict[str, dict]:
    params = [_MODEL, _VERSION] if with_version else [_MODEL]
    base = "/v2/models/{name}" + ("/versions/{version}" if with_version else "")
    suffix = "Version" if with_version else ""
    return {
        base: {"get": {"operationId": f"modelMetadata{suffix}", "parameters": params,
                       "responses": {"200": _ok(_MODEL_META), **_errors(404, 503, *_AUTH_ERRORS)}}},
        base + "/ready": {"get": {"operationId": f"modelReady{suffix}", "parameters": params,
                                  "responses": {"200": _ok(), **_errors(404, 503, *_AUTH_ERRORS)}}},
        base + "/drift": {"get": {"operationId": f"modelDrift{suffix}", "parameters": params,
                                  "responses": {"200": _ok({"type": "object"}),
                                                **_errors(404, 503, *_AUTH_ERRORS)}}},
        base + "/infer": {"post": {
            "operationId": f"modelInfer{suffix}",
            "parameters": params,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}}},
            "responses": {"200": _ok({"$ref": "#/components/schemas/InferenceResponse"}),
                          **_errors(400, 404, 413, 503, 504, *_AUTH_ERRORS)},
        }},
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _body(name: str, required: bool) -> dict:
    return {"required": required, "content": {"application/json": {"schema": _ref(name)}}}


_NAMED = {**_MODEL, "description": "a registered model's name"}
_VERSION_NUMBER = {"name": "version", "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1}, "description": "a registry version number"}
_JOB = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_TIME = {"type": "string", "minLength": 1}
# a console read: the store may be away (503); reads take no body
_READ_ERRORS = (400, 404, 503, *_AUTH_ERRORS)
# an action: its gates (412), a second approval by one identity (409)
_ACTION_ERRORS = (400, 404, 409, 412, 503, *_AUTH_ERRORS)


def _read(op: str, params: list[dict], schema: str) -> dict:
    return {"get": {"operationId": op, "parameters": params,
                    "responses": {"200": _ok(_ref(schema)), **_errors(*_READ_ERRORS)}}}


def _action(op: str, params: list[dict], body: str, body_required: bool, schema: str) -> dict:
    return {"post": {"operationId": op, "parameters": params, "requestBody": _body(body, body_required),
                     "responses": {"200": _ok(_ref(schema)), **_errors(*_ACTION_ERRORS)}}}


def _console_paths() -> dict[str, dict]:
    """The console's registry, audit and jobs API (serving/_private/console_http.py):
    reads need operate, actions admin."""
    version = "/v2/registry/models/{name}/versions/{version}"
    audit = [
        _query("actor", {"type": "string", "minLength": 1}, "only this actor (e.g. key:alice, os:bob)"),
        _query("action", {"type": "string", "minLength": 1}, "only this action (approve, stage, alias, ...)"),
        _query("model", {"type": "string", "minLength": 1}, "only this model"),
        _query("since", _TIME, "epoch seconds or ISO 8601 (UTC unless given)"),
        _query("until", _TIME, "epoch seconds or ISO 8601 (UTC unless given)"),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000}, "at most this many (default 100)"),
    ]
    return {
        "/v2/registry/models": _read("registryModels", [], "ModelList"),
        "/v2/registry/models/{name}": _read("registryModel", [_NAMED], "ModelDetail"),
        version: _read("registryVersion", [_NAMED, _VERSION_NUMBER], "VersionView"),
        version + "/lineage": _read("registryLineage", [_NAMED, _VERSION_NUMBER], "LineageGraph"),
        version + "/approve": _action("registryApprove", [_NAMED, _VERSION_NUMBER], "ApproveBody", False,
                                      "ApprovalResult"),
        version + "/promote": _action("registryPromote", [_NAMED, _VERSION_NUMBER], "PromoteBody", True,
                                      "VersionView"),
        version + "/alias": _action("registryAlias", [_NAMED, _VERSION_NUMBER], "AliasBody", True, "VersionView"),
        "/v2/registry/models/{name}/rollback": _action("registryRollback", [_NAMED], "RollbackBody", False,
                                                       "VersionView"),
        "/v2/audit": _read("auditLog", audit, "AuditPage"),
        "/v2/jobs": _read("trainingJobs", [_query("state", {"type": "string", "minLength": 1},
                                                  "only jobs in these states (comma-separated)")], "JobList"),
        "/v2/jobs/{id}": _read("trainingJob", [_JOB, _query("log_lines", {"type": "integer", "minimum": 0,
                                                                         "maximum": 1000},
                                                            "how many of the log's last lines (default 50)")],
                               "JobDetail"),
        "/v2/drift/{name}": _read("driftSeries", [{**_MODEL, "description": "a served model's name"},
                                                  _query("version", {"type": "string", "minLength": 1},
                                                         "a served version (default: the one routed to)")],
                                  "DriftHistory"),
        "/v2/jobs/{id}/cancel": {"post": {"operationId": "trainingJobCancel", "parameters": [_JOB],
                                          "responses": {"200": _ok(_ref("JobSummary")),
                                                        **_errors(400, 404, 412, 503, *_AUTH_ERRORS)}}},
    }


def _status_reads() -> dict[str, dict]:
    """The status reads a console page shows beside the registry: endpoints
    (live traffic split, per-variant figures, canary with its gate results and
    events; endpoint_http.py) and loops (loops_http.py), each answered by its
    own module; their bodies are described there, here only as objects."""
    obj = {"type": "object"}
    loop = {"name": "loop", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
    endpoint = {**_MODEL, "description": "an endpoint's name"}

    def read(op: str, params: list[dict]) -> dict:
        return {"get": {"operationId": op, "parameters": params,
                        "responses": {"200": _ok(obj), **_errors(404, 503, *_AUTH_ERRORS)}}}

    return {
        "/v2/endpoints": read("endpoints", []),
        "/v2/endpoints/{name}": read("endpoint", [endpoint]),
        "/v2/loops": read("loops", []),
        "/v2/loops/{loop}": read("loop", [loop]),
        "/v2/loops/{loop}/runs": read("loopRuns", [loop, _query("limit", {"type": "integer", "minimum": 1,
                                                                         "maximum": 10_000},
                                                                "at most this many, newest first (default 100)")]),
    }


def openapi_document() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Flywheel V2 inference API (Open Inference Protocol)", "version": SERVER_VERSION},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "RequestInput": _TENSOR,
                "InferenceRequest": _INFER_REQUEST,
                "InferenceResponse": _INFER_RESPONSE,
                **console_types.schemas(),
            },
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v2/health/live": {"get": {"operationId": "serverLive", "security": [],
                                        "responses": {"200": _ok()}}},
            "/v2/health/ready": {"get": {"operationId": "serverReady", "security": [],
                                         "responses": {"200": _ok(), **_errors(503)}}},
            "/v2": {"get": {"operationId": "serverMetadata", "responses": {
                "200": _ok({"type": "object", "required": ["name", "version", "extensions"]}),
                **_errors(*_AUTH_ERRORS)}}},
            **_model_ops(False),
            **_model_ops(True),
            "/v2/models/{name}/feedback": {"post": {
                "operationId": "modelFeedback",
                "parameters": [_MODEL],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["id"], "additionalProperties": False,
                    "properties": {"id": {"type": "string"}, "reward": {"type": "number"},
                                   "label": {"oneOf": [{"type": "number"},
                                                       {"type": "array", "items": {"type": "number"}}]}}}}}},
                "responses": {"200": _ok({"type": "object", "required": ["id"]}),
                              **_errors(400, 404, *_AUTH_ERRORS)},
            }},
            **_console_paths(),
            **_status_reads(),
            "/v2/openapi.json": {"get": {"operationId": "openapi", "responses": {
                "200": _ok({"type": "object"}), **_errors(*_AUTH_ERRORS)}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(*_AUTH_ERRORS)}}},
        },
    }
