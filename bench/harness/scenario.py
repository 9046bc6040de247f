"""Typed benchmark scenarios, loaded from YAML (see ``configs/bench-*.yaml``).

One scenario says what to load (target, model, payloads, protocol mix), how
hard (a load plan, a capacity search, or a config search) and for how long.
Every field is validated on load and a bad one is named
(``$.load.levels[0]``); every run is bounded in time and in requests.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any, Literal

import msgspec

from flywheel.protocol.datatypes import V2_DATATYPES
from flywheel.protocol.errors import ConfigError
from flywheel.serving.config import is_loopback

PROTOCOLS = ("http_json", "http_binary", "grpc")
DEFAULT_MAX_REQUESTS = 1_000_000


class Target(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the V2 server listens. Loopback only unless ``allow_remote``:
    a benchmark should never load someone else's server by accident."""

    http: str = "http://127.0.0.1:8000"
    grpc: str = "127.0.0.1:9000"
    allow_remote: bool = False

    def __post_init__(self) -> None:
        url = urllib.parse.urlsplit(self.http)
        if url.scheme not in ("http",) or not url.hostname:
            raise ConfigError(f"target.http {self.http!r} must look like http://host:port")
        hosts = [url.hostname]
        if self.grpc:
            if ":" not in self.grpc:
                raise ConfigError(f"target.grpc {self.grpc!r} must look like host:port")
            hosts.append(self.grpc.rsplit(":", 1)[0])
        if not self.allow_remote:
            remote = [h for h in hosts if not is_loopback(h)]
            if remote:
                raise ConfigError(
                    f"target {remote[0]!r} is not a loopback address; set target.allow_remote: true "
                    "to load a server on another host"
                )


class InputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One input tensor of the generated requests.

    shape: the full request shape (use the batch size as first dimension).
    generator: uniform in [low, high), normal(mean=low, std=high), zeros,
        ones, or ``shape[0]`` rows drawn at random from ``file`` (a .npy
        array whose rows are samples; a row must hold ``shape[1:]``).
    """

    name: str
    shape: list[int]
    datatype: str = "FP32"
    generator: Literal["uniform", "normal", "zeros", "ones", "file"] = "uniform"
    low: float = 0.0
    high: float = 1.0
    file: str = ""

    def __post_init__(self) -> None:
        if self.datatype not in V2_DATATYPES or self.datatype == "BYTES":
            raise ConfigError(f"payload input {self.name!r}: datatype {self.datatype!r} is not a numeric V2 type")
        if not self.shape or any(d < 1 for d in self.shape):
            raise ConfigError(f"payload input {self.name!r}: shape {self.shape} needs dimensions >= 1")
        if self.generator == "file" and not self.file:
            raise ConfigError(f"payload input {self.name!r}: generator 'file' needs 'file'")


class OutputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An output every response must carry, with its shape (-1 = any)."""

    name: str
    shape: list[int] = []


class Payload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Request payloads, generated once before the run.

    inputs / outputs: empty = read from the model's V2 metadata, with every
        variable dimension set to ``batch`` (the first) or 1.
    variants: distinct random payloads cycled through (so caches do not help).
    """

    inputs: list[InputSpec] = []
    outputs: list[OutputSpec] = []
    batch: int = 1
    variants: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.variants < 1:
            raise ConfigError("payload.batch and payload.variants must be >= 1")


class Mix(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Relative weights of the protocols in the request mix."""

    http_json: float = 1.0
    http_binary: float = 0.0
    grpc: float = 0.0

    def __post_init__(self) -> None:
        weights = self.weights()
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"mix {weights}: weights must be >= 0 with a positive sum")

    def weights(self) -> dict[str, float]:
        return {p: getattr(self, p) for p in PROTOCOLS}


