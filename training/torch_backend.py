"""Ray Train's torch backend, with gloo bound to each worker's Ray node address.

Left to itself, gloo picks the address its peers dial by resolving the
machine's hostname; where that gives a loopback address (Debian's
``/etc/hosts`` maps the hostname to 127.0.1.1; a network namespace shares
the host's names), every rank advertises 127.x and a job spread over two
nodes never connects ("Gloo connectFullMesh failed ... remote=[127.0.0.1]").
Before the process group is made, each worker here binds gloo to the
network interface that holds its Ray node's address (``GLOO_SOCKET_IFNAME``,
which torch reads when it makes the group), unless the operator set
``GLOO_SOCKET_IFNAME`` for the node already.

Imported by training/runner.py when a job runs (it imports Ray at import).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from ray.train.torch import TorchConfig

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def interface_of(ip: str) -> str | None:
    """The name of the network interface holding IPv4 address ``ip`` on
    this host (Linux), or None (an IPv6 or unknown address, another OS)."""
    try:
        if ipaddress.ip_address(ip).version != 4:
            return None
        names = [name for _, name in socket.if_nameindex()]
    except (ValueError, OSError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


def bind_gloo_to_node_address() -> str:
    """Run in a Ray Train worker before its process group is made: point
    gloo at the interface of this worker's Ray node address. Returns the
    interface used ("" when none was found: gloo then decides itself)."""
    import ray

    from flywheel.common.settings import load_settings

    chosen = load_settings().gloo_socket_ifname
    if chosen:  # the operator's choice stands
        return chosen
    name = interface_of(ray.util.get_node_ip_address()) or ""
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name
    return name


class _NodeAddressBackend(TorchConfig().backend_cls):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(bind_gloo_to_node_address)
        super().on_start(worker_group, backend_config)


@dataclass
class NodeAddressTorchConfig(TorchConfig):
    """TorchConfig whose workers bind gloo to their Ray node's address."""

    @property
    def backend_cls(self):
        return _NodeAddressBackend
