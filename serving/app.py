"""Deploy a DeployConfig on Ray Serve and take it down again.

Layout on Ray Serve: one application named after the config's ``name``
(``flywheel`` by default), whose entry deployment ``ingress`` has
``server.replicas`` replicas serving V2 HTTP and gRPC on the configured
addresses and hosting every colocated model in-process; beside it ``router``,
one replica of the router controller, which holds every endpoint's routing
state (policies, canaries, swaps; see serving/controller.py) and persists it
in the registry's database; ``drift``, the drift monitor, when a model has
drift on; and one deployment ``<model>-<version>`` per dedicated model, whose
replicas serve the internal frame protocol on a loopback port shared by all
of them (an ingress on a node without one calls them through Serve). One application is what ``serve deploy`` and KubeRay's
``serveConfigV2`` deploy declaratively (serving/deploy.py builds the same).
Serve's own HTTP proxy is disabled: it would add milliseconds to every request
(shared/design/RAY-NOTES.md) and nothing routes through it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
import urllib.error
import uuid
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from flywheel.protocol.errors import ConfigError, UnavailableError
from flywheel.runtime.backends import get_backend
from flywheel.serving._private.autoscaling import ray_autoscaling_config
from flywheel.serving._private.tls import server_context
from flywheel.serving.config import (
    AUTOSCALING_CONNECTION_AGE_S, DeployConfig, ModelConfig, RegistryConfig, ServerConfig,
)
from flywheel.serving.controller import RouterController
from flywheel.serving.drift_monitor import DriftMonitor
from flywheel.serving.ingress import DRAIN_S, Ingress
from flywheel.serving.router import Route
from flywheel.serving.replica import ModelReplica
from flywheel.common.reach import check_reachable
from flywheel.common.settings import Settings, load_settings

log = logging.getLogger(__name__)
# calls in flight through Serve to one dedicated replica (from ingress
# replicas on nodes without one); Serve's default of 5 would queue them
MAX_SERVE_CALLS = 1000


def model_deployment_name(model: ModelConfig) -> str:
    """The Serve deployment of a dedicated (model, version)."""
    return f"{model.name}-{model.version}"


def application_name(config: DeployConfig) -> str:
    """The Serve application of a deployment (all its parts are in it)."""
    return config.name


def _actor_options(num_cpus: float, models, runtime_env: dict | None = None) -> dict:
    """Ray resources of a replica that loads ``models``: the most GPUs any of
    them asks for (ModelConfig.gpus), so that a GPU model is placed on a GPU node
    and never lands on a CPU node to fall back to the CPU unseen; and the
    deployment's runtime environment, if any."""
    options: dict = {"num_cpus": num_cpus}
    gpus = max((m.gpus() for m in models), default=0)
    if gpus:
        options["num_gpus"] = gpus
    if runtime_env:
        options["runtime_env"] = runtime_env
    return options