class Load(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A load plan: one measured step per level.

    by: ``users`` (closed loop: each user sends its next request as soon as
        the last one is answered) or ``rate`` (a fixed arrival rate in
        requests/s, paced across ``max_users`` users; if they cannot keep it
        up, achieved < offered shows it).
    levels: one level = fixed load; several = stepped load.
    """

    by: Literal["users", "rate"] = "users"
    levels: list[float] = msgspec.field(default_factory=lambda: [1.0])
    max_users: int = 64

    def __post_init__(self) -> None:
        if not self.levels or any(v <= 0 for v in self.levels):
            raise ConfigError(f"load.levels {self.levels}: need at least one level, each > 0")
        if self.by == "users" and any(v != int(v) for v in self.levels):
            raise ConfigError(f"load.levels {self.levels}: user counts must be whole numbers")
        if self.max_users < 1:
            raise ConfigError("load.max_users must be >= 1")


class SLO(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A step meets the SLO when its p99 latency and error rate are within
    these bounds (and, by rate, it achieved ``min_achieved`` of the offered
    rate)."""

    p99_ms: float = 100.0
    max_error_rate: float = 0.01
    min_achieved: float = 0.95

    def __post_init__(self) -> None:
        if self.p99_ms <= 0 or not 0 <= self.max_error_rate <= 1 or not 0 < self.min_achieved <= 1:
            raise ConfigError("slo: p99_ms > 0, max_error_rate in [0, 1], min_achieved in (0, 1]")


class Capacity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """SLO search: raise the offered load from ``start`` by ``increment``
    (or multiply by ``factor``) until a step breaks the SLO or ``max_level``
    / ``max_steps`` is reached.

    replicas: model replicas behind the target during the run (for the
        per-replica figure); target_rps / headroom: the replicas needed to
        serve ``target_rps`` with ``headroom`` to spare.
    """

    by: Literal["users", "rate"] = "rate"
    start: float = 10.0
    increment: float = 0.0
    factor: float = 0.0
    max_level: float = 100_000.0
    max_steps: int = 20
    max_users: int = 64
    replicas: int = 1
    target_rps: float = 0.0
    headroom: float = 0.25

    def __post_init__(self) -> None:
        if self.start <= 0 or self.max_level < self.start:
            raise ConfigError("capacity: start must be > 0 and <= max_level")
        if (self.increment > 0) == (self.factor > 1):
            raise ConfigError("capacity: give exactly one of increment (> 0) and factor (> 1)")
        if self.by == "users" and (self.start != int(self.start) or self.increment != int(self.increment)):
            raise ConfigError("capacity: by users needs whole start and increment")
        if self.max_steps < 1 or self.replicas < 1 or self.max_users < 1:
            raise ConfigError("capacity: max_steps, replicas and max_users must be >= 1")
        if self.target_rps < 0 or self.headroom < 0:
            raise ConfigError("capacity: target_rps and headroom must be >= 0")

    def levels(self) -> list[float]:
        out, level = [], self.start
        while level <= self.max_level + 1e-9 and len(out) < self.max_steps:
            out.append(round(level, 6))
            nxt = level + self.increment if self.increment else level * self.factor
            if self.by == "users":  # whole users, and always at least one more
                nxt = float(max(round(nxt), level + 1))
            level = nxt
        return out


class Variant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One model file or registry version to try in a config search."""

    name: str
    path: str = ""
    ref: str = ""

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.ref):
            raise ConfigError(f"config_search variant {self.name!r}: give exactly one of path and ref")


class Grid(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Server settings to try; every combination is deployed and measured.
    An empty list keeps the model's own setting."""

    max_batch_size: list[int] = []
    max_queue_delay_us: list[int] = []
    replicas: list[int] = []
    num_cpus: list[float] = []
    intra_op_threads: list[int] = []
    variants: list[Variant] = []


class ConfigSearch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Deploy ``model`` (a serving ModelConfig mapping) under each ``grid``
    combination on a local Ray, run the capacity search against each, and
    recommend the one with the highest throughput under the SLO (ties go to
    fewer CPUs). ``registry``: where ``ref`` models come from."""

    model: dict[str, Any]
    grid: Grid = Grid()
    registry: dict[str, str] = {}
    max_configs: int = 32


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A benchmark run.

    mode: ``load`` (run the load plan), ``capacity`` (SLO search) or
        ``config_search`` (deploy a grid of configs, capacity-search each).
    duration_s / warmup_s: per step; warm-up requests are not recorded.
    max_requests: per step; the step ends early when reached.
    processes: locust processes (each one core at most), users and rates
        split evenly between them; with h2load, the threads of each
        protocol's h2load process.
    timeout_s: per request; a slower answer counts as an error.
    client: the load generator. ``locust`` (Python, one core per process;
        checks every answer's outputs), ``h2load`` (nghttp2's C client, for
        figures a Python client would cap on a small machine; checks statuses
        only), or ``auto``: h2load when installed and the scenario is one it
        can drive (see ``h2load_limits``), else locust.
    """

    model: str
    name: str = "bench"
    mode: Literal["load", "capacity", "config_search"] = "load"
    version: str = ""
    target: Target = Target()
    payload: Payload = Payload()
    mix: Mix = Mix()
    load: Load = Load()
    capacity: Capacity | None = None
    config_search: ConfigSearch | None = None
    slo: SLO = SLO()
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int = DEFAULT_MAX_REQUESTS
    processes: int = 1
    timeout_s: float = 10.0
    client: Literal["auto", "locust", "h2load"] = "auto"

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise ConfigError("duration_s and timeout_s must be > 0, warmup_s >= 0")
        if self.duration_s > 3600:
            raise ConfigError("duration_s must be <= 3600 (a step is bounded)")
        if self.max_requests < 1 or self.processes < 1:
            raise ConfigError("max_requests and processes must be >= 1")
        if self.mix.grpc > 0 and not self.target.grpc:
            raise ConfigError("mix.grpc > 0 needs target.grpc")
        if self.mode in ("capacity", "config_search") and self.capacity is None:
            raise ConfigError(f"mode {self.mode} needs a 'capacity' section")
        if self.mode == "config_search" and self.config_search is None:
            raise ConfigError("mode config_search needs a 'config_search' section")
        limits = h2load_limits(self)
        if self.client == "h2load" and limits:
            raise ConfigError(f"client: h2load cannot drive this scenario: {limits[0]}; use client: locust or auto")


def h2load_limits(sc: Scenario) -> list[str]:
    """What in ``sc`` h2load cannot do (empty: it can drive it). h2load
    sends one fixed body per protocol, closed loop or at a fixed rate, for a
    whole number of seconds, and judges an answer by its status."""
    limits = []
    if sc.payload.variants > 1:
        limits.append(f"payload.variants is {sc.payload.variants}: h2load sends one body per protocol "
                      "(set payload.variants: 1)")
    if sc.max_requests != DEFAULT_MAX_REQUESTS:
        limits.append("max_requests: h2load ends a step by time, not by a request count")
    if sc.payload.outputs:
        limits.append("payload.outputs: h2load checks an answer's status, not its outputs")
    return limits


def parse_scenario(data: Any, *, base_dir: str | Path | None = None) -> Scenario:
    """Validate a mapping into a Scenario; ConfigError names the bad field.
    Relative file paths resolve against ``base_dir`` when given."""
    try:
        sc = msgspec.convert(data, Scenario, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid scenario: {exc}") from None
    if base_dir is None:
        return sc
    base = Path(base_dir)

    def fix(p: str) -> str:
        return str((base / p).resolve()) if p else p

    inputs = [msgspec.structs.replace(i, file=fix(i.file)) for i in sc.payload.inputs]
    sc = msgspec.structs.replace(sc, payload=msgspec.structs.replace(sc.payload, inputs=inputs))
    if sc.config_search is not None:
        cs = sc.config_search
        model = dict(cs.model)
        if model.get("path"):
            model["path"] = fix(model["path"])
        grid = msgspec.structs.replace(
            cs.grid, variants=[msgspec.structs.replace(v, path=fix(v.path)) for v in cs.grid.variants]
        )
        sc = msgspec.structs.replace(sc, config_search=msgspec.structs.replace(cs, model=model, grid=grid))
    return sc


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario YAML file."""
    from flywheel.common.yaml_files import load_yaml

    return load_yaml(path, lambda data: parse_scenario(data, base_dir=Path(path).parent), what="scenario")
