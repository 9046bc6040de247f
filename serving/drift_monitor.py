"""The live drift monitor: one Ray Serve replica per deployment.

Model replicas sample their inputs and ship them here asynchronously (see
``_private/drift_sampler.py``); predictions never wait for this. For each
model version the monitor keeps a detector per test, fitted once on the
version's training reference sample, and a bounded window buffer. Each full
window is scored on a worker thread; results become Prometheus gauges
(statistic, p-value, drift flag per model, version, feature and test), a short
history (``GET /v2/models/{name}/versions/{v}/drift`` through the ingress) and
drift events for registered callbacks (the retraining trigger hangs off these).

Tests are found by name in the kernels' registry, so every test a
``DriftDetector`` runs can be monitored. Samples arrive as float64 rows;
categorical tests (chi2, psi) read them as integer codes: a reference that is
not codes refuses the model at start (ConfigError naming model, version and
test), a window that is not is refused by that test alone (logged, counted in
``flywheel_drift_refused_windows``) while the other tests score it.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from flywheel.kernels import DriftDetector, DriftResult, WindowBuffer, get_test
from flywheel.protocol.errors import ConfigError, ErrorCode, FlywheelError, InvalidInputError, NotFoundError
from flywheel.serving._private.loop_thread import LoopThread
from flywheel.serving._private.wire import (
    OP_DRIFT_HISTORY,
    OP_DRIFT_INGEST,
    OP_DRIFT_TRACK,
    OP_METRICS,
    Call,
    Reply,
    check_secret,
    process_identity,
    start_frame_server,
)
from flywheel.serving.config import ModelConfig, RegistryConfig

log = logging.getLogger(__name__)
_HEAD = struct.Struct("<I")


class DriftEvent(msgspec.Struct, frozen=True):
    """A window in which at least one feature drifted."""

    model: str
    version: str
    test: str
    ts: float
    features: list[int]
    result: DriftResult


def encode_samples(model: str, version: str, rows: np.ndarray) -> bytes:
    """The ingest payload: u32 header length, JSON header, float64 rows."""
    rows = np.ascontiguousarray(rows, dtype="<f8")
    head = msgspec.json.encode({"model": model, "version": version, "shape": list(rows.shape)})
    return _HEAD.pack(len(head)) + head + rows.tobytes()


def decode_samples(payload: bytes) -> tuple[str, str, np.ndarray]:
    try:
        (hl,) = _HEAD.unpack_from(payload)
        head = msgspec.json.decode(payload[4 : 4 + hl])
        rows = np.frombuffer(payload, dtype="<f8", offset=4 + hl).reshape(head["shape"])
    except (struct.error, msgspec.DecodeError, KeyError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"malformed drift samples: {exc}") from None
    return head["model"], head["version"], rows


def load_reference(model: ModelConfig, registry: RegistryConfig | None) -> np.ndarray:
    """The training reference sample: ``drift.reference`` or the registry
    artifact ``reference.npy`` (verified; loaded without pickle)."""
    if model.drift.reference:
        return np.load(model.drift.reference, allow_pickle=False)
    if not model.ref or registry is None:
        raise ConfigError(f"model {model.name!r}: drift needs drift.reference or a registry ref with reference.npy")
    from flywheel.registry import Registry

    reg = Registry.open(registry.uri, registry.artifacts)
    try:
        data = reg.read_artifact(model.ref, "reference.npy")
    finally:
        reg.close()
    return np.load(io.BytesIO(data), allow_pickle=False)


def drift_score(history: list[dict], since: float) -> float | None:
    """See :meth:`DriftMonitor.drift_score` (``history``: its entries)."""
    shares = [sum(h["result"]["drift"]) / max(1, len(h["result"]["drift"])) for h in history if h["ts"] >= since]
    return max(shares) if shares else None


def fit_detector(model: ModelConfig, test: str, reference: np.ndarray) -> DriftDetector:
    """``test``'s detector fitted on ``reference``; a reference the test
    cannot read (e.g. values that are not integer codes for chi2 or psi) is a
    ConfigError naming the model, version and test. The monitor scores on
    the CPU (a GPU node's GPU belongs to its models): Numba kernels where the
    test has them, else its NumPy reference."""
    backend = "numba" if "numba" in get_test(test).backends else "numpy"
    try:
        return DriftDetector(test, backend=backend, alpha=model.drift.alpha, threads=1,
                             **model.drift.params.get(test, {})).fit(reference)
    except InvalidInputError as exc:
        raise ConfigError(
            f"model {model.name!r} version {model.version!r}: drift test {test!r} cannot use the reference "
            f"sample: {exc.message}"
        ) from None


class _Tracked:
    def __init__(self, model: ModelConfig, reference: np.ndarray) -> None:
        cfg = model.drift
        ref = reference.reshape(len(reference), -1)
        self.detectors = {t: fit_detector(model, t, ref) for t in cfg.tests}
        self.window = WindowBuffer(cfg.window, ref.shape[1], mode=cfg.mode, stride=cfg.stride or None)
        self.history: collections.deque = collections.deque(maxlen=cfg.history)
        self.features = ref.shape[1]


class DriftMonitor:
    """Serve deployment class (also usable in-process, e.g. in tests)."""

    def __init__(self, port: int, models: list[ModelConfig], registry: RegistryConfig | None = None,
                 *, secret: bytes) -> None:
        """``secret``: the deployment's; every connection (the model
        replicas' samples, the ingress's history and metrics calls) proves
        it before a frame is read, so that nobody else can feed the drift
        gate of a canary."""
        check_secret(secret, required=True)
        self._secret = secret
        self._tracked = {(m.name, m.version): _Tracked(m, load_reference(m, registry)) for m in models}
        self._registry_config = registry
        self._callbacks: list[Callable[[DriftEvent], None]] = []
        self._registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version", "feature", "test"]
        self._stat = Gauge("flywheel_drift_statistic", "Drift statistic of the last window", labels,
                           registry=self._registry)
        self._p = Gauge("flywheel_drift_p_value", "Corrected p-value of the last window", labels,
                        registry=self._registry)
        self._flag = Gauge("flywheel_drift_detected", "1 when the last window drifted", labels,
                           registry=self._registry)
        self._windows = Counter("flywheel_drift_windows", "Windows scored", ["model", "version", "test"],
                                registry=self._registry)
        self._rows = Counter("flywheel_drift_sampled_rows", "Sampled input rows received", ["model", "version"],
                             registry=self._registry)
        self._refused = Counter("flywheel_drift_refused_windows",
                                "Windows a test could not read (e.g. not integer codes for chi2 or psi)",
                                ["model", "version", "test"], registry=self._registry)
        self._conn_refused = Counter(
            "flywheel_drift_refused_connections",
            "Frame connections to the drift monitor dropped for not proving the deployment secret "
            "(wrong_proof, no_proof: closed first, timeout)",
            ["reason"], registry=self._registry,
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fw-drift")
        self._loop = LoopThread("flywheel-drift")
        self._loop.start()
        self._loop.call(self._start(port))

    async def _start(self, port: int) -> None:
        self._server = await start_frame_server(
            self._handle, "127.0.0.1", port, reuse_port=False, secret=self._secret, identity=process_identity(),
            on_refused=lambda why: self._conn_refused.labels(why).inc(),
        )

    def add_callback(self, fn: Callable[[DriftEvent], None]) -> None:
        """Call ``fn(event)`` for every window that drifted (on a worker thread)."""
        self._callbacks.append(fn)

    async def _handle(self, call: Call) -> Reply:
        try:
            if call.op == OP_DRIFT_INGEST:
                await self._ingest(*decode_samples(call.payload))
                return Reply(0, b"")
            if call.op == OP_DRIFT_TRACK:
                await self._track(msgspec.json.decode(call.payload, type=ModelConfig))
                return Reply(0, b"")
            if call.op == OP_DRIFT_HISTORY:
                req = msgspec.json.decode(call.payload)
                return Reply(0, msgspec.json.encode(self.history(req["model"], req["version"])))
            if call.op == OP_METRICS:
                return Reply(0, generate_latest(self._registry))
            return Reply(int(ErrorCode.INVALID_ARGUMENT), f"unknown operation {call.op}".encode())
        except FlywheelError as exc:
            return Reply(int(exc.code), exc.message.encode())

    async def _track(self, model: ModelConfig) -> None:
        """Track a model version loaded after the deploy (a variant added at
        run time) from its first samples on; known versions are left as they are."""
        if (model.name, model.version) in self._tracked:
            return
        if not model.drift.enabled:
            raise InvalidInputError(f"model {model.name!r} version {model.version!r} has drift.enabled false")
        loop = asyncio.get_running_loop()
        tracked = await loop.run_in_executor(
            self._executor, lambda: _Tracked(model, load_reference(model, self._registry_config))
        )
        self._tracked.setdefault((model.name, model.version), tracked)

    def _get(self, model: str, version: str) -> _Tracked:
        tracked = self._tracked.get((model, version))
        if tracked is None:
            raise NotFoundError(f"model {model!r} version {version!r} is not monitored for drift")
        return tracked

    async def _ingest(self, model: str, version: str, rows: np.ndarray) -> None:
        tracked = self._get(model, version)
        rows = rows.reshape(len(rows), -1)
        if rows.shape[1] != tracked.features:
            raise InvalidInputError(f"samples have {rows.shape[1]} features; the reference has {tracked.features}")
        self._rows.labels(model, version).inc(len(rows))
        loop = asyncio.get_running_loop()
        for window in tracked.window.add(rows):
            # scoring runs off the loop; windows of one model stay in order
            await loop.run_in_executor(self._executor, self._score, model, version, tracked, window)

    def _score(self, model: str, version: str, tracked: _Tracked, window: np.ndarray) -> None:
        for test, det in tracked.detectors.items():
            try:
                res = det.score(window)
            except FlywheelError as exc:
                log.warning("drift scoring of %s:%s (%s) failed: %s", model, version, test, exc.message)
                self._refused.labels(model, version, test).inc()
                continue
            self._windows.labels(model, version, test).inc()
            feats = ["all"] if det.joint else [str(i) for i in range(len(res.statistic))]
            for f, s, p, d in zip(feats, res.statistic, res.p_adjusted, res.drift):
                self._stat.labels(model, version, f, test).set(s)
                self._p.labels(model, version, f, test).set(p)
                self._flag.labels(model, version, f, test).set(1.0 if d else 0.0)
            now = time.time()
            tracked.history.append({"ts": now, "test": test, "any_drift": res.any_drift,
                                    "result": msgspec.to_builtins(res)})
            if res.any_drift:
                event = DriftEvent(model, version, test, now, [i for i, d in enumerate(res.drift) if d], res)
                for fn in self._callbacks:
                    try:
                        fn(event)
                    except Exception:  # noqa: BLE001 - one bad callback must not stop monitoring
                        log.exception("drift callback failed")

    def drift_score(self, model: str, version: str, since: float) -> float | None:
        """The share of ``version``'s features found drifting in its worst
        window scored since ``since`` (any test; 0..1); None when no window
        was scored since then, or the version is not tracked (yet)."""
        tracked = self._tracked.get((model, version))
        if tracked is None:
            return None
        return drift_score(list(tracked.history), since)

    def history(self, model: str, version: str) -> list[dict]:
        """Recent results for one model version, oldest first."""
        return list(self._get(model, version).history)

    def where(self) -> str:
        """The Ray node this monitor runs on: replicas on it send frames to
        127.0.0.1, the others call :meth:`frame` through Serve
        (serving/_private/monitor_link.py)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    async def frame(self, op: int, payload: bytes) -> tuple[int, bytes]:
        """One frame call (ingest, track, history, metrics) through Serve,
        from a replica on another node; answered as over loopback. Serve's
        calls come from inside the Ray cluster, which holds the deployment's
        secret anyway (its arguments)."""
        reply = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._handle(Call(op, payload)),
                                                                           self._loop.loop))
        return reply.code, reply.payload

    def frame_stats(self) -> dict:
        """For operators and tests: the monitor's frame port and ``refused``,
        the connections dropped unauthenticated since it started."""
        return {"port": self._server.port, "refused": self._server.refused}

    def check_health(self) -> None:
        if self._loop.stalled_for() > 10.0:
            raise RuntimeError("drift monitor loop stalled")

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        loop, self._loop = getattr(self, "_loop", None), None
        if loop is None:
            return

        async def _stop() -> None:
            self._server.close()

        loop.shutdown(_stop)
        self._executor.shutdown(wait=False)