def check_gpus(config: DeployConfig, cluster_gpus: float) -> None:
    """Refuse, before anything is deployed, a GPU model on a Ray cluster
    that has fewer GPUs than its largest replica asks for (Serve would
    otherwise wait forever for a node that never comes)."""
    for m in config.models:
        need = m.gpus()
        if need > cluster_gpus:
            why = (f"backend {m.backend}" if m.num_gpus is None and m.backend != "onnxruntime"
                   else "num_gpus" if m.num_gpus is not None
                   else f"onnxruntime.providers {list(m.onnxruntime.providers)}")
            raise ConfigError(
                f"model {m.name!r} needs {need:g} GPU per replica ({why}), and this Ray cluster has "
                f"{cluster_gpus:g}. Deploy it on a cluster with a GPU node, or run it on the CPU: "
                "set onnxruntime.providers to [cpu] (or num_gpus: 0 to keep the providers and let "
                "ONNX Runtime fall back)."
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_bindable(host: str, port: int, field: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"server.{field} {host}:{port} cannot be bound: {exc}") from None


@dataclass(frozen=True)
class Deployment:
    """What :func:`deploy` started; pass it to :func:`undeploy`."""

    config: DeployConfig
    url: str  # V2 HTTP base URL
    grpc_target: str  # host:port of the V2 gRPC service ("" when off)
    apps: tuple[str, ...]


def resolve_models(config: DeployConfig, settings: Settings) -> DeployConfig:
    """Pin every registry reference to a concrete version (``name@alias`` ->
    ``name/N``), fill in versions, and fix the registry location, so that all
    replicas of a deployment load the same thing even if an alias moves."""
    reg_cfg = RegistryConfig(
        uri=config.registry.uri or settings.registry_uri,
        artifacts=config.registry.artifacts or settings.artifacts_uri,
    )
    registry = None
    models = []
    for m in config.models:
        if m.ref:
            if registry is None:
                from flywheel.registry import Registry

                registry = Registry.open(reg_cfg.uri, reg_cfg.artifacts)
            mv = registry.resolve(m.ref)
            if m.artifact not in mv.artifacts:
                raise ConfigError(
                    f"model {m.name!r}: {mv.ref} has no artifact {m.artifact!r}; it has {sorted(mv.artifacts)}"
                )
            m = msgspec.structs.replace(m, ref=mv.ref, version=m.version or str(mv.version))
        elif not m.version:
            m = msgspec.structs.replace(m, version="1")
        models.append(m)
    if registry is not None:
        registry.close()
    return msgspec.structs.replace(config, models=models, registry=reg_cfg)


def build_application(config: DeployConfig, *, deploy_id: str | None = None, runtime_env: dict | None = None,
                      settings: Settings | None = None):
    """The whole deployment as one Ray Serve application: the ingress (the
    application's entry) and, bound into its arguments so that Serve deploys
    them with it, the router controller, the drift monitor (when a model has
    drift on) and one deployment per dedicated model. ``config`` must be
    resolved (resolve_models) and have its public ports fixed; the internal
    ports are chosen here, on the node that builds the application, and so
    is the deployment's secret: 32 random bytes that every part proves on
    every internal frame connection (serving/_private/wire.py). It is
    stored with the deployments' arguments by Serve, so it is known to
    whoever controls the Ray cluster and to nobody else; each build makes
    a new one (as it picks new ports).

    ``runtime_env``: the Ray runtime environment of every replica (e.g.
    ``env_vars`` or ``py_modules`` that make a plug-in backend importable
    on every node), as a ``serve deploy`` config's per-application
    ``runtime_env`` gives.

    ``settings``: the process settings (default: read now); a loop
    controller keeps its training jobs' folders under their ``home``.

    Used by :func:`deploy` and by the ``serve deploy`` builder
    (serving/deploy.py), so both lay a deployment out the same way."""
    from ray import serve

    server = config.server
    app = application_name(config)
    deploy_id = deploy_id or uuid.uuid4().hex
    secret = secrets.token_bytes(32)
    monitored = [m for m in config.models if m.drift.enabled]
    drift_port = _free_port() if monitored else 0
    parts = []
    if monitored:
        monitor = serve.deployment(DriftMonitor).options(
            name="drift", num_replicas=1, ray_actor_options=_actor_options(0.1, [], runtime_env),
            health_check_period_s=2.0, graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=2.0,
        )
        parts.append(monitor.bind(drift_port, monitored, config.registry, secret=secret))
    # The router controller: endpoint policies, canaries, swaps; the ingress
    # replicas take their first snapshot from it (EndpointSync.first waits).
    controller = serve.deployment(RouterController).options(
        name="router", num_replicas=1, ray_actor_options=_actor_options(0.05, [], runtime_env),
        health_check_period_s=2.0, graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=1.0,
        logging_config={"enable_access_log": False},  # replicas sync twice a second
    )
    parts.append(controller.bind(config.name, deploy_id, list(config.endpoints),
                                 list(config.models), config.registry, app if monitored else ""))
    if config.loops:
        parts.append(_loop_controller(config, runtime_env, settings or load_settings()))
    routes = []
    colocated = [m for m in config.models if m.placement == "colocated"]
    for model in config.models:
        if model.placement == "colocated":
            continue
        port = _free_port()
        if model.autoscaling is not None:
            replicas: dict = {"autoscaling_config": ray_autoscaling_config(model.autoscaling, model.replicas)}
            # added replicas get calls only on new connections (serving/_private/wire.py)
            max_age_s = server.max_connection_age_s or AUTOSCALING_CONNECTION_AGE_S
        else:
            replicas, max_age_s = {"num_replicas": model.replicas}, None
        dep = serve.deployment(ModelReplica).options(
            name=model_deployment_name(model),
            **replicas,
            ray_actor_options=_actor_options(model.num_cpus, [model], runtime_env),
            health_check_period_s=2.0,
            health_check_timeout_s=10.0,
            graceful_shutdown_wait_loop_s=0.1,
            graceful_shutdown_timeout_s=5.0,
            # calls through Serve (from nodes without a replica) are
            # bounded by the model's batcher queue, not by Serve
            max_ongoing_requests=MAX_SERVE_CALLS,
        )
        parts.append(dep.bind(model, port, server.request_limits(), config.registry, drift_port, secret=secret,
                              drift_app=app if drift_port else ""))
        routes.append(Route(model.name, model.version, port, deployment=model_deployment_name(model),
                            max_age_s=max_age_s))
    if server.autoscaling is not None:
        scale: dict = {"autoscaling_config": ray_autoscaling_config(server.autoscaling, server.replicas)}
    else:
        scale = {"num_replicas": server.replicas}
    if server.replicas_per_node:
        scale["max_replicas_per_node"] = server.replicas_per_node
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        **scale,
        ray_actor_options=_actor_options(
            server.ingress_num_cpus + sum(m.num_cpus for m in colocated), colocated, runtime_env
        ),
        health_check_period_s=2.0,
        graceful_shutdown_wait_loop_s=0.1,
        # a replaced replica drains its connections (DRAIN_S) and its colocated
        # models' batches (up to 5 s) before it goes
        graceful_shutdown_timeout_s=(6.0 if colocated else 2.0) + DRAIN_S,
        # a rolling update starts the new replicas beside the old ones (they
        # share the ports: SO_REUSEPORT) and stops the old only then
        max_surge_percent=100,
    )
    return ingress.bind(
        server, routes, drift_port, config.registry.uri if server.auth.enabled else "",
        colocated, config.registry, app, parts, deploy_id, secret,
        loops=(config.name, app) if config.loops else None,
        label_roots={m.name: m.capture.path for m in config.models
                     if m.capture is not None and m.placement != "colocated"},
    )


