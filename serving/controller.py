"""The router controller: one Serve replica that owns every endpoint's state.

Ingress replicas call :meth:`RouterController.sync` about twice a second and
route by the snapshot it answers; management calls (HTTP
``/v2/endpoints/...`` on any ingress replica, ``flywheel.client``) arrive
through :meth:`RouterController.manage`. The decisions themselves live in
serving/control_state.py; this module adds the Serve deployment, a ticker
thread (canary steps, swap phases, drains) and the registry (state store,
alias moves, reference pinning).

State is saved in the registry's database, keyed by the deployment name and
its deploy id: when Serve restarts this replica (same constructor
arguments), it resumes where it stopped; a new ``deploy`` starts afresh.
While that database is unreachable, replicas keep syncing and routing, the
state stays in memory (a decision is announced once it is saved), a
management call that changes something is refused with UNAVAILABLE, and
the stores reconnect by themselves when it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import msgspec

from flywheel.protocol.errors import (
    ErrorCode, FlywheelError, InvalidInputError, PreconditionFailedError, UnavailableError,
)
from flywheel.registry.db import OutageLog
from flywheel.registry.registry import PRODUCTION, identity
from flywheel.runtime.onnx_signature import read_onnx_signature
from flywheel.runtime.signature import Signature, signature_from_doc
from flywheel.serving._private import signature_gate
from flywheel.serving._private.control_variants import model_config
from flywheel.serving.config import EndpointConfig, ModelConfig, RegistryConfig
from flywheel.serving.control_state import ControlState

log = logging.getLogger(__name__)

TICK_S = 0.25
ACTOR = "flywheel-router"

_ONNX_BACKENDS = ("onnxruntime", "tensorrt")  # backends whose artifact is an .onnx file

# management operations: name -> (ControlState method, takes a body)
_OPS = {
    "status": ("status", False),
    "set_policy": ("set_policy", True),
    "add_variant": ("add_variant", True),
    "remove_variant": ("remove_variant", True),
    "swap": ("swap", True),
    "start_canary": ("start_canary", True),
    "abort_canary": ("abort_canary", False),
    "promote": ("promote", True),
    "rollback": ("rollback", False),
    "set_shadow": ("set_shadow", True),
    "feedback": ("feedback", True),
}


class RouterController:
    """Serve deployment class (one replica)."""

    def __init__(
        self,
        deployment: str,
        deploy_id: str,
        endpoints: list[EndpointConfig],
        models: list[ModelConfig],
        registry: RegistryConfig,
        drift_app: str = "",
    ) -> None:
        """``drift_app``: the Serve application of the deployment's drift
        monitor ("" = none), which scores drift-gated canaries."""
        from flywheel.registry import Registry, RouterStateStore

        self._store = RouterStateStore.open(registry.uri) if registry.uri else None
        self._registry = Registry.open(registry.uri, registry.artifacts) if registry.uri else None
        reg = self._registry
        self._lock = threading.Lock()
        self._state = ControlState(
            deployment, deploy_id, endpoints, models, self._store,
            **(_alias_ops(reg) if reg else {}),
            drift_monitor=bool(drift_app),
        )
        self._drift_app = drift_app
        self._drift_handle = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, name="flywheel-router-tick", daemon=True)
        self._ticker.start()
        self._beat = time.monotonic()

    def _tick_forever(self) -> None:
        outage = OutageLog(log, "router controller: saving the endpoints' state")
        while not self._stop.wait(TICK_S):
            try:
                with self._lock:
                    wanted = self._state.drift_wanted()
                scores = [(name, variant, self._drift_score(name, variant, since)) for name, variant, since in wanted]
                with self._lock:  # the scores were read unlocked: replicas' syncs never wait on the monitor
                    for name, variant, score in scores:
                        self._state.set_drift(name, variant, score)
                    self._state.tick()
                outage.ok()
                self._beat = time.monotonic()
            except UnavailableError as exc:  # the registry's database is away: state is kept, saved once it is back
                outage.failed(exc)
                self._beat = time.monotonic()  # a database outage is no reason for Serve to restart this replica
            except Exception:  # a tick that fails must not stop the next one; failing ones leave the beat stale
                log.exception("router controller tick failed")

    def _drift_score(self, name: str, variant: str, since: float) -> float | None:
        try:
            if self._drift_handle is None:
                from ray import serve

                self._drift_handle = serve.get_deployment_handle("drift", app_name=self._drift_app)
            return self._drift_handle.drift_score.remote(name, variant, since).result(timeout_s=2.0)
        except Exception:  # no score this tick: the gate waits (see Canary.evaluate)
            log.debug("drift score of %s:%s unavailable", name, variant, exc_info=True)
            return None

    def sync(self, report: dict) -> dict:
        """One ingress replica's report in, the snapshot (when newer) out."""
        with self._lock:
            return self._state.sync(report)

    def manage(self, op: str, name: str | None = None, body: Any = None) -> dict:
        """A management call; never raises: ``{"ok": true, "result": ...}`` or
        ``{"ok": false, "code": <ErrorCode>, "error": "..."}`` (the ingress
        maps the code to its transport's status)."""
        try:
            if op == "approve":  # the registry's, not the endpoints': no lock
                return {"ok": True, "result": self._approve(name, body)}
            if op not in _OPS:
                raise InvalidInputError(f"unknown operation {op!r}")
            method, takes_body = _OPS[op]
            if self._store is not None and op not in ("status", "feedback"):
                # a decision must be saved before it is announced: with the
                # database away, refuse (UNAVAILABLE) before anything changes
                self._store.load(self._state.deployment)
            signature = None
            if op in ("add_variant", "swap", "start_canary"):
                # read unlocked: an artifact may take a while, and replicas' syncs must not wait on it
                self._learn_signatures(name)
                if op != "start_canary":
                    signature = self._candidate_signature(name, body)
            with self._lock:
                fn = getattr(self._state, method)
                if op == "status":
                    result = fn(name)
                elif op == "remove_variant" or op == "promote":
                    result = fn(name, _field(body, "version"))
                elif op == "feedback":
                    result = fn(name, _field(body, "id"), body.get("reward"))
                elif op in ("add_variant", "swap"):
                    result = fn(name, body, signature=signature)
                elif takes_body:
                    result = fn(name, body)
                else:
                    result = fn(name)
            return {"ok": True, "result": result}
        except FlywheelError as exc:
            return {"ok": False, "code": int(exc.code), "error": exc.message}
        except Exception as exc:  # a bug here must not look like the caller's fault
            log.exception("router controller: %s failed", op)
            return {"ok": False, "code": int(ErrorCode.INTERNAL), "error": f"controller error: {exc!r}"}

    def _approve(self, name: str | None, body: Any) -> dict:
        """Record an approval of model ``name``'s version ``body["version"]``
        by ``body["actor"]``, the identity the ingress authenticated (never
        taken from a client: serving/_private/approval_http.py builds this
        body). Answers the approvers and what still stops a promotion."""
        reg = self._registry
        if reg is None:
            raise PreconditionFailedError("approvals need the registry, and this deployment has none configured")
        if not isinstance(body, dict) or not isinstance(body.get("version"), int):
            raise InvalidInputError("approve: the body must carry an integer 'version'")
        version = body["version"]
        actor = _field(body, "actor")
        reg.approve(name or "", version, actor=actor, comment=str(body.get("comment", "")))
        return {"model": name, "version": version, "by": identity(actor), "approvals": reg.approvals(name, version),
                "gates": reg.check_gates(name, version)}

    def _candidate_signature(self, name: str | None, body: Any) -> Signature | None:
        """The signature of the model an add_variant or swap names, read
        before any replica loads it (None: unknown until its replicas report
        it loaded, when it is judged again; a bad body is the operation's to
        refuse)."""
        try:
            model, _ = signature_gate.take_allow(body)
            cfg = model_config(name or "", model)
        except FlywheelError:
            return None
        return self._read_signature(cfg)

    def _learn_signatures(self, name: str | None) -> None:
        """Read from their artifacts the signatures of the endpoint's ready
        variants that no replica has reported yet (a management call right
        after a deploy can come before the first reports)."""
        try:
            with self._lock:
                wanted = self._state.unknown_signatures(name or "")
        except FlywheelError:
            return  # an unknown endpoint: the operation itself says so
        found = {}
        for version, doc in wanted:
            try:
                sig = self._read_signature(msgspec.convert(doc, ModelConfig))
            except msgspec.ValidationError:
                sig = None
            if sig is not None:
                found[version] = sig
        if found:
            with self._lock:
                self._state.learn_signatures(name or "", found)

    def _read_signature(self, cfg: ModelConfig) -> Signature | None:
        """A model's signature without loading it: from its ONNX graph, else
        from the registry's record of its version; None when neither can be
        read (a backend that reads no ONNX file and no record)."""
        if cfg.pipeline or cfg.preprocess is not None or cfg.postprocess is not None:
            # callers see the steps' (or the stages') outer signature, which
            # neither the ONNX graph nor the record holds: known once loaded
            return None
        try:
            reg = self._registry
            ref = reg.resolve(cfg.ref).ref if cfg.ref and reg is not None else ""
            if cfg.backend in _ONNX_BACKENDS and (cfg.path or ref):
                try:
                    path = reg.artifact_path(ref, cfg.artifact)[1] if ref else cfg.path
                    return read_onnx_signature(path)
                except FlywheelError as exc:
                    log.info("signature of %s/%s not read from its artifact: %s", cfg.name, cfg.version, exc.message)
            if ref:
                recorded = reg.resolve(ref).signature
                return signature_from_doc(recorded) if recorded else None
        except Exception as exc:  # best effort: the check when it has loaded still stands
            log.info("signature of %s/%s unknown before loading: %s", cfg.name, cfg.version,
                     getattr(exc, "message", exc))
        return None

    def check_health(self) -> None:
        if time.monotonic() - self._beat > 30:
            raise RuntimeError("router controller ticker stalled")

    def __del__(self) -> None:
        self._stop.set()
        for closable in (self._store, self._registry):
            if closable is not None:
                try:
                    closable.close()
                except Exception:
                    pass


