"""An ingress replica's side of the router controller: report, then apply.

About twice a second the replica tells the controller what it loaded, how
each variant did since the last report, the rewards it took and (when there
are several ingress replicas) which request went where; the answer is the
controller's snapshot when it changed. Applying a snapshot loads new
variants (in a worker thread, warmed up, before they can take a request),
re-points each endpoint's choice, and closes variants that were removed once
their accepted requests have finished.

The controller being away (restarting) changes nothing for requests: the
replica routes by its last snapshot and keeps what it owes for the next
report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from flywheel.serving.config import ModelConfig
from flywheel.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.5
MAX_PENDING = 120  # report batches kept while the controller is away (a minute)
FIRST_SYNC_TIMEOUT_S = 60.0


class EndpointSync:
    """``call(report) -> answer`` is blocking (a Ray call) and runs in a
    worker thread; ``load(model_config) -> ModelServer`` too (it loads and
    warms the model). Everything else runs on the ingress loop."""

    def __init__(self, router, replica_id: str, call: Callable[[dict], dict],
                 load: Callable[[ModelConfig], object], deploy_id: str = "") -> None:
        """``deploy_id``: the generation of the deployment this replica was
        built for, sent with every report: a controller of another
        generation answers it without a snapshot ("" = any generation)."""
        self._router = router
        self._id = replica_id
        self._deploy_id = deploy_id
        self._call = call
        self._load = load
        self.applied = 0
        self._snapshot: dict = {}
        self._servers: dict[tuple[str, str], object] = {}  # variants this replica loaded at run time
        self._status: dict[str, dict[str, str]] = {}
        self._loading: dict[tuple[str, str], asyncio.Task] = {}
        self._epoch = ""  # the controller's; a new one (it restarted) means: take its snapshot
        self._seq = 0
        self._pending: list[dict] = []  # report batches not yet acknowledged (sent again, deduplicated by seq)
        # (name, version) whose signature this controller epoch has taken
        self._signatures_taken: set[tuple[str, str]] = set()
        self._task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None  # made on the loop (STYLE 7)

    async def first(self) -> None:
        """Before the ports open: get a snapshot and load its variants, so
        that a replica started mid-swap serves what the others serve."""
        deadline = time.monotonic() + FIRST_SYNC_TIMEOUT_S
        while True:
            try:
                answer = await self._exchange()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    log.error("router controller unreachable (%s); routing by the deployment's config", exc)
                    return
                await asyncio.sleep(0.5)
        if "endpoints" in answer:
            await self._apply(answer, wait_loads=True)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the controller restarts: route on, report later
                log.warning("router controller sync failed: %s", exc)
            for ep in self._router.endpoints():
                ep.expire()

    async def refresh(self) -> None:
        """Report now and apply the answer (also right after a management
        call, so that this replica routes by the change before answering)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            answer = await self._exchange()
            fresh = answer.get("epoch") != self._epoch or answer.get("version", 0) > self.applied
            if fresh and "endpoints" in answer:
                try:
                    await self._apply(answer, wait_loads=False)
                except Exception:  # a bad snapshot must not stop the reports
                    log.exception("applying the router snapshot failed")

    async def _exchange(self) -> dict:
        report = self._report()
        answer = await asyncio.get_running_loop().run_in_executor(None, self._call, report)
        self._pending = []  # taken (a failure above keeps them for the next report)
        if answer.get("epoch", self._epoch) != self._epoch:
            # another controller (restarted): it may not have kept them
            self._signatures_taken.clear()
        else:
            self._signatures_taken.update(
                (name, version) for name, versions in report["signatures"].items() for version in versions
            )
        return answer

    def _report(self) -> dict:
        windows, rewards, ids, used, inflight = {}, {}, [], [], {}
        for ep in self._router.endpoints():
            w, r, i, u = ep.take_report()
            if w:
                windows[ep.name] = w
            if r:
                rewards[ep.name] = r
            ids += i
            used += u
        for m in self._router.models():
            if m.inflight:
                inflight.setdefault(m.route.name, {})[m.route.version] = m.inflight
        if windows or rewards or ids or used:
            self._seq += 1
            self._pending.append({"seq": self._seq, "windows": windows, "rewards": rewards,
                                  "ids": ids, "used_ids": used})
            # a controller away for long: keep the newest batches only
            del self._pending[:-MAX_PENDING]
        return {
            "replica": self._id, "deploy": self._deploy_id, "epoch": self._epoch,
            "applied": self.applied, "loaded": self._loaded(), "signatures": self._signatures(),
            "inflight": inflight, "batches": list(self._pending),
        }

    def _signatures(self) -> dict[str, dict[str, dict]]:
        """The signatures (inputs and outputs of the V2 metadata) of loaded
        models the controller has not taken yet: it judges a new variant by
        them before the variant can take traffic."""
        out: dict[str, dict[str, dict]] = {}
        for m in self._router.models():
            key = (m.route.name, m.route.version)
            if key in self._signatures_taken:
                continue
            meta = m.metadata
            if meta is None and m.route.local:  # not probed yet, but loaded here
                meta = msgspec.json.decode(m.channel.server.metadata)
            if meta:
                out.setdefault(key[0], {})[key[1]] = {"inputs": meta.get("inputs", []), "outputs": meta.get("outputs", [])}
        return out

    def _loaded(self) -> dict[str, dict[str, str]]:
        out = {name: dict(s) for name, s in self._status.items()}
        for m in self._router.models():
            out.setdefault(m.route.name, {}).setdefault(m.route.version, "ready")
        return out

    async def _apply(self, answer: dict, *, wait_loads: bool) -> None:
        loads = []
        for name, snap in answer["endpoints"].items():
            wanted = snap["variants"]
            for version, model in wanted.items():
                key = (name, version)
                if version in self._router.loaded(name) or key in self._loading or model is None:
                    continue
                if self._status.get(name, {}).get(version, "").startswith("failed"):
                    continue  # reported; the controller drops the variant
                self._status.setdefault(name, {})[version] = "loading"
                task = asyncio.get_running_loop().create_task(self._load_variant(name, version, model))
                self._loading[key] = task
                loads.append(task)
            for version in self._router.loaded(name) - set(wanted):
                await self._unload(name, version)
            for version in [v for v in self._status.get(name, {}) if v not in wanted]:
                del self._status[name][version]
        if wait_loads and loads:
            await asyncio.gather(*loads)
        for name, snap in answer["endpoints"].items():
            try:
                self._router.endpoint(name).configure(snap, self._router.loaded(name))
            except Exception:
                log.exception("endpoint %s: snapshot not applied", name)
        self._snapshot = answer
        self.applied = answer["version"]
        self._epoch = answer.get("epoch", "")

    async def _load_variant(self, name: str, version: str, model: dict) -> None:
        try:
            cfg = msgspec.convert(model, ModelConfig)
            server = await asyncio.get_running_loop().run_in_executor(None, self._load, cfg)
            await server.start()
        except Exception as exc:
            log.warning("variant %s:%s failed to load: %s", name, version, exc)
            self._status.setdefault(name, {})[version] = f"failed: {getattr(exc, 'message', None) or exc}"
            return
        finally:
            self._loading.pop((name, version), None)
        stats = ServingMetrics([(name, version)]).for_model(name, version)  # this process's numbers
        self._servers[(name, version)] = server
        self._router.add_local(name, version, server, stats)
        self._status.setdefault(name, {})[version] = "ready"
        snap = self._snapshot.get("endpoints", {}).get(name)
        if snap is not None and version in snap["routable"]:
            # the others had it ready already (this replica lagged): route to it now
            try:
                self._router.endpoint(name).configure(snap, self._router.loaded(name))
            except Exception:
                log.exception("endpoint %s: snapshot not applied", name)

    async def _unload(self, name: str, version: str) -> None:
        model = self._router.remove(name, version)
        self._status.get(name, {}).pop(version, None)
        self._signatures_taken.discard((name, version))  # a later variant of that version may differ
        server = self._servers.pop((name, version), None)
        if server is None and model is not None and model.route.local:
            server = getattr(model.channel, "server", None)
        if server is not None:
            # requests it accepted finish first (ModelServer.close drains)
            asyncio.get_running_loop().create_task(server.close())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._loading.values()):
            task.cancel()
        for server in self._servers.values():
            await server.close()