def _loop_controller(config: DeployConfig, runtime_env: dict | None, settings: Settings):
    """The loop controller (loops/controller.py): one replica, restarted by
    Serve, its state in the registry. It reaches the endpoint through the
    public HTTP address, like any operator."""
    from ray import serve

    from flywheel.loops.controller import LoopController

    server = config.server
    # a wildcard address is served on every node: the controller calls the
    # ingress on its own node ({node}: its node's address, filled in there)
    host = "{node}" if server.host in ("0.0.0.0", "::", "") else server.host
    url = f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}"
    capture_of: dict[str, str] = {}
    model_of: dict[str, str] = {}
    template_of: dict[str, dict] = {}
    for m in config.models:  # the highest version of a name is its template
        if m.capture is not None:
            capture_of.setdefault(m.name, m.capture.path)
        if m.ref:
            model_of.setdefault(m.name, m.ref.split("@")[0].split("/")[0])
        current = template_of.get(m.name)
        if current is None or _version_key(m.version) >= _version_key(current["version"]):
            template_of[m.name] = msgspec.to_builtins(m)
    for loop in config.loops:
        model_of.setdefault(loop.endpoint, loop.model_name)
    controller = serve.deployment(LoopController).options(
        name="loops", num_replicas=1, ray_actor_options=_actor_options(0.1, [], runtime_env),
        health_check_period_s=5.0, graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=15.0,
        logging_config={"enable_access_log": False},
    )
    return controller.bind(
        config.name, list(config.loops), registry_uri=config.registry.uri, artifacts_uri=config.registry.artifacts,
        ingress_url=url, auth=server.auth.enabled, capture_of=capture_of, model_of=model_of,
        template_of=template_of, home=os.path.abspath(settings.home),
    )


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def fix_public_ports(server: ServerConfig) -> ServerConfig:
    """Port 0 means any free port: pick it now, so that the caller can be
    told, and check that fixed ports can be bound."""
    ports = {}
    for field in ("port", "grpc_port"):
        port = getattr(server, field)
        if port > 0:
            _check_bindable(server.host, port, field)
        elif port == 0:
            with socket.socket(socket.AF_INET6 if ":" in server.host else socket.AF_INET) as s:
                s.bind((server.host, 0))
                ports[field] = s.getsockname()[1]
    return msgspec.structs.replace(server, **ports)


