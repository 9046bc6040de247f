"""The loop controller: one Ray Serve replica per deployment with loops.

Serve restarts it when it dies; everything it knows is in the registry's
database (loop state, runs, events: registry/loop_store.py), so a new replica
resumes each unfinished run from its row. It drives the other parts through
their public faces: the training queue (flywheel.training), the registry
(gates, approvals, audit) and the endpoint's HTTP API with an API key of role
``operate`` that it makes for itself at start (the token lives only in this
process's memory; it is never logged and the audit log records only the key's
creation; a restarted controller revokes its predecessor's key).

Operators reach it through the ingress (``/v2/loops``) or the CLI
(``flywheel loops``), both of which only read the store and queue commands
(pause, resume, trigger) as loop events that the next tick applies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from flywheel.loops.spec import LoopSpec

log = logging.getLogger(__name__)
KEY_PREFIX = "loop-controller:"


class _Jobs:
    """The training runtime as a loop's runner needs it."""

    def __init__(self, runtime) -> None:
        self._rt = runtime

    def submit(self, spec: dict, *, run: bool = True):
        return self._rt.submit(spec, run=run)

    def resume(self, job_id: str, *, run: bool = True):
        return self._rt.resume(job_id, run=run)

    def job(self, job_id: str):
        self._rt.list_jobs()  # marks jobs whose runner died as failed, so that they can be resumed
        return self._rt.store.get(job_id)

    def find(self, name: str):
        return next((r for r in self._rt.store.list() if r.name == name), None)

    def cancel(self, job_id: str):
        return self._rt.attach(job_id).cancel()


