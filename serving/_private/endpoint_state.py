"""One endpoint's durable state document (what serving/control_state.py
persists and snapshots) and the pure functions over its policy and canary
parts; no decisions here, those are ControlState's."""

from __future__ import annotations

import msgspec

from flywheel.serving.canary import Canary, CanaryConfig, VariantWindow
from flywheel.serving.config import EndpointConfig, ModelConfig
from flywheel.serving.policies import make_policy
from flywheel.serving.policy_config import decode_policy
from flywheel.serving.router import version_key

MAX_EVENTS = 50


def as_doc(struct: msgspec.Struct) -> dict:
    return msgspec.to_builtins(struct)


class Endpoint:
    """One endpoint's durable state (``doc``) and its live statistics."""

    def __init__(self, doc: dict) -> None:
        self.doc = doc
        self.totals: dict[str, VariantWindow] = {
            v: VariantWindow.from_wire(w) for v, w in doc.get("totals", {}).items()
        }
        self.step: dict[str, VariantWindow] = {}  # the canary's current-step windows
        self.dirty = True

    @classmethod
    def fresh(cls, config: EndpointConfig, static: list[ModelConfig]) -> Endpoint:
        versions = sorted((m.version for m in static), key=version_key)
        policy = (with_arms(as_doc(config.policy), versions) if config.policy is not None
                  else {"kind": "fixed", "weights": {versions[-1]: 1.0}})
        return cls({
            "name": config.name,
            "variants": {m.version: {"model": None, "status": "ready", "error": ""} for m in static},
            "models": {m.version: as_doc(m) for m in static},
            "policy": policy,
            "policy_state": None,
            "shadow": as_doc(config.shadow) if config.shadow is not None else None,
            "sticky": {"header": config.sticky_header, "parameter": config.sticky_parameter},
            "alias": config.promote_alias,
            "allow_signature_change": config.allow_signature_change,
            "signatures": {},  # version -> its signature, as its replicas reported it
            "canary": None,
            "swap": None,
            "retiring": {},
            "events": [],
            "totals": {},
        })

    @property
    def name(self) -> str:
        return self.doc["name"]

    @property
    def variants(self) -> dict[str, dict]:
        return self.doc["variants"]

    def routable(self) -> list[str]:
        retiring = self.doc["retiring"]
        return sorted(
            (v for v, s in self.variants.items() if s["status"] == "ready" and v not in retiring), key=version_key
        )

    def event(self, now: float, kind: str, detail: str) -> None:
        events = self.doc["events"]
        events.append({"time": now, "kind": kind, "detail": detail})
        del events[:-MAX_EVENTS]
        self.dirty = True

    def window(self, variant: str) -> VariantWindow:
        w = self.totals.get(variant)
        if w is None:
            w = self.totals[variant] = VariantWindow()
        return w

    def step_window(self, variant: str) -> VariantWindow:
        w = self.step.get(variant)
        if w is None:
            w = self.step[variant] = VariantWindow()
        return w

    def policy(self):
        """The routing policy over the routable variants (bandit arms keep
        their statistics across changes of the variant set)."""
        cfg = decode_policy(self.doc["policy"])
        return make_policy(cfg, self.routable(), self.doc["policy_state"])

    def weights(self) -> dict[str, float] | None:
        """Traffic shares that override the policy: a swap moving traffic, a
        running canary, or a fixed policy. None = ask the bandit."""
        swap = self.doc["swap"]
        if swap and swap["phase"] in ("draining",):
            return {swap["to"]: 1.0}
        canary = self.doc["canary"]
        if canary and canary["state"]["status"] == "running":
            return canary_of(canary).weights()
        if self.doc["policy"]["kind"] == "fixed":
            routable = set(self.routable())
            weights = {v: w for v, w in self.doc["policy"]["weights"].items() if v in routable and w > 0}
            if not weights and routable:  # what the policy named is gone: the newest takes it all
                weights = {max(routable, key=version_key): 1.0}
            return weights
        return None


def with_arms(policy: dict, variants: list[str]) -> dict:
    """A bandit policy document with its arms written out (``variants`` when
    it names none), so that variants added later are not arms."""
    if policy["kind"] == "fixed" or policy.get("arms"):
        return policy
    return {**policy, "arms": list(variants)}


def routes_to(policy: dict, routable: list[str]) -> list[str]:
    """The routable variants ``policy`` can send traffic to."""
    if policy["kind"] == "fixed":
        return [v for v in routable if policy["weights"].get(v, 0) > 0]
    arms = policy.get("arms")
    return [v for v in routable if v in arms] if arms else list(routable)


def newest(ep: Endpoint, version: str) -> dict | None:
    """All traffic to the newest routable variant other than ``version``."""
    others = [v for v in ep.routable() if v != version]
    return {"kind": "fixed", "weights": {max(others, key=version_key): 1.0}} if others else None


def without(policy: dict, version: str) -> dict | None:
    """``policy`` routing nothing to ``version``; None when nothing is left."""
    if policy["kind"] == "fixed":
        weights = {v: w for v, w in policy["weights"].items() if v != version}
        return {**policy, "weights": weights} if any(w > 0 for w in weights.values()) else None
    arms = [a for a in policy.get("arms", ()) if a != version]
    return {**policy, "arms": arms} if arms else None


def canary_of(doc: dict) -> Canary:
    return Canary.from_state(msgspec.convert(doc["config"], CanaryConfig), doc["state"])


def canary_percent(doc: dict) -> float:
    canary = doc.get("canary")
    if not canary or canary["state"]["status"] != "running":
        return 0.0
    return float(canary_of(canary).weights().get(canary["config"]["variant"], 0.0) * 100)


def summary(w: VariantWindow) -> dict:
    """A variant's numbers for status and metrics (JSON-able)."""
    p50, p99 = (w.quantile(0.5), w.quantile(0.99)) if w.requests else (None, None)
    return {
        "requests": w.requests,
        "errors": w.errors,
        "error_rate": w.error_rate,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "rewards": w.reward_count,
        "reward_sum": w.reward_sum,
        "mean_reward": w.mean_reward,
        "shadow_compared": w.shadow_compared,
        "shadow_agreed": w.shadow_agreed,
        "shadow_abs_diff_sum": w.shadow_abs_diff_sum,
    }