def deploy(
    config: DeployConfig, *, settings: Settings | None = None, ready_timeout_s: float = 120.0,
    runtime_env: dict | None = None, on_phase: Callable[[str, float], None] | None = None,
) -> Deployment:
    """Deploy every model of ``config`` and the ingress as one Serve
    application (build_application, which takes ``runtime_env``); return
    when ``/v2/health/ready`` answers 200. Ray must be initialised
    (start_ray). Registry references are resolved first (see resolve_models).
    ``on_phase(name, seconds)`` hears how long each step took (for start-up
    reports): resolving, Serve's controller, the application's deploy, the
    wait for ready."""
    from ray import serve

    mark = _phase_clock(on_phase)
    config.server.check_exposure()
    if config.server.tls is not None:
        server_context(config.server.tls)  # unreadable files or a mismatched key fail here, named
    config = resolve_models(config, settings or load_settings())
    config = msgspec.structs.replace(config, server=fix_public_ports(config.server))
    server = config.server
    import ray

    check_gpus(config, ray.cluster_resources().get("GPU", 0.0))
    if sum(1 for n in ray.nodes() if n["Alive"]) > 1:
        # a registry or artifact store the driver reaches may be another
        # node's loopback or disk: fail here, naming the node, not in a replica
        check_reachable(config.registry.uri, config.registry.artifacts)
    mark("resolve models and ports")
    serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
    mark("Serve controller")
    log.info("deploying %s (%d model(s))", config.name, len(config.models))
    serve.run(build_application(config, runtime_env=runtime_env, settings=settings), name=application_name(config),
              route_prefix=None)
    mark("deploy the application (replicas load and warm up)")
    host = f"[{server.host}]" if ":" in server.host else server.host
    url = f"{server.scheme}://{host}:{server.port}"
    if server.tls is None:
        wait_ready(url, ready_timeout_s)
    else:  # this process holds no client certificate that mutual TLS may ask for
        wait_replicas_ready(application_name(config), ready_timeout_s)
    mark("wait for ready")
    grpc_target = f"{host}:{server.grpc_port}" if server.grpc_port >= 0 else ""
    return Deployment(config, url, grpc_target, (application_name(config),))


def _phase_clock(on_phase: Callable[[str, float], None] | None) -> Callable[[str], None]:
    """``mark(name)`` reports the time since the previous mark as ``name``."""
    last = [time.perf_counter()]

    def mark(name: str) -> None:
        now = time.perf_counter()
        if on_phase is not None:
            on_phase(name, now - last[0])
        last[0] = now

    return mark


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll ``url``/v2/health/ready until 200; UnavailableError on timeout."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = json.loads(exc.read() or b"{}").get("error", str(exc))
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise UnavailableError(f"{url} not ready after {timeout_s:.0f}s: {last}")


def wait_replicas_ready(app: str, timeout_s: float) -> None:
    """Ask the ingress replicas of ``app`` (through Serve) until one says
    that every model it routes to is ready; UnavailableError on timeout."""
    from ray import serve

    handle = serve.get_deployment_handle("ingress", app)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handle.ready.remote().result(timeout_s=max(1.0, deadline - time.monotonic())):
            return
        time.sleep(0.1)
    raise UnavailableError(f"application {app!r} not ready after {timeout_s:.0f}s")


def undeploy(deployment: Deployment) -> None:
    """Delete the applications that ``deploy`` created (ingress first)."""
    from ray import serve

    for name in reversed(deployment.apps):
        serve.delete(name)
