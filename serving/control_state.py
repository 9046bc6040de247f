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
nothing that was accepted.

This module holds :class:`ControlState` itself: its construction (and resume
after a restart), persistence and versioned snapshots, replicas' reports and
feedback, status, and the tick. Its operations live beside it, one feature
each: policies, shadow, variants and swaps in
serving/_private/control_variants.py; canaries, promotion and rollback in
serving/_private/control_canary.py. The endpoint document itself, and the
pure functions over its policy and canary parts:
serving/_private/endpoint_state.py.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable

import msgspec

from flywheel.protocol.errors import InvalidInputError, NotFoundError
from flywheel.runtime.signature import Signature
from flywheel.serving._private.control_canary import CanaryOps
from flywheel.serving._private import signature_gate
from flywheel.serving._private.control_variants import VariantOps
from flywheel.serving._private.endpoint_state import Endpoint, canary_percent, summary
from flywheel.serving._private.live_endpoint import ID_TTL_S, check_reward
from flywheel.serving.canary import VariantWindow
from flywheel.serving.config import EndpointConfig, ModelConfig

LIVE_S = 5.0  # a replica that has not reported for this long is gone
MAX_IDS = 200_000  # request ids kept for feedback (ingress replicas keep their own)
PERSIST_EVERY_S = 2.0  # statistics are saved at most this often; decisions at once
STATS_EVERY_S = 1.0  # statistics (bandit arms, totals) are announced at most this often


class Replica:
    """What the controller knows of one ingress replica, from its reports."""

    __slots__ = ("applied", "seen", "loaded", "inflight", "seq")

    def __init__(self) -> None:
        self.seq = 0  # the last report batch folded in (a batch sent again is skipped)
        self.applied = 0
        self.seen = 0.0
        self.loaded: dict[str, dict[str, str]] = {}
        self.inflight: dict[str, dict[str, int]] = {}


class ControlState(VariantOps, CanaryOps):
    """Every endpoint of one deployment. Not thread-safe: the controller
    calls it from one thread (its event loop). The management operations
    come from :class:`VariantOps` (policy, shadow, variants, swaps) and
    :class:`CanaryOps` (canaries, promotion, rollback)."""

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
        gate_checker=None,
        alias_restorer=None,
        drift_monitor: bool = False,
        now: float | None = None,
    ) -> None:
        """``models``: the deployment's configured models (loaded by every
        ingress replica); ``endpoints``: their routing settings (a name with
        no entry gets the defaults). ``store``: a RouterStateStore; saved
        state of the same ``deploy_id`` (a restart of this controller) is
        resumed, anything older is replaced. ``alias_mover(name, alias,
        version)`` moves a registry alias on promotion (raising, and then
        nothing moves, when the registry refuses it), ``gate_checker(name,
        alias, version)`` lists what would stop that move (checked before a
        canary starts), ``alias_restorer(name, alias, version)`` puts the
        alias back after a rollback without gates (default: alias_mover),
        and ``resolver(ref)`` pins a registry reference to ``name/N`` (None:
        no registry).
        ``drift_monitor``: the deployment has one, so canaries of variants
        with drift monitoring may gate on drift (the caller feeds the
        scores: :meth:`drift_wanted`, :meth:`set_drift`)."""
        now = time.time() if now is None else now
        self.deployment = deployment
        self.deploy_id = deploy_id
        self._store = store
        self._move_alias = alias_mover
        self._check_gates = gate_checker
        self._restore_alias = alias_restorer
        self._resolve = resolver
        self._drift_monitor = drift_monitor
        self._drift: dict[tuple[str, str], float | None] = {}  # (endpoint, variant) -> the step's score
        self.version = 1
        # A restarted controller counts versions from 1 again: replicas that
        # applied a higher version before would wait for it; a new epoch
        # tells them to take the next snapshot whatever its number.
        self.epoch = uuid.uuid4().hex[:12]
        self._replicas: dict[str, Replica] = {}
        self._ids: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._persisted_at = 0.0
        self._stats_changed = False  # windows or rewards arrived since the last announcement
        self._unannounced = False  # a decision not saved yet, so not announced yet
        self._announced_at = 0.0
        models = list(models)
        # what the ingress replicas were given: variants added at run time
        # load into them, so they can use no more GPU than this
        self.ingress_gpus = max((m.gpus() for m in models if m.placement == "colocated"), default=0.0)
        by_name: dict[str, list[ModelConfig]] = {}
        for m in models:
            by_name.setdefault(m.name, []).append(m)
        configs = {e.name: e for e in endpoints}
        self.endpoint_configs = configs  # a runtime variant inherits its endpoint's capture
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
        """A routing decision changed: persist, then announce (new version).
        One that cannot be saved (the database is away: persist raises) is
        announced by the first tick that saves it."""
        for ep in self.endpoints.values():
            ep.dirty = True
        self._unannounced = True
        self.persist(now, force=True)
        self._announce(now)

    def _announce(self, now: float) -> None:
        self._unannounced = False
        self.version += 1
        self._announced_at = now

    def endpoint(self, name: str) -> Endpoint:
        ep = self.endpoints.get(name)
        if ep is None:
            raise NotFoundError(f"unknown endpoint {name!r}; endpoints: {sorted(self.endpoints)}")
        return ep

    # -- replicas -----------------------------------------------------------
    def live_replicas(self, now: float) -> dict[str, Replica]:
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
        rep = self._replicas.setdefault(report["replica"], Replica())
        rep.seen = now
        same_epoch = report.get("epoch") == self.epoch
        rep.applied = report.get("applied", 0) if same_epoch else 0
        rep.loaded = report.get("loaded", {})
        self._signatures(report.get("signatures"))
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

    def _signatures(self, reported) -> None:
        """Keep the signatures a replica reports for the variants it loaded
        (V2 metadata of each), which the signature checks judge by."""
        if not isinstance(reported, dict):
            return
        for name, versions in reported.items():
            ep = self.endpoints.get(name)
            if ep is None or not isinstance(versions, dict):
                continue
            for version, doc in versions.items():
                if version in ep.variants:
                    signature_gate.record(ep, version, doc)

    def unknown_signatures(self, name: str) -> list[tuple[str, dict]]:
        """(version, model config document) of the ready variants of endpoint
        ``name`` whose signature no replica has reported yet."""
        ep = self.endpoint(name)
        known = ep.doc.get("signatures", {})
        return [(v, ep.doc["models"][v]) for v, s in ep.variants.items()
                if s["status"] == "ready" and v not in known and ep.doc["models"].get(v)]

    def learn_signatures(self, name: str, found: dict[str, Signature]) -> None:
        """Signatures read from the variants' artifacts; a replica's report,
        from the loaded model, wins over them (now and later)."""
        ep = self.endpoint(name)
        for version, sig in found.items():
            if version in ep.variants and version not in ep.doc.get("signatures", {}):
                signature_gate.record(ep, version, msgspec.to_builtins(sig))

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
                "canary_outcomes": doc.get("canary_outcomes", {}),
            }
        return {"version": self.version, "epoch": self.epoch, "deploy_id": self.deploy_id, "endpoints": out}

    # -- status -------------------------------------------------------------
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
            "failed": doc.get("failed", {}),  # variants dropped because they did not load, and why
            "sticky": doc["sticky"],
            "events": doc["events"][-20:],
            "replicas": len(self.live_replicas(now)),
        }

    # -- feedback -----------------------------------------------------------
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
        self.persist(now, force=self._unannounced)
        if self._unannounced:
            self._announce(now)