def _alias_ops(reg) -> dict:
    """ControlState's registry callbacks. Moving ``production`` is the
    registry's gated move (set_alias checks the gates and moves the stage);
    putting it back after a rollback is the registry's ungated rollback to a
    former production version. Other aliases are plain pointers."""
    def check(name: str, alias: str, version: int) -> list[str]:
        if alias != PRODUCTION:
            return []
        if reg.get_version(name, version).stage == "archived":  # set_alias would refuse it at the end
            return [f"{name}/{version} is archived (only a rollback brings a former production version back)"]
        return reg.check_gates(name, version)

    def restore(name: str, alias: str, version: int) -> None:
        if alias == PRODUCTION:
            reg.rollback(name, actor=ACTOR, to=version)
        else:
            reg.set_alias(name, alias, version, actor=ACTOR)

    return {
        "alias_mover": lambda n, a, v: reg.set_alias(n, a, v, actor=ACTOR),
        "resolver": lambda ref: reg.resolve(ref).ref,
        "gate_checker": check,
        "alias_restorer": restore,
    }


def _field(body: Any, key: str) -> str:
    if not isinstance(body, dict) or not isinstance(body.get(key), str) or not body[key]:
        raise InvalidInputError(f"the body must be a JSON object with a non-empty string {key!r}")
    return body[key]
