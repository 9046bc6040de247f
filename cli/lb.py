"""``flywheel lb haproxy``: an HAProxy configuration for a deployment that spans
several nodes (what it writes and why: flywheel.serving.loadbalancer)."""

from __future__ import annotations

import argparse
import sys

from flywheel.serving.loadbalancer import haproxy_config, nodes_for, ray_nodes


def _cmd_haproxy(args: argparse.Namespace) -> None:
    from flywheel.serving.config import load_config

    server = load_config(args.config).server
    hosts = args.node
    if not hosts:
        from flywheel.common.ray_cluster import start_ray
        from flywheel.common.settings import load_settings

        start_ray(load_settings(), log_to_driver=False)
        hosts = ray_nodes()
    nodes = nodes_for(server, hosts)
    text = haproxy_config(
        nodes, bind_host=args.bind, http_port=args.http_port, grpc_port=args.grpc_port,
        check_interval_ms=args.check_interval_ms, fall=args.fall, rise=args.rise,
    )
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out} ({len(nodes)} node(s)); run: haproxy -f {args.out}")


HELP = "configuration for a load balancer in front of several nodes"


def add_parser(sub: argparse._SubParsersAction) -> None:
    lb = sub.add_parser("lb", help=HELP, description=__doc__)
    kinds = lb.add_subparsers(dest="lb_command", required=True, metavar="KIND")
    hp = kinds.add_parser("haproxy", help="write an haproxy.cfg with health checks for a deployment's nodes")
    hp.add_argument("--config", required=True, help="the deployment config (its ports are the nodes' ports)")
    hp.add_argument("--node", action="append", default=[],
                    help="a node's address (repeat); default: the Ray cluster's alive nodes")
    hp.add_argument("--bind", default="0.0.0.0", help="where HAProxy listens")
    hp.add_argument("--http-port", type=int, default=8000, help="HAProxy's HTTP port (default: %(default)s)")
    hp.add_argument("--grpc-port", type=int, default=9000, help="-1: no gRPC frontend")
    hp.add_argument("--check-interval-ms", type=int, default=1000,
                    help="how often each node's readiness is checked (default: %(default)s)")
    hp.add_argument("--fall", type=int, default=2, help="failed checks that take a node out (default: %(default)s)")
    hp.add_argument("--rise", type=int, default=2, help="good checks that bring it back (default: %(default)s)")
    hp.add_argument("--out", default="-", help="file to write ('-' = stdout)")
    hp.set_defaults(func=_cmd_haproxy)