class LoopController:
    """``loops``: the deployment's loop specs. ``registry_uri`` /
    ``artifacts_uri``: the deployment's registry. ``ingress_url``: the
    server's HTTP address (``{node}`` in it: this replica's node address, for
    a server bound to every interface). ``auth``: whether the server wants
    API keys. ``capture_of`` / ``model_of``: each endpoint's capture root
    ("" = none) and registry model name. ``template_of``: each endpoint's
    model config (a mapping), which a candidate variant is added with.
    ``home``: Flywheel's state folder (training jobs' folders). ``start``:
    run the tick thread (False in tests that tick by hand)."""

    def __init__(self, deployment: str, loops: list[LoopSpec], *, registry_uri: str, artifacts_uri: str,
                 ingress_url: str, auth: bool, capture_of: dict[str, str], model_of: dict[str, str],
                 template_of: dict[str, dict] | None = None, home: str = "", start: bool = True) -> None:
        from flywheel.common.settings import load_settings
        from flywheel.loops.endpoint_ops import HttpEndpointOps
        from flywheel.loops.evaluate import evaluate_on_heldout
        from flywheel.loops.metrics import LoopMetrics
        from flywheel.loops.notify import Notifier
        from flywheel.loops.runner import LoopRunner
        from flywheel.loops.signals import DeploymentSignals
        from flywheel.registry import LoopStore, Registry
        from flywheel.training import TrainingRuntime

        import msgspec

        self.deployment = deployment
        self._registry_uri = registry_uri
        self._closed = False
        self._store = LoopStore.open(registry_uri)
        self._registry = Registry.open(registry_uri, artifacts_uri)
        self._key_id, token = self._make_key(registry_uri) if auth else (None, None)
        if "{node}" in ingress_url:
            import ray

            ingress_url = ingress_url.replace("{node}", ray.util.get_node_ip_address())
        self._ops = HttpEndpointOps(ingress_url, api_key=token)
        settings = load_settings()
        settings = msgspec.structs.replace(settings, registry_uri=registry_uri, artifacts_uri=artifacts_uri,
                                           home=home or settings.home)
        self._training = TrainingRuntime(settings)
        self.metrics = LoopMetrics()
        signals = DeploymentSignals(self._ops, self._registry, model_of=model_of, capture_of=capture_of)
        self._notifiers = []
        self.runners = []
        for spec in loops:
            self.metrics.add_loop(spec.name)
            notifier = Notifier(list(spec.notify), source=f"{deployment}/{spec.name}", metrics=self.metrics) \
                if spec.notify else None
            if notifier is not None:
                self._notifiers.append(notifier)
            self.runners.append(LoopRunner(
                spec, deployment=deployment, store=self._store, registry=self._registry,
                jobs=_Jobs(self._training), endpoint=self._ops, signals=signals,
                evaluator=lambda m, c, p, job, run_id: evaluate_on_heldout(self._registry, m, c, p, job, run_id),
                notifier=notifier, metrics=self.metrics, capture_path=capture_of.get(spec.endpoint, ""),
                variant_template=(template_of or {}).get(spec.endpoint),
                data_root=os.path.join(os.path.abspath(settings.home), "loops", deployment),
            ))
            self.runners[-1].ensure_policy()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if any(r.phase == "training" for r in self._store.runs(deployment, unfinished=True)):
            # a predecessor's job may still wait in the queue: run the queue here
            self._training.start()
        if start:
            self._thread = threading.Thread(target=self._run, name="flywheel-loops", daemon=True)
            self._thread.start()

    def _make_key(self, uri: str) -> tuple[str, str]:
        from flywheel.registry.keys import KeyStore

        keys = KeyStore.open(uri)
        try:
            name = f"{KEY_PREFIX}{self.deployment}"
            for k in keys.list():
                if k.name == name:  # a predecessor's: it died with its process
                    keys.revoke(k.id, actor=name)
            key, token = keys.create(name, ["operate"], actor=name)
            return key.id, token
        finally:
            keys.close()

    # -- the thread ----------------------------------------------------------------
    def _run(self) -> None:
        from flywheel.protocol.errors import UnavailableError
        from flywheel.registry.db import OutageLog

        due = {r.spec.name: 0.0 for r in self.runners}
        outages = {r.spec.name: OutageLog(log, f"loop {r.spec.name}: ticking") for r in self.runners}
        while not self._stop.is_set():
            now = time.monotonic()
            for runner in self.runners:
                if now < due[runner.spec.name]:
                    continue
                due[runner.spec.name] = now + runner.spec.tick_s
                try:
                    runner.tick()
                    outages[runner.spec.name].ok()
                except UnavailableError as exc:  # the registry's database is away: the run's row waits for it
                    outages[runner.spec.name].failed(exc)
                except Exception:  # noqa: BLE001 - one loop's failure must not stop the others
                    log.exception("loop %s: tick failed", runner.spec.name)
            wait = min(due.values(), default=now + 1.0) - time.monotonic()
            self._stop.wait(max(0.05, wait))

    def tick_all(self) -> None:
        """One tick of every loop (tests that drive the controller by hand)."""
        for runner in self.runners:
            runner.tick()

    # -- faces ---------------------------------------------------------------------
    def check_health(self) -> None:
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("the loop controller's thread has stopped")

    def pid(self) -> int:
        """This replica's process id (operators and tests)."""
        import os

        return os.getpid()

    def metrics_text(self) -> bytes:
        return self.metrics.exposition()

    def describe(self) -> dict[str, Any]:
        return {"loops": [{"name": r.spec.name, "endpoint": r.spec.endpoint, "model": r.spec.model_name}
                          for r in self.runners]}

    def close(self) -> None:
        """Stop ticking, let the training runtime hand its job back, revoke
        the controller's API key. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for n in self._notifiers:
            n.close()
        self._training.close(timeout=10)
        self._ops.close()
        if self._key_id is not None:  # the key dies with the controller that holds its token
            from flywheel.registry.keys import KeyStore

            keys = KeyStore.open(self._registry_uri)
            try:
                keys.revoke(self._key_id, actor=f"{KEY_PREFIX}{self.deployment}")
            except Exception:  # noqa: BLE001 - a successor revokes it at its start
                log.warning("loop controller: revoking its API key failed", exc_info=True)
            finally:
                keys.close()
        self._store.close()
        self._registry.close()

    def __del__(self) -> None:
        # Ray Serve calls __del__ on a graceful shutdown
        if getattr(self, "_closed", True):
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.warning("loop controller: close failed", exc_info=True)
