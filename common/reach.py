"""Can every node of the Ray cluster reach the registry and the artifact store?

On one machine they always can; on a cluster a registry URI or an S3
endpoint that names 127.0.0.1, or a folder only the head has, works from
the driver and fails later on another node, in a replica or a training
worker, with an error that names neither the node nor the address. Deploy
asks every node first: :func:`check_reachable` runs :func:`probe` in a task
pinned to each alive node and raises one ConfigError naming every node that
failed, the address it tried and what went wrong.

:func:`probe` itself knows no Ray (unit-tested on its own): the registry is a
PostgreSQL server (a real connection: address, authentication, database) or
a SQLite file (its folder must exist there: a file on the head's disk is not
the worker's); the artifact store is an S3 bucket (the endpoint botocore
resolves on that node, from ``AWS_ENDPOINT_URL`` or its configuration, must
answer for the bucket), another fsspec URI (its root must be listable) or a
local folder (it must exist there).
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlparse

from flywheel.protocol.errors import ConfigError

LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def probe(registry_uri: str, artifacts_uri: str, timeout_s: float = 5.0) -> list[dict[str, str]]:
    """Try the registry and the artifact store from this process's host.

    Returns one ``{"what", "address", "error"}`` per store that failed
    (``what``: "registry" or "artifact store"; ``address``: what was tried,
    never a password); [] when both answer. Each try gives up after about
    ``timeout_s``. Raises nothing for an unreachable store."""
    failed = []
    for what, check, uri in (("registry", _registry, registry_uri), ("artifact store", _artifacts, artifacts_uri)):
        address, error = check(uri, timeout_s)
        if error:
            failed.append({"what": what, "address": address, "error": error})
    return failed


def _registry(uri: str, timeout_s: float) -> tuple[str, str]:
    """(address tried, error or "")."""
    parsed = urlparse(uri)
    if parsed.scheme in ("postgresql", "postgres"):
        address = _redact(uri)
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict

            info = conninfo_to_dict(uri)
            address = (f"postgresql://{info.get('host') or info.get('hostaddr') or 'localhost'}:"
                       f"{info.get('port') or 5432}/{info.get('dbname', '')}")
            # libpq's connect_timeout is whole seconds, at least 2
            with psycopg.connect(uri, connect_timeout=max(2, round(timeout_s)), autocommit=True) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - whatever failed, the node cannot use it
            return address, _words(exc)
        return address, ""
    if parsed.scheme == "sqlite":
        path = parsed.path if parsed.netloc == "" else uri[len("sqlite://"):]
    elif parsed.scheme in ("", "file"):
        path = os.path.abspath(parsed.path if parsed.scheme else uri)
    else:  # registry/db.py refuses it with its own words, on the driver
        return uri, ""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        return path, (f"its folder {folder} does not exist on this node (a SQLite registry is one node's "
                      "file: use a folder every node shares, or PostgreSQL)")
    return path, ""


def _artifacts(uri: str, timeout_s: float) -> tuple[str, str]:
    """(address tried, error or "")."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else os.path.abspath(uri)
        if not os.path.isdir(path):
            return path, "the folder does not exist on this node (use a folder every node shares, or s3://...)"
        return path, ""
    protocol = uri.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        return _s3(uri, timeout_s)
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
        fs.ls(root.split("/", 1)[0] or root, detail=False)
    except Exception as exc:  # noqa: BLE001
        return _redact(uri), _words(exc)
    return _redact(uri), ""


def _s3(uri: str, timeout_s: float) -> tuple[str, str]:
    """HEAD the bucket at the endpoint this node's botocore resolves; one
    try, bounded by ``timeout_s`` (s3fs and botocore would retry for
    minutes)."""
    import fsspec

    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    address = f"s3://{bucket}"
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs={
            "connect_timeout": timeout_s, "read_timeout": timeout_s,
            "retries": {"max_attempts": 1, "mode": "standard"}})
        fs.retries = 1  # s3fs's own retry loop, on top of botocore's
        fs.connect()
        address = f"s3://{bucket} at {fs.s3.meta.endpoint_url}"
        fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as exc:  # noqa: BLE001
        return address, _words(exc)
    return address, ""


def _redact(uri: str) -> str:
    """``uri`` without a password in it (for messages)."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()


def _words(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def _alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())


def describe_failures(failures: dict[str, list[dict[str, str]]]) -> str:
    """One message for ``{node label: probe() result}``: every node and
    every address it failed to reach, and what to do about it."""
    lines = []
    loopback = False
    for node, failed in failures.items():
        for f in failed:
            lines.append(f"Ray node {node} cannot reach the {f['what']} at {f['address']}: {f['error']}")
            loopback = loopback or any(part in f["address"] for part in LOOPBACK)
    hint = (" A loopback address (127.0.0.1, localhost) is each node's own, not the driver's: name an address "
            "every node reaches." if loopback else "")
    return ("the cluster's nodes must all reach the registry and the artifact store; " + "; ".join(lines) + "."
            + hint)


def check_reachable(registry_uri: str, artifacts_uri: str, timeout_s: float = 5.0) -> list[str]:
    """Run :func:`probe` on every alive node of the joined Ray cluster.

    Returns the addresses of the nodes that reached both stores. Raises
    ConfigError naming every node that failed (its IP and node id), the
    address it tried and the error, or that did not answer within
    ``3 * timeout_s`` (no worker could start there). A node that leaves the
    cluster meanwhile is skipped. Ray must be initialised."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def _probe(registry: str, artifacts: str, timeout: float) -> list[dict[str, str]]:
        return probe(registry, artifacts, timeout)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(registry_uri, artifacts_uri, timeout_s) for n in nodes]
    deadline = time.monotonic() + 3 * timeout_s + 10  # two tries of timeout_s, plus a worker's start
    failures: dict[str, list[dict[str, str]]] = {}
    reached = []
    for node, ref in zip(nodes, refs):
        label = f"{node['NodeManagerAddress']} (node id {node['NodeID'][:12]})"
        try:
            failed = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except GetTimeoutError:
            ray.cancel(ref, force=True)
            failed = [{"what": "registry and the artifact store",
                       "address": f"{_redact(registry_uri)} / {_redact(artifacts_uri)}",
                       "error": "no answer from the node in time (no worker could start there?)"}]
        except RayError as exc:
            if not _alive(node["NodeID"]):  # it left the cluster since ray.nodes(): nothing runs there
                continue
            # the probe could not run there (its runtime environment, a crash): not a pass
            failed = [{"what": "registry and the artifact store",
                       "address": f"{_redact(registry_uri)} / {_redact(artifacts_uri)}",
                       "error": f"the check could not run on the node: {_words(exc)}"}]
        if failed:
            failures[label] = failed
        else:
            reached.append(node["NodeManagerAddress"])
    if failures:
        raise ConfigError(describe_failures(failures))
    return reached
