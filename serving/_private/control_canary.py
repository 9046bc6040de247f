"""The canary side of the router controller's decisions: start, judge step by
step (the gates, drift included), advance, roll back or promote a canary;
promote a variant by hand (moving the registry alias) and undo a promotion.

Governance: for a variant from the registry (its model config has a
``ref``) on an endpoint whose ``promote_alias`` is set, a promotion moves that
alias first and traffic only if the registry took the move; for the
``production`` alias that move passes the model's gates (registry/registry.py),
so a refused promotion (412, naming the failed rule) changes nothing. A canary
of such a variant is refused at its start when the gates fail now, and one
whose final promotion is refused (the policy changed, an approval is missing)
rolls back with the registry's reason. Variants from plain paths, and
endpoints with ``promote_alias: ""``, move no alias and check no gates. An
operator's rollback of a promotion puts the alias back without gates (the
registry's ``rollback``: the emergency exit).

One part of :class:`~flywheel.serving.control_state.ControlState` (a mixin:
it holds no state of its own and is not used alone). The judging itself is
serving/canary.py's :class:`~flywheel.serving.canary.Canary`; the variant side
is serving/_private/control_variants.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from flywheel.protocol.errors import FlywheelError, InvalidInputError, PreconditionFailedError, UnavailableError
from flywheel.registry.db import DatabaseUnreachable
from flywheel.serving._private import signature_gate
from flywheel.serving._private.endpoint_state import Endpoint, as_doc, canary_of, canary_percent, routes_to, without
from flywheel.serving.canary import Canary, CanaryConfig, VariantWindow


def count_canary(ep: Endpoint, outcome: str) -> None:
    """One more ended canary of ``outcome`` (promoted, rolled_back, aborted)
    on the endpoint, kept with its state (the counter outlives restarts)."""
    counts = ep.doc.setdefault("canary_outcomes", {})
    counts[outcome] = counts.get(outcome, 0) + 1


class CanaryOps:
    """ControlState's canary, promotion and rollback operations, the canary
    tick, and the drift scores a drift-gated canary step waits for."""

    # what ControlState (and VariantOps) provide
    endpoints: dict[str, Endpoint]
    _drift: dict[tuple[str, str], float | None]
    _drift_monitor: bool
    _move_alias: Callable[[str, str, int], None] | None
    _check_gates: Callable[[str, str, int], list[str]] | None
    _restore_alias: Callable[[str, str, int], None] | None
    endpoint: Callable[[str], Endpoint]
    status: Callable[..., dict]
    _changed: Callable[[float], None]
    _busy: Callable[[Endpoint, str], None]
    _retire: Callable[[Endpoint, str, float], None]

    # -- canaries -----------------------------------------------------------
    def start_canary(self, name: str, config: Any, now: float | None = None) -> dict:
        """Start ``config`` (a CanaryConfig, plus ``allow_signature_change``).
        SignatureMismatchError, before anything changes, when the variant's
        signature differs from its baseline's and the change is not allowed
        (the check any caller starting a canary, a loop included, gets)."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        self._busy(ep, "start a canary")
        config, allow = signature_gate.take_allow(config)
        try:
            cfg = msgspec.convert(config, CanaryConfig, strict=False)
        except msgspec.ValidationError as exc:
            raise InvalidInputError(f"canary: {exc}") from None
        if cfg.gates.max_drift is not None:
            drift = ((ep.doc["models"].get(cfg.variant) or {}).get("drift") or {}).get("enabled", False)
            if not (self._drift_monitor and drift):
                raise InvalidInputError(
                    f"canary.gates.max_drift: variant {cfg.variant!r} of {name!r} has no drift monitoring; it needs "
                    "drift.enabled in its model config and a drift monitor in the deployment (one deployed "
                    "model with drift.enabled)"
                )
        routable = ep.routable()
        if cfg.variant not in routable:
            raise InvalidInputError(
                f"canary.variant {cfg.variant!r} is not a ready variant of {name!r}; ready: {routable} "
                "(add it first: POST /v2/endpoints/{name}/variants)"
            )
        if not cfg.baseline:
            current = ep.weights() or ep.policy().weights()
            others = {v: w for v, w in current.items() if v != cfg.variant}
            if not others:
                raise InvalidInputError(f"canary of {name!r} needs a baseline: no other variant takes traffic")
            cfg = msgspec.structs.replace(cfg, baseline=max(others, key=others.get))
        if cfg.baseline not in routable or cfg.baseline == cfg.variant:
            raise InvalidInputError(f"canary.baseline {cfg.baseline!r} must be another ready variant of {name!r}")
        missing = signature_gate.unknown(ep, cfg.variant, cfg.baseline)
        if missing:
            raise UnavailableError(
                f"canary of {name!r}: the signature of version(s) {missing} is not known yet (the ingress "
                "replicas report it within a second of loading); nothing was changed, retry shortly"
            )
        diff = signature_gate.judge(ep, cfg.variant, signature_gate.known(ep, cfg.variant),
                                    against=cfg.baseline, allowed=allow)
        target = self._registry_target(ep, cfg.variant)
        if target is not None and self._check_gates is not None:
            # a canary that could never be promoted must not ramp at all
            failures = self._check_gates(*target)
            if failures:
                raise PreconditionFailedError(
                    f"canary of {name!r} refused: {_target_ref(target)} may not become {target[0]}@{target[1]}: "
                    + "; ".join(failures)
                )
        canary = Canary(cfg, now)
        if diff is not None:
            signature_gate.note(ep, cfg.variant, diff, by_request=allow, now=now)
        ep.doc["canary"] = {"config": as_doc(cfg), "state": canary.state(), "saved_policy": ep.doc["policy"]}
        ep.step.clear()
        ep.event(now, "canary", f"canary {cfg.variant} vs {cfg.baseline} started at {cfg.steps[0]} %")
        self._changed(now)
        return self.status(name, now)

    def abort_canary(self, name: str, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        doc = ep.doc["canary"]
        if not doc or doc["state"]["status"] != "running":
            raise PreconditionFailedError(f"endpoint {name!r} has no running canary")
        canary = canary_of(doc)
        canary.abort(now, "aborted by an operator")
        self._end_canary(ep, canary, now, "aborted by an operator")
        return self.status(name, now)

    def _end_canary(self, ep: Endpoint, canary: Canary, now: float, why: str) -> None:
        doc = ep.doc["canary"]
        doc["state"] = canary.state()
        count_canary(ep, canary.status)
        baseline = {"kind": "fixed", "weights": {doc["config"]["baseline"]: 1.0}}
        restored = without(doc.get("saved_policy") or baseline, doc["config"]["variant"])
        # the saved policy may name only variants that are gone by now
        ep.doc["policy"] = restored if restored is not None and routes_to(restored, ep.routable()) else baseline
        ep.event(now, "canary", why)
        self._changed(now)

    def _tick_canary(self, ep: Endpoint, now: float) -> None:
        doc = ep.doc["canary"]
        if not doc or doc["state"]["status"] != "running":
            return
        cfg = msgspec.convert(doc["config"], CanaryConfig)
        canary = canary_of(doc)
        step, prior = canary.step, doc["state"]
        decision = canary.evaluate(
            now, ep.step.get(cfg.baseline) or VariantWindow(), ep.step.get(cfg.variant) or VariantWindow(),
            self._drift.get((ep.name, cfg.variant)) if cfg.gates.max_drift is not None else None,
        )
        if canary.step != step or canary.finished:
            self._drift.pop((ep.name, cfg.variant), None)  # a score belongs to one step
        doc["state"] = canary.state()
        ep.dirty = True
        if decision.action == "hold":
            if canary.status == "completed":  # promote: false: it stays at 100 %, not promoted
                ep.doc["policy"] = {"kind": "fixed", "weights": {cfg.variant: 1.0}}
                ep.event(now, "canary", f"canary {cfg.variant} passed every step; holding at 100 % (promote: false)")
                self._changed(now)
            return
        ep.step.clear()  # windows are per step (Canary.evaluate's contract)
        if decision.action == "advance":
            ep.event(now, "canary", f"canary {cfg.variant} advanced to {canary_percent(ep.doc)} %")
            self._changed(now)
        elif decision.action == "rollback":
            self._end_canary(ep, canary, now, f"rolled back: {decision.reason}")
        elif decision.action == "promote":
            try:
                self._promote(ep, cfg.variant, now, f"canary {cfg.variant} passed every step")
            except DatabaseUnreachable:  # not a refusal: the canary runs on and promotes once it is back
                doc["state"] = prior
                return
            except FlywheelError as exc:  # the registry refused: nothing moved, the canary ends here
                why = f"rolled back: the promotion was refused: {exc.message}"
                canary.status = "rolled_back"
                canary.history.append({"time": float(now), "step": canary.step, "percent": 0.0,
                                       "action": "rollback", "reason": why, "gates": []})
                self._end_canary(ep, canary, now, why)
                return
            doc["state"] = canary.state()
            count_canary(ep, "promoted")

    # -- drift gate -----------------------------------------------------------
    def drift_wanted(self) -> list[tuple[str, str, float]]:
        """(endpoint, variant, since) of every running canary with a drift
        gate: the caller reads the variant's drift results scored since then
        (the current step's start) and hands the score to :meth:`set_drift`.
        Kept out of tick so that the controller can fetch them unlocked."""
        out = []
        for ep in self.endpoints.values():
            doc = ep.doc["canary"]
            if doc and doc["state"]["status"] == "running" and doc["config"]["gates"].get("max_drift") is not None:
                out.append((ep.name, doc["config"]["variant"], canary_of(doc).step_started_at))
        return out

    def set_drift(self, name: str, variant: str, score: float | None) -> None:
        """The drift score of ``variant`` in its canary's current step (None:
        no window scored yet, and a drift-gated step does not advance)."""
        self._drift[(name, variant)] = score

    # -- promotion and rollback -----------------------------------------------
    def promote(self, name: str, version: str, now: float | None = None) -> dict:
        """All traffic to ``version``; move the registry alias; retire the
        rest. The alias moves first: when the registry refuses it (a failed
        gate: PreconditionFailedError naming the rule), nothing changes."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        if version not in ep.routable():
            raise InvalidInputError(f"version {version!r} is not a ready variant of {name!r}; ready: {ep.routable()}")
        swap = ep.doc["swap"]
        if swap and swap["phase"] in ("loading", "draining"):
            raise PreconditionFailedError(f"cannot promote: endpoint {name!r} is swapping")
        self._alias(ep, version, now)
        doc = ep.doc["canary"]
        if doc and doc["state"]["status"] == "running":
            canary = canary_of(doc)
            canary.abort(now, f"promoted {version} by an operator")
            doc["state"] = canary.state()
            doc["state"]["status"] = "promoted" if version == doc["config"]["variant"] else "aborted"
        self._promote(ep, version, now, f"promoted {version} by an operator", alias_moved=True)
        return self.status(name, now)

    def _promote(self, ep: Endpoint, version: str, now: float, why: str, *, alias_moved: bool = False) -> None:
        """Alias first (FlywheelError, nothing changed, when the registry
        refuses it), then traffic."""
        if not alias_moved:
            self._alias(ep, version, now)
        ep.doc["policy"] = {"kind": "fixed", "weights": {version: 1.0}}
        for v in ep.routable():
            if v != version:
                self._retire(ep, v, now)
        ep.event(now, "promote", why)
        self._changed(now)

    def _registry_target(self, ep: Endpoint, version: str) -> tuple[str, str, int] | None:
        """(model, alias, registry version) a promotion of ``version`` moves,
        or None: no registry, no alias on the endpoint, or a variant that is
        not from the registry."""
        ref = (ep.doc["models"].get(version) or {}).get("ref", "")
        if self._move_alias is None or not ref or not ep.doc["alias"]:
            return None
        model, _, number = ref.partition("/")
        if not number.isdigit():  # pinned to name/N when added; anything else is no registry version
            return None
        return model, ep.doc["alias"], int(number)

    def _alias(self, ep: Endpoint, version: str, now: float) -> None:
        """Move the endpoint's alias to ``version`` in the registry (gated for
        ``production``). Raises the registry's FlywheelError (an unexpected
        failure as UnavailableError) and records nothing when it refuses."""
        target = self._registry_target(ep, version)
        if target is None:
            return
        try:
            self._move_alias(*target)
        except FlywheelError:
            raise
        except Exception as exc:  # fail closed: no promotion the registry did not record
            raise UnavailableError(f"could not move {target[0]}@{target[1]} to {_target_ref(target)}: {exc}") from exc
        ep.event(now, "alias", f"{target[0]}@{target[1]} -> {_target_ref(target)}")

    def rollback(self, name: str, now: float | None = None) -> dict:
        """Abort a running canary, or undo the last promotion's traffic move."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        doc = ep.doc["canary"]
        if doc and doc["state"]["status"] == "running":
            return self.abort_canary(name, now)
        if doc and doc["state"]["status"] in ("promoted", "completed"):
            baseline = doc["config"]["baseline"]
            if baseline not in ep.variants:
                raise PreconditionFailedError(f"cannot roll back {name!r}: baseline {baseline!r} was already removed")
            promoted = doc["state"]["status"] == "promoted"
            ep.doc["retiring"].pop(baseline, None)
            ep.doc["policy"] = {"kind": "fixed", "weights": {baseline: 1.0}}
            doc["state"]["status"] = "rolled_back"
            ep.event(now, "rollback", f"traffic back on {baseline}")
            if promoted:  # the alias moved only on promotion (not for promote: false)
                if (ep.doc["models"].get(baseline) or {}).get("ref"):
                    self._restore(ep, baseline, now)
                elif ep.doc["alias"] and self._move_alias is not None:
                    ep.event(now, "alias", f"{ep.doc['alias']!r} stays where the promotion put it: "
                                           f"baseline {baseline} has no registry reference")
            self._changed(now)
            return self.status(name, now)
        raise PreconditionFailedError(f"endpoint {name!r} has no canary to roll back")

    def _restore(self, ep: Endpoint, version: str, now: float) -> None:
        """Put the alias back on ``version`` after a rollback, without gates
        (the registry's emergency exit); traffic is back whatever happens
        here, and an event says when the alias could not follow."""
        target = self._registry_target(ep, version)
        if target is None:
            return
        restore = self._restore_alias or self._move_alias
        try:
            restore(*target)
            ep.event(now, "alias", f"{target[0]}@{target[1]} -> {_target_ref(target)}")
        except Exception as exc:
            ep.event(now, "alias", f"could not move {target[1]!r} back to {_target_ref(target)}: "
                                   f"{getattr(exc, 'message', exc)}")


def _target_ref(target: tuple[str, str, int]) -> str:
    return f"{target[0]}/{target[2]}"
