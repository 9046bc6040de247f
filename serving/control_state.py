"""What the router controller decides: endpoints, policies, canaries, swaps.

Pure Python (no Ray, no sockets), so it is testable alone: the Serve
deployment in serving/controller.py only feeds it ingress replicas' reports
and management calls, ticks it, and hands back its snapshots.

The split of work: every ingress replica routes each request by itself from
its last *snapshot* (variants, weights or a bandit's arm statistics, shadow,
sticky key); it reports back, about twice a second, what it loaded, how each
variant did (a mergeable window of requests, errors, latency, rewards, shadow
comparisons), and which requests it routed where (for feedback). Here those
reports are summed, canaries are judged, swaps are moved through their
phases, and every change is persisted (registry/router_state.py) before the
next snapshot announces it, so that losing a replica, or this process, loses
nothing that was accepted. The endpoint document itself, and the pure
functions over its policy and canary parts: serving/_private/endpoint_state.py.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import msgspec

from flywheel.protocol.errors import AlreadyExistsError, ConfigError, InvalidInputError, NotFoundError
from flywheel.protocol.errors import PreconditionFailedError
from flywheel.serving._private.live_endpoint import ID_TTL_S, check_reward
from flywheel.serving._private.endpoint_state import (
    Endpoint,
    as_doc,
    canary_of,
    canary_percent,
    newest,
    routes_to,
    summary,
    with_arms,
    without,
)
from flywheel.serving.canary import Canary, CanaryConfig, VariantWindow
from flywheel.serving.config import EndpointConfig, ModelConfig
from flywheel.serving.policies import make_policy
from flywheel.serving.policy_config import FixedPolicy, decode_policy
from flywheel.serving.router import version_key
from flywheel.serving.shadow import ShadowConfig

LIVE_S = 5.0  # a replica that has not reported for this long is gone
LOAD_TIMEOUT_S = 300.0  # a variant still loading after this long has failed
DRAIN_TIMEOUT_S = 30.0  # a retiring variant is removed after this even if busy
MAX_IDS = 200_000  # request ids kept for feedback (ingress replicas keep their own)
PERSIST_EVERY_S = 2.0  # statistics are saved at most this often; decisions at once
STATS_EVERY_S = 1.0  # statistics (bandit arms, totals) are announced at most this often


class _Replica:
    __slots__ = ("applied", "seen", "loaded", "inflight", "seq")

    def __init__(self) -> None:
        self.seq = 0  # the last report batch folded in (a batch sent again is skipped)
        self.applied = 0
        self.seen = 0.0
        self.loaded: dict[str, dict[str, str]] = {}
        self.inflight: dict[str, dict[str, int]] = {}


class ControlState:
    """Every endpoint of one deployment. Not thread-safe: the controller
    calls it from one thread (its event loop)."""

    def __init__(
        self,
        deployment: str,
        deploy_id: str,
        endpoints: Iterable[EndpointConfig],
        models: Iterable[ModelConfig],
        store=None,
        *,
        alias_mover=None,
        resolver=None,
        drift_monitor: bool = False,
        now: float | None = None,
    ) -> None:
        """``models``: the deployment's configured models (loaded by every
        ingress replica); ``endpoints``: their routing settings (a name with
        no entry gets the defaults). ``store``: a RouterStateStore; saved
        state of the same ``deploy_id`` (a restart of this controller) is
        resumed, anything older is replaced. ``alias_mover(name, alias,
        version)`` moves a registry alias on promotion and ``resolver(ref)``
        pins a registry reference to ``name/N`` (None: no registry).
        ``drift_monitor``: the deployment has one, so canaries of variants
        with drift monitoring may gate on drift (the caller feeds the
        scores: :meth:`drift_wanted`, :meth:`set_drift`)."""
        now = time.time() if now is None else now
        self.deployment = deployment
        self.deploy_id = deploy_id
        self._store = store
        self._move_alias = alias_mover
        self._resolve = resolver
        self._drift_monitor = drift_monitor
        self._drift: dict[tuple[str, str], float | None] = {}  # (endpoint, variant) -> the step's score
        self.version = 1
        # A restarted controller counts versions from 1 again: replicas that
        # applied a higher version before would wait for it; a new epoch
        # tells them to take the next snapshot whatever its number.
        self.epoch = uuid.uuid4().hex[:12]
        self._replicas: dict[str, _Replica] = {}
        self._ids: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._persisted_at = 0.0
        self._stats_changed = False  # windows or rewards arrived since the last announcement
        self._announced_at = 0.0
        by_name: dict[str, list[ModelConfig]] = {}
        for m in models:
            by_name.setdefault(m.name, []).append(m)
        configs = {e.name: e for e in endpoints}
        unknown = sorted(set(configs) - set(by_name))
        if unknown:
            raise InvalidInputError(f"endpoints {unknown} name no configured model; models: {sorted(by_name)}")
        saved = store.load(deployment) if store is not None else {}
        self.endpoints: dict[str, Endpoint] = {}
        for name, static in by_name.items():
            doc = saved.get(name)
            if doc is not None and doc.get("deploy_id") == deploy_id:
                ep = Endpoint(doc)
                for info in ep.doc["retiring"].values():  # versions count from 1 again
                    info["after"] = self.version + 1
                canary = ep.doc["canary"]
                if canary and canary["state"]["status"] == "running":
                    # its step windows were in memory: the step starts over
                    canary["state"]["step_started_at"] = now
                ep.event(now, "resumed", "state restored after a controller restart")
            else:
                ep = Endpoint.fresh(configs.get(name, EndpointConfig(name=name)), static)
                ep.doc["deploy_id"] = deploy_id
            self.endpoints[name] = ep
        if store is not None:
            for name in set(saved) - set(by_name):
                store.delete(deployment, name)
        self.persist(now, force=True)

    # -- persistence --------------------------------------------------------
    def persist(self, now: float, *, force: bool = False) -> None:
        """Save changed endpoints. Decisions call this with force=True before
        they are announced; statistics ride along at most every few seconds."""
        if self._store is None:
            return
        if not force and now - self._persisted_at < PERSIST_EVERY_S:
            return
        for ep in self.endpoints.values():
            if ep.dirty or force:
                ep.doc["totals"] = {v: w.to_wire() for v, w in ep.totals.items()}
                self._store.save(self.deployment, ep.name, ep.doc)
                ep.dirty = False
        self._persisted_at = now

    def _changed(self, now: float) -> None:
        """A routing decision changed: persist, then announce (new version)."""
        for ep in self.endpoints.values():
            ep.dirty = True
        self.persist(now, force=True)
        self.version += 1
        self._announced_at = now

    def endpoint(self, name: str) -> Endpoint:
        ep = self.endpoints.get(name)
        if ep is None:
            raise NotFoundError(f"unknown endpoint {name!r}; endpoints: {sorted(self.endpoints)}")
        return ep

    # -- replicas -----------------------------------------------------------
    def live_replicas(self, now: float) -> dict[str, _Replica]:
        return {rid: r for rid, r in self._replicas.items() if now - r.seen <= LIVE_S}

    def sync(self, report: dict, now: float | None = None) -> dict:
        """Fold in one ingress replica's report; answer the snapshot when the
        replica's is older than ours (or from another epoch), else just our
        version. Never raises for a bad part of a report: that part is left
        out and an event says why (a report that failed would be sent again,
        and fail again, forever)."""
        now = time.time() if now is None else now
        theirs = report.get("deploy")
        if theirs and theirs != self.deploy_id:
            # a replica of another generation of this deployment (Serve
            # replaces the replicas of an updated application one by one):
            # it routes by its own config until it goes, and its figures
            # are not this generation's
            return {"deploy_id": self.deploy_id}
        rep = self._replicas.setdefault(report["replica"], _Replica())
        rep.seen = now
        same_epoch = report.get("epoch") == self.epoch
        rep.applied = report.get("applied", 0) if same_epoch else 0
        rep.loaded = report.get("loaded", {})
        rep.inflight = report.get("inflight", {})
        for batch in report.get("batches", ()):
            # a batch whose answer was lost (a timeout after we took it)
            # comes again: take each sequence number once
            if batch.get("seq", 0) <= rep.seq:
                continue
            rep.seq = batch["seq"]
            self._fold(batch, now)
        for rid in [r for r, rep2 in self._replicas.items() if now - rep2.seen > 10 * LIVE_S]:
            del self._replicas[rid]
        if same_epoch and rep.applied >= self.version:
            return {"version": self.version, "epoch": self.epoch, "deploy_id": self.deploy_id}
        return self.snapshot()

    def _fold(self, batch: dict, now: float) -> None:
        for name, windows in batch.get("windows", {}).items():
            ep = self.endpoints.get(name)
            if ep is None:
                continue
            for variant, wire in windows.items():
                if variant not in ep.variants:
                    continue  # late answers of a removed variant
                try:
                    w = VariantWindow.from_wire(wire)
                except InvalidInputError as exc:
                    ep.event(now, "report", f"window of {variant} left out: {exc.message}")
                    continue
                ep.window(variant).merge(w)
                ep.step_window(variant).merge(w)
                ep.dirty = self._stats_changed = True
        for name, arms in batch.get("rewards", {}).items():
            ep = self.endpoints.get(name)
            if ep is not None:
                self._add_rewards(ep, arms)
        for rid, name, variant in batch.get("ids", ()):
            self._remember(rid, name, variant, now)
        for rid, name in batch.get("used_ids", ()):  # rewarded on the replica that answered
            self._ids.pop((name, rid), None)

    def _add_rewards(self, ep: Endpoint, arms: dict[str, list[float]]) -> None:
        """Fold a replica's rewards into the bandit's arms (the totals and the
        canary's windows get them with the replica's windows)."""
        try:
            policy = ep.policy() if ep.doc["policy"]["kind"] != "fixed" else None
        except Exception as exc:  # a policy that cannot be built takes no rewards
            ep.event(time.time(), "feedback", f"rewards left out: {exc}")
            return
        for variant, (count, total, total_sq) in arms.items():
            if policy is not None and variant in policy.variants:
                try:
                    policy.add_stats(variant, int(count), float(total), float(total_sq))
                except InvalidInputError as exc:
                    # taken under another policy (rewards out of this one's
                    # range): keep the report flowing, say why they were left out
                    ep.event(time.time(), "feedback", f"rewards for {variant} left out: {exc.message}")
        if policy is not None:
            ep.doc["policy_state"] = policy.state()
        ep.dirty = self._stats_changed = True

    def _remember(self, rid: str, name: str, variant: str, now: float) -> None:
        key = (name, rid)
        self._ids[key] = (variant, now)
        self._ids.move_to_end(key)
        while len(self._ids) > MAX_IDS:
            self._ids.popitem(last=False)

    def snapshot(self) -> dict:
        """What every ingress replica routes by."""
        out = {}
        for name, ep in self.endpoints.items():
            doc = ep.doc
            weights = ep.weights()
            out[name] = {
                "variants": {v: s["model"] for v, s in ep.variants.items()},
                "routable": ep.routable(),
                "weights": weights,
                "policy": doc["policy"] if weights is None else None,
                "policy_state": doc["policy_state"] if weights is None else None,
                "shadow": doc["shadow"] if doc["shadow"] and doc["shadow"]["variant"] in ep.routable() else None,
                "sticky": doc["sticky"],
                "totals": {v: summary(w) for v, w in ep.totals.items()},
                "canary_step": canary_percent(doc),
            }
        return {"version": self.version, "epoch": self.epoch, "deploy_id": self.deploy_id, "endpoints": out}

    # -- management ---------------------------------------------------------
    def status(self, name: str | None = None, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        if name is None:
            return {"endpoints": [self.status(n, now) for n in sorted(self.endpoints)]}
        ep = self.endpoint(name)
        doc = ep.doc
        policy = None
        if doc["policy"]["kind"] != "fixed":
            policy = ep.policy()
        weights = ep.weights()
        return {
            "name": name,
            "version": self.version,
            "variants": {
                v: {
                    "status": "retiring" if v in doc["retiring"] else s["status"],
                    "error": s["error"],
                    "ref": (doc["models"].get(v) or {}).get("ref", ""),
                    **(summary(ep.totals.get(v) or VariantWindow())),
                }
                for v, s in ep.variants.items()
            },
            "weights": weights if weights is not None else policy.weights(),
            "policy": doc["policy"],
            "bandit": policy.state() if policy is not None else None,
            "shadow": doc["shadow"],
            "canary": ({"config": doc["canary"]["config"], **doc["canary"]["state"]} if doc["canary"] else None),
            "swap": doc["swap"],
            "sticky": doc["sticky"],
            "events": doc["events"][-20:],
            "replicas": len(self.live_replicas(now)),
        }

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

    def add_variant(self, name: str, model: Any, now: float | None = None) -> dict:
        """Ask every ingress replica to load (and warm) a new variant; it takes
        no traffic until every live replica has it ready."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        cfg = self._pinned(_model_config(name, model))
        if cfg.version in ep.variants:
            raise AlreadyExistsError(f"endpoint {name!r} already has variant {cfg.version!r}")
        ep.variants[cfg.version] = {"model": as_doc(cfg), "status": "loading", "error": "", "since": now}
        ep.doc["models"][cfg.version] = as_doc(cfg)
        ep.event(now, "variant", f"loading variant {cfg.version}")
        self._changed(now)
        return self.status(name, now)

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

    def swap(self, name: str, model: Any, now: float | None = None) -> dict:
        """Replace what serves ``name``: load and warm the new variant on
        every replica, move all traffic to it, drain and remove the old ones."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        self._busy(ep, "swap")
        cfg = self._pinned(_model_config(name, model))
        old = ep.routable()
        if cfg.version in ep.variants:
            raise AlreadyExistsError(
                f"endpoint {name!r} already has variant {cfg.version!r}; give the new one another version"
            )
        ep.variants[cfg.version] = {"model": as_doc(cfg), "status": "loading", "error": "", "since": now}
        ep.doc["models"][cfg.version] = as_doc(cfg)
        ep.doc["swap"] = {"from": old, "to": cfg.version, "phase": "loading", "error": "", "started": now}
        ep.event(now, "swap", f"swap {old} -> {cfg.version}: loading")
        self._changed(now)
        return self.status(name, now)

    def start_canary(self, name: str, config: Any, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        self._busy(ep, "start a canary")
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
        canary = Canary(cfg, now)
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
                    self._alias(ep, baseline, now)
                elif ep.doc["alias"] and self._move_alias is not None:
                    ep.event(now, "alias", f"{ep.doc['alias']!r} stays where the promotion put it: "
                                           f"baseline {baseline} has no registry reference")
            self._changed(now)
            return self.status(name, now)
        raise PreconditionFailedError(f"endpoint {name!r} has no canary to roll back")

    def promote(self, name: str, version: str, now: float | None = None) -> dict:
        """All traffic to ``version``; move the registry alias; retire the rest."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        if version not in ep.routable():
            raise InvalidInputError(f"version {version!r} is not a ready variant of {name!r}; ready: {ep.routable()}")
        swap = ep.doc["swap"]
        if swap and swap["phase"] in ("loading", "draining"):
            raise PreconditionFailedError(f"cannot promote: endpoint {name!r} is swapping")
        doc = ep.doc["canary"]
        if doc and doc["state"]["status"] == "running":
            canary = canary_of(doc)
            canary.abort(now, f"promoted {version} by an operator")
            doc["state"] = canary.state()
            doc["state"]["status"] = "promoted" if version == doc["config"]["variant"] else "aborted"
        self._promote(ep, version, now, f"promoted {version} by an operator")
        return self.status(name, now)

    def _promote(self, ep: Endpoint, version: str, now: float, why: str) -> None:
        ep.doc["policy"] = {"kind": "fixed", "weights": {version: 1.0}}
        for v in ep.routable():
            if v != version:
                self._retire(ep, v, now)
        ep.event(now, "promote", why)
        self._alias(ep, version, now)
        self._changed(now)

    def _alias(self, ep: Endpoint, version: str, now: float) -> None:
        model = ep.doc["models"].get(version) or {}
        ref = model.get("ref", "")
        if self._move_alias is None or not ref or not ep.doc["alias"]:
            return
        try:
            registry_version = int(ref.split("/", 1)[1])
            self._move_alias(ref.split("/", 1)[0], ep.doc["alias"], registry_version)
            ep.event(now, "alias", f"{ref.split('/', 1)[0]}@{ep.doc['alias']} -> {ref}")
        except Exception as exc:  # the traffic move stands; say why the alias did not
            ep.event(now, "alias", f"could not move {ep.doc['alias']!r} to {ref}: {exc}")

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

    def feedback(self, name: str, request_id: str, reward: float, now: float | None = None) -> dict:
        """A reward for a request some replica routed and reported (replicas
        answer feedback for their own requests themselves)."""
        now = time.time() if now is None else now
        ep = self.endpoint(name)
        reward = check_reward(reward)
        hit = self._ids.get((name, request_id))
        if hit is None or now - hit[1] > ID_TTL_S:
            self._ids.pop((name, request_id), None)
            raise NotFoundError(
                f"request id {request_id!r} is unknown to endpoint {name!r} or has expired "
                f"(ids are kept {ID_TTL_S:.0f} s)"
            )
        variant = hit[0]
        self._reward(ep, variant, float(reward))  # validates first: a bad reward leaves the id usable
        del self._ids[(name, request_id)]
        return {"id": request_id, "variant": variant, "accepted": True}

    def _reward(self, ep: Endpoint, variant: str, reward: float) -> None:
        if ep.doc["policy"]["kind"] != "fixed":
            policy = ep.policy()
            if variant in policy.variants:
                policy.record(variant, reward)  # InvalidInputError for a reward out of its range
                ep.doc["policy_state"] = policy.state()
        w = VariantWindow()
        w.add_reward(reward)
        ep.window(variant).merge(w)
        ep.step_window(variant).merge(w)
        ep.dirty = self._stats_changed = True

    # -- time ---------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Move loads, swaps, canaries and drains along; persist."""
        now = time.time() if now is None else now
        live = self.live_replicas(now)
        for ep in self.endpoints.values():
            self._tick_loading(ep, live, now)
            self._tick_swap(ep, live, now)
            self._tick_canary(ep, now)
            self._tick_retiring(ep, live, now)
        if self._stats_changed and now - self._announced_at >= STATS_EVERY_S:
            # new totals and bandit arms reach the replicas with the next
            # snapshot (they route by the arms; /metrics shows the totals)
            self._stats_changed = False
            self.version += 1
        self.persist(now)

    def _tick_loading(self, ep: Endpoint, live: dict[str, _Replica], now: float) -> None:
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
                state["status"] = "ready"
                ep.event(now, "variant", f"variant {version} ready on {len(reports)} replica(s)")
                self._changed(now)

    def _load_failed(self, ep: Endpoint, version: str, error: str, now: float) -> None:
        ep.doc["policy"] = without(ep.doc["policy"], version) or ep.doc["policy"]  # a version re-added later is no arm
        del ep.variants[version]
        ep.doc["models"].pop(version, None)
        ep.doc.setdefault("failed", {})[version] = error
        swap = ep.doc["swap"]
        if swap and swap["to"] == version and swap["phase"] == "loading":
            swap.update(phase="failed", error=error)
            ep.event(now, "swap", f"swap to {version} failed, {swap['from']} keeps serving: {error}")
        else:
            ep.event(now, "variant", f"variant {version} failed to load: {error}")
        self._changed(now)

    def _tick_swap(self, ep: Endpoint, live: dict[str, _Replica], now: float) -> None:
        swap = ep.doc["swap"]
        if not swap:
            return
        if swap["phase"] == "loading" and ep.variants.get(swap["to"], {}).get("status") == "ready":
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

    def _tick_canary(self, ep: Endpoint, now: float) -> None:
        doc = ep.doc["canary"]
        if not doc or doc["state"]["status"] != "running":
            return
        cfg = msgspec.convert(doc["config"], CanaryConfig)
        canary = canary_of(doc)
        step = canary.step
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
            doc["state"] = canary.state()
            self._promote(ep, cfg.variant, now, f"canary {cfg.variant} passed every step")

    def _end_canary(self, ep: Endpoint, canary: Canary, now: float, why: str) -> None:
        doc = ep.doc["canary"]
        doc["state"] = canary.state()
        baseline = {"kind": "fixed", "weights": {doc["config"]["baseline"]: 1.0}}
        restored = without(doc.get("saved_policy") or baseline, doc["config"]["variant"])
        # the saved policy may name only variants that are gone by now
        ep.doc["policy"] = restored if restored is not None and routes_to(restored, ep.routable()) else baseline
        ep.event(now, "canary", why)
        self._changed(now)

    def _tick_retiring(self, ep: Endpoint, live: dict[str, _Replica], now: float) -> None:
        for version, info in list(ep.doc["retiring"].items()):
            applied = all(r.applied >= info["after"] for r in live.values())
            idle = all(r.inflight.get(ep.name, {}).get(version, 0) == 0 for r in live.values())
            if (applied and idle) or now - info["since"] > DRAIN_TIMEOUT_S:
                del ep.doc["retiring"][version]
                ep.variants.pop(version, None)
                ep.event(now, "variant", f"variant {version} removed (drained)")
                self._changed(now)


def _model_config(name: str, model: Any) -> ModelConfig:
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
