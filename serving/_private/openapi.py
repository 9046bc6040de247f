"""The OpenAPI 3 description of the V2 HTTP API, served at /v2/openapi.json.

Written by hand from PROTOCOL.md (the server has no framework to derive it
from); schemathesis fuzzes the server against it in the tests, so a route
or status that drifts from this document fails there.
"""

from __future__ import annotations

from flywheel.protocol.datatypes import V2_DATATYPES
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
            "/v2/openapi.json": {"get": {"operationId": "openapi", "responses": {
                "200": _ok({"type": "object"}), **_errors(*_AUTH_ERRORS)}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(*_AUTH_ERRORS)}}},
        },
    }
