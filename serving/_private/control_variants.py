"""The variant side of the router controller's decisions: an endpoint's routing
policy and shadow traffic, variants added and removed at run time, and swaps
(load and warm the new variant everywhere, move all traffic, drain the old).

One part of :class:`~flywheel.serving.control_state.ControlState` (a mixin:
it holds no state of its own and is not used alone); the canary side is
serving/_private/control_canary.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from flywheel.protocol.errors import (
    AlreadyExistsError,
    ConfigError,
    FlywheelError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
)
from flywheel.registry.db import DatabaseUnreachable
from flywheel.runtime.signature import Signature, SignatureMismatchError
from flywheel.serving._private import signature_gate
from flywheel.serving._private.endpoint_state import Endpoint, as_doc, newest, routes_to, with_arms, without
from flywheel.serving.config import ModelConfig
from flywheel.serving.policies import make_policy
from flywheel.serving.policy_config import FixedPolicy, decode_policy
from flywheel.serving.router import version_key
from flywheel.serving.shadow import ShadowConfig

if TYPE_CHECKING:
    from flywheel.serving.control_state import Replica

LOAD_TIMEOUT_S = 300.0  # a variant still loading after this long has failed
DRAIN_TIMEOUT_S = 30.0  # a retiring variant is removed after this even if busy


class VariantOps:
    """ControlState's policy, shadow, variant and swap operations, and the
    ticks that move loads, swaps and drains along."""

    # what ControlState provides
    version: int
    _resolve: Callable[[str], str] | None
    endpoint: Callable[[str], Endpoint]
    status: Callable[..., dict]
    _changed: Callable[[float], None]

    # -- policy and shadow --------------------------------------------------
    def set_policy(self, name: str, policy: Any, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        try:
            cfg = decode_policy(policy)
        except ConfigError as exc:  # from a caller: their input, not our config
            raise InvalidInputError(exc.message) from None
        routable = set(ep.routable())
        field, named = ("weights", cfg.weights) if isinstance(cfg, FixedPolicy) else ("arms", cfg.arms)
        unknown = sorted(set(named) - set(ep.variants))
        if unknown:
            raise InvalidInputError(
                f"policy.{field} names variants {unknown} that endpoint {name!r} does not have; "
                f"it has {sorted(ep.variants, key=version_key)}"
            )
        if isinstance(cfg, FixedPolicy):
            if not any(w > 0 for v, w in cfg.weights.items() if v in routable):
                raise InvalidInputError(f"policy.weights gives no weight to a ready variant of {name!r}")
        elif cfg.arms:
            retiring = sorted(set(cfg.arms) & set(ep.doc["retiring"]))
            if retiring:
                raise InvalidInputError(f"policy.arms names variants {retiring} of {name!r} that are being removed")
            if not routable & set(cfg.arms):
                raise InvalidInputError(f"policy.arms names no ready variant of {name!r}; ready: {sorted(routable)}")
        self._busy(ep, "set a policy")
        state = ep.doc["policy_state"]
        if not isinstance(cfg, FixedPolicy):  # a bandit starts from the arms' statistics so far
            try:  # built before anything changes: a policy that cannot run is refused whole
                state = make_policy(cfg, sorted(routable, key=version_key), state).state()
            except (ConfigError, InvalidInputError):
                state = make_policy(cfg, sorted(routable, key=version_key)).state()
        ep.doc["policy"] = with_arms(as_doc(cfg), sorted(routable, key=version_key))
        ep.doc["policy_state"] = state
        ep.event(now, "policy", f"policy set to {cfg.kind}")
        self._changed(now)
        return self.status(name, now)

    def _busy(self, ep: Endpoint, what: str) -> None:
        swap = ep.doc["swap"]
        if swap and swap["phase"] in ("loading", "draining"):
            raise PreconditionFailedError(f"cannot {what}: endpoint {ep.name!r} is swapping {swap['from']} -> {swap['to']}")
        canary = ep.doc["canary"]
        if canary and canary["state"]["status"] == "running":
            raise PreconditionFailedError(f"cannot {what}: a canary of {ep.name!r} is running (abort it first)")

    def set_shadow(self, name: str, shadow: Any | None, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        if shadow is None:
            ep.doc["shadow"] = None
            ep.event(now, "shadow", "shadow traffic off")
        else:
            try:
                cfg = msgspec.convert(shadow, ShadowConfig, strict=False)
            except msgspec.ValidationError as exc:
                raise InvalidInputError(f"shadow: {exc}") from None
            if cfg.variant not in ep.routable():
                raise InvalidInputError(f"shadow.variant {cfg.variant!r} is not a ready variant of {name!r}")
            ep.doc["shadow"] = as_doc(cfg)
            ep.event(now, "shadow", f"{cfg.fraction:.0%} of traffic mirrored to {cfg.variant}")
        self._changed(now)
        return self.status(name, now)

    # -- variants and swaps ------------------------------------------------
    def add_variant(self, name: str, model: Any, now: float | None = None, *,
                    signature: Signature | None = None) -> dict:
        """Ask every ingress replica to load (and warm) a new variant; it takes
        no traffic until every live replica has it ready. ``signature``: the
        candidate's, when it could be read before loading (see
        serving/_private/signature_gate.py); SignatureMismatchError when it
        differs from the endpoint's and the change is not allowed."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        model, allow = signature_gate.take_allow(model)
        cfg = self._captured(self._pinned(model_config(name, model)))
        self._fits_ingress(cfg)
        if cfg.version in ep.variants:
            raise AlreadyExistsError(f"endpoint {name!r} already has variant {cfg.version!r}")
        self._admit(ep, cfg, signature, allow, now)
        ep.event(now, "variant", f"loading variant {cfg.version}")
        self._changed(now)
        return self.status(name, now)

    def _admit(self, ep: Endpoint, cfg: ModelConfig, signature: Signature | None, allow: bool,
               now: float) -> None:
        """Judge the candidate's signature (raises before anything changes),
        then list it as loading."""
        diff = signature_gate.judge(ep, cfg.version, signature, against=signature_gate.reference(ep),
                                    allowed=allow)
        ep.variants[cfg.version] = {"model": as_doc(cfg), "status": "loading", "error": "", "since": now,
                                    "allow_signature_change": allow, "signature_noted": diff is not None}
        ep.doc["models"][cfg.version] = as_doc(cfg)
        if diff is not None:
            signature_gate.note(ep, cfg.version, diff, by_request=allow, now=now)

    def _swap_gates(self, ep: Endpoint, cfg: ModelConfig) -> None:
        """A swap moves all traffic, so it is a promotion: a registry version
        that the endpoint's alias (``production``) could not move to is
        refused before anything loads (and the alias moves when the traffic
        does, see _tick_swap)."""
        model, _, number = cfg.ref.partition("/")
        if not (number.isdigit() and ep.doc["alias"] and self._check_gates is not None
                and getattr(self, "_move_alias", None) is not None):
            return
        failures = self._check_gates(model, ep.doc["alias"], int(number))
        if failures:
            raise PreconditionFailedError(
                f"swap of {ep.doc['name']!r} refused: {model}/{number} may not become {model}@{ep.doc['alias']}: "
                + "; ".join(failures)
            )

    def _captured(self, cfg: ModelConfig) -> ModelConfig:
        """A variant that sets no capture of its own captures as its endpoint
        does (what the deploy config gives its static versions)."""
        endpoint = getattr(self, "endpoint_configs", {}).get(cfg.name)
        if cfg.capture is None and endpoint is not None and endpoint.capture is not None:
            return msgspec.structs.replace(cfg, capture=endpoint.capture)
        return cfg

    def _pinned(self, cfg: ModelConfig) -> ModelConfig:
        """Pin ``name@alias`` to ``name/N`` once, here, so that every replica
        loads the same version even if the alias moves meanwhile."""
        if not cfg.ref:
            return cfg
        if self._resolve is None:
            raise InvalidInputError("model.ref needs a registry, and this deployment has none")
        ref = self._resolve(cfg.ref)
        version = cfg.version or ref.split("/", 1)[1]
        return msgspec.structs.replace(cfg, ref=ref, version=version)

    def remove_variant(self, name: str, version: str, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        if version not in ep.variants:
            raise NotFoundError(f"endpoint {name!r} has no variant {version!r}")
        self._busy(ep, f"remove variant {version}")
        if ep.routable() == [version]:
            raise PreconditionFailedError(f"variant {version!r} is the last ready variant of {name!r}; swap instead")
        if routes_to(ep.doc["policy"], ep.routable()) == [version]:
            raise PreconditionFailedError(
                f"variant {version!r} is the only one {name!r}'s {ep.doc['policy']['kind']} policy sends traffic to; "
                "set a policy first (or swap)"
            )
        self._retire(ep, version, now)
        self._changed(now)
        return self.status(name, now)

    def _retire(self, ep: Endpoint, version: str, now: float) -> None:
        """Stop routing to ``version`` now; remove it once every replica has
        stopped sending it requests (see tick)."""
        ep.doc["retiring"][version] = {"since": now, "after": self.version + 1}
        ep.doc["policy"] = without(ep.doc["policy"], version) or newest(ep, version) or ep.doc["policy"]
        if ep.doc["shadow"] and ep.doc["shadow"]["variant"] == version:
            ep.doc["shadow"] = None
        ep.event(now, "retire", f"retiring variant {version}")

    def swap(self, name: str, model: Any, now: float | None = None, *,
             signature: Signature | None = None) -> dict:
        """Replace what serves ``name``: load and warm the new variant on
        every replica, move all traffic to it, drain and remove the old ones.
        ``signature`` and its refusal: as for :meth:`add_variant`."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        self._busy(ep, "swap")
        model, allow = signature_gate.take_allow(model)
        cfg = self._captured(self._pinned(model_config(name, model)))
        self._fits_ingress(cfg)
        old = ep.routable()
        if cfg.version in ep.variants:
            raise AlreadyExistsError(
                f"endpoint {name!r} already has variant {cfg.version!r}; give the new one another version"
            )
        self._swap_gates(ep, cfg)
        self._admit(ep, cfg, signature, allow, now)
        ep.doc["swap"] = {"from": old, "to": cfg.version, "phase": "loading", "error": "", "started": now}
        ep.event(now, "swap", f"swap {old} -> {cfg.version}: loading")
        self._changed(now)
        return self.status(name, now)

    # -- ticks ----------------------------------------------------------------
    def _tick_loading(self, ep: Endpoint, live: dict[str, Replica], now: float) -> None:
        for version, state in list(ep.variants.items()):
            if state["status"] != "loading":
                continue
            reports = [r.loaded.get(ep.name, {}).get(version, "") for r in live.values()]
            failed = [r for r in reports if r.startswith("failed")]
            if failed:
                self._load_failed(ep, version, failed[0].partition(":")[2].strip() or "load failed", now)
            elif now - state.get("since", now) > LOAD_TIMEOUT_S:
                self._load_failed(ep, version, f"not ready on every replica after {LOAD_TIMEOUT_S:.0f}s", now)
            elif reports and all(r == "ready" for r in reports):
                against = signature_gate.reference(ep, exclude=version)
                if signature_gate.unknown(ep, version, against):
                    # not judged, never passed: it waits (up to LOAD_TIMEOUT_S)
                    # for the replicas to report the signatures
                    continue
                if not self._signature_fits(ep, version, state, now):
                    continue
                state["status"] = "ready"
                ep.event(now, "variant", f"variant {version} ready on {len(reports)} replica(s)")
                self._changed(now)

    def _signature_fits(self, ep: Endpoint, version: str, state: dict, now: float) -> bool:
        """The loaded variant's own signature, as its replicas reported it,
        judged before it can take traffic (the one read before loading, if
        any, came from the artifact or the registry's record of it)."""
        try:
            diff = signature_gate.judge(
                ep, version, signature_gate.known(ep, version),
                against=signature_gate.reference(ep, exclude=version),
                allowed=state.get("allow_signature_change", False),
            )
        except SignatureMismatchError as exc:
            self._load_failed(ep, version, exc.message, now)
            return False
        if diff is not None and not state.get("signature_noted"):
            state["signature_noted"] = True
            signature_gate.note(ep, version, diff, by_request=state.get("allow_signature_change", False), now=now)
        return True

    def _fits_ingress(self, cfg: ModelConfig) -> None:
        """A runtime variant loads into the ingress replicas, whose Ray
        resources were fixed at deploy: a model needing more GPU than they
        hold would run on the CPU fallback unseen (or not at all)."""
        need = cfg.gpus()
        if need > self.ingress_gpus:
            raise InvalidInputError(
                f"model needs {need:g} GPU per replica, and the ingress replicas that load variants added at "
                f"run time were deployed with {self.ingress_gpus:g}; deploy it with the deployment's config, or "
                "set model.onnxruntime.providers to [cpu] (or model.num_gpus: 0 to accept ONNX Runtime's "
                "CPU fallback)"
            )

    def _load_failed(self, ep: Endpoint, version: str, error: str, now: float) -> None:
        ep.doc["policy"] = without(ep.doc["policy"], version) or ep.doc["policy"]  # a version re-added later is no arm
        del ep.variants[version]
        ep.doc["models"].pop(version, None)
        signature_gate.forget(ep, version)
        ep.doc.setdefault("failed", {})[version] = error
        swap = ep.doc["swap"]
        if swap and swap["to"] == version and swap["phase"] == "loading":
            swap.update(phase="failed", error=error)
            ep.event(now, "swap", f"swap to {version} failed, {swap['from']} keeps serving: {error}")
        else:
            ep.event(now, "variant", f"variant {version} failed to load: {error}")
        self._changed(now)

    def _tick_swap(self, ep: Endpoint, live: dict[str, Replica], now: float) -> None:
        swap = ep.doc["swap"]
        if not swap:
            return
        if swap["phase"] == "loading" and ep.variants.get(swap["to"], {}).get("status") == "ready":
            try:  # the registry's alias before the traffic, as a promotion does (gated for production)
                self._alias(ep, swap["to"], now)
            except DatabaseUnreachable:  # not a refusal: the next tick tries again
                return
            except FlywheelError as exc:
                swap.update(phase="failed", error=exc.message)
                self._retire(ep, swap["to"], now)
                ep.event(now, "swap", f"swap to {swap['to']} refused, {swap['from']} keeps serving: {exc.message}")
                self._changed(now)
                return
            swap["phase"] = "draining"
            ep.doc["policy"] = {"kind": "fixed", "weights": {swap["to"]: 1.0}}
            for v in swap["from"]:
                if v in ep.variants and v != swap["to"]:
                    self._retire(ep, v, now)
            ep.event(now, "swap", f"traffic moved to {swap['to']}; draining {swap['from']}")
            self._changed(now)
        elif swap["phase"] == "draining" and not any(v in ep.doc["retiring"] for v in swap["from"]):
            swap["phase"] = "done"
            swap["finished"] = now
            ep.event(now, "swap", f"swap to {swap['to']} done")
            self._changed(now)

    def _tick_retiring(self, ep: Endpoint, live: dict[str, Replica], now: float) -> None:
        for version, info in list(ep.doc["retiring"].items()):
            applied = all(r.applied >= info["after"] for r in live.values())
            idle = all(r.inflight.get(ep.name, {}).get(version, 0) == 0 for r in live.values())
            if (applied and idle) or now - info["since"] > DRAIN_TIMEOUT_S:
                del ep.doc["retiring"][version]
                ep.variants.pop(version, None)
                signature_gate.forget(ep, version)
                ep.event(now, "variant", f"variant {version} removed (drained)")
                self._changed(now)


def model_config(name: str, model: Any) -> ModelConfig:
    """A runtime variant's ModelConfig: the endpoint's name, colocated (every
    ingress replica loads it), a version of its own."""
    if not isinstance(model, dict):
        raise InvalidInputError("model must be a JSON object (a model config: version and ref or path, ...)")
    model = {"name": name, **model}
    if model["name"] != name:
        raise InvalidInputError(f"model.name {model['name']!r} must be the endpoint's name {name!r}")
    try:
        cfg = msgspec.convert(model, ModelConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidInputError(f"model: {exc}") from None
    except Exception as exc:  # ConfigError from the struct's own checks
        raise InvalidInputError(f"model: {getattr(exc, 'message', exc)}") from None
    if cfg.placement != "colocated":
        raise InvalidInputError(
            "model.placement: variants added at run time are loaded into the ingress replicas "
            "(colocated); deploy dedicated models with the deployment's config"
        )
    if not cfg.version and not cfg.ref:
        raise InvalidInputError("model.version is required with model.path")
    return cfg
