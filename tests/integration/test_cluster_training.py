"""Shared state on a real two-node cluster (flywheel/bench/netns.py): the
registry on PostgreSQL and artifacts and checkpoints on S3 (moto's server, a
real S3 HTTP API), both started here on the namespaces' gateway address and
reached from both nodes; a 2-worker DDP job placed one worker per node
(resources.placement: strict_spread; gloo between the namespaces) that
checkpoints to S3, loses its worker node (raylet SIGKILLed), resumes from
its last checkpoint on the node that replaces it, and registers a model
whose artifacts the other node reads back. And the bad input: a store that
a node cannot reach is refused, naming the node and the address it tried.

``make cluster-test`` runs these with the other multi-node tests."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import pytest

from _ports import wait_for
from flywheel.bench.netns import RayCluster

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

BUCKET = "flywheel"


@pytest.fixture(scope="module")
def postgres_dsn(hosts):
    """A database of a PostgreSQL server listening on the gateway, which
    both namespaces reach (and nothing else does: it is the bridge's)."""
    from pg import started_or_skip  # tests/pg.py

    server = started_or_skip(hosts.gateway)
    yield server.new_database()
    server.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(hosts):
    """moto's S3 server on the gateway, with the bucket the tests use."""
    from s3 import MotoServer  # tests/s3.py

    server = MotoServer(hosts.gateway, _free_port(hosts.gateway)).start()
    server.make_bucket(BUCKET)
    yield server
    server.close()


@pytest.fixture(scope="module")
def cluster(hosts, s3):
    # every node's processes find the S3 endpoint and keys where botocore
    # (s3fs) and pyarrow (Ray Train's storage) look: the standard variables
    made = RayCluster(hosts, cpus=1, env={**s3.env(), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"})
    yield made
    made.close()


# check_reachable from a driver on the head, once as the nodes are set up and
# once with the S3 endpoint at 127.0.0.1 (the job's runtime_env sets it for
# every task), which only the head's namespace serves; then a registry at a
# loopback port that no namespace serves; then deploy() with the S3 endpoint
# at 127.0.0.1
REACH = """
import json, ray
from flywheel.common.reach import check_reachable
from flywheel.protocol.errors import ConfigError

def attempt(registry, artifacts, env=None):
    ray.init(address=%(address)r, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    try:
        return {"reached": sorted(check_reachable(registry, artifacts, timeout_s=3))}
    except ConfigError as exc:
        return {"error": exc.message}
    finally:
        ray.shutdown()

def deploy_attempt(registry, artifacts, env):
    # what deploy says of the same stores (before Serve starts)
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy

    ray.init(address=%(address)r, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        deploy(parse_config({"name": "reach", "server": {"port": 0, "grpc_port": -1},
                             "registry": {"uri": registry, "artifacts": artifacts},
                             "models": [{"name": "m", "path": "/nowhere/m.onnx"}]}), ready_timeout_s=20)
        return {"deployed": True}
    except ConfigError as exc:
        return {"error": exc.message}
    finally:
        ray.shutdown()

print("RESULT", json.dumps([
    attempt(%(registry)r, %(artifacts)r),
    attempt(%(registry)r, %(artifacts)r, {"AWS_ENDPOINT_URL": %(loopback_s3)r}),
    attempt("postgresql://flywheel@127.0.0.1:%(closed)d/registry", %(artifacts)r),
    deploy_attempt(%(registry)r, %(artifacts)r, {"AWS_ENDPOINT_URL": %(loopback_s3)r}),
]))
"""


def _node_ids(cluster) -> dict[str, str]:
    out = cluster.python(1, "import json, ray; ray.init(address=%r, log_to_driver=False); "
                            "print('RESULT', json.dumps({n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes() "
                            "if n['Alive']}))" % cluster.address)
    return _result(out)


def _result(out: str):
    """What a driver printed after RESULT (Ray may print its own lines,
    e.g. that a node was marked dead, to a driver's standard output)."""
    (line,) = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_a_store_a_node_cannot_reach_is_refused_naming_the_node_and_the_address(
        cluster, hosts, s3, postgres_dsn):
    from s3 import MotoServer

    # a second S3 server on the head's own loopback: the head reaches it, the worker cannot
    local = MotoServer("127.0.0.1", 19300 + hosts.subnet)
    probe = ("import urllib.request as u; u.urlopen(u.Request(%r, data=b'', method='PUT'), timeout=2)"
             % f"{local.endpoint}/{BUCKET}")

    def in_head() -> bool:  # creates the bucket as it checks that the server answers
        return hosts.run(1, [sys.executable, "-c", probe], timeout=30).returncode == 0

    local.start(popen=lambda argv, log: hosts.popen(1, argv, env=cluster.env, log=log), ready=in_head)
    try:
        out = cluster.python(1, REACH % {
            "address": cluster.address, "registry": postgres_dsn, "artifacts": f"s3://{BUCKET}/artifacts",
            "loopback_s3": local.endpoint, "closed": 19300 + hosts.subnet + 1})
    finally:
        local.close()
    good, loopback_s3, loopback_registry, deployed = _result(out)
    head, worker = hosts.addresses
    ids = _node_ids(cluster)

    assert good == {"reached": sorted(hosts.addresses)}  # PostgreSQL and S3 on the gateway: both nodes

    message = loopback_s3["error"]
    assert f"Ray node {worker} (node id {ids[worker][:12]}) cannot reach the artifact store at " \
           f"s3://{BUCKET} at {local.endpoint}" in message
    assert "EndpointConnectionError" in message
    assert f"Ray node {head} " not in message  # the head reached its own loopback
    assert "loopback address" in message

    # deploy refuses the same stores, before anything is deployed, in the same words
    assert deployed.get("error") == message, deployed

    message = loopback_registry["error"]
    for addr in hosts.addresses:
        assert f"Ray node {addr} (node id {ids[addr][:12]}) cannot reach the registry at " \
               f"postgresql://127.0.0.1:{19300 + hosts.subnet + 1}/registry" in message


def _spec(storage: str) -> dict:
    return {
        "name": "spread-digits",
        "model": {"architecture": "mlp", "hparams": {"in_features": 64, "hidden": [64], "out_features": 10}},
        "strategy": "ddp",
        "resources": {"workers": 2, "cpus_per_worker": 1.0, "wait_s": 60, "placement": "strict_spread"},
        "epochs": 24, "batch_size": 64, "seed": 3,
        "optimizer": {"name": "adamw", "lr": 0.005},
        "checkpoint": {"every_steps": 0, "every_epochs": 2, "keep": 2},
        "max_failures": 3,
        "storage": storage,
        "export": {"onnx": True, "register": True, "model_name": "spread-digits"},
    }


# the driver: a training runtime on the head that submits the job, says which
# it is, and waits for its end (the runtime's scheduler runs it on the cluster)
DRIVER = """
import json
from flywheel.common.settings import load_settings
from flywheel.training.api import TrainingRuntime

rt = TrainingRuntime(load_settings())
job = rt.submit(%(spec)s)
with open(%(out)r + ".job", "w") as f:
    json.dump({"id": job.id, "storage": job.status().storage}, f)
rec = job.wait(600)
with open(%(out)r, "w") as f:
    json.dump({"state": rec.state, "error": rec.error, "result": rec.result, "logs": job.logs()}, f)
rt.close()
"""

# reads the registered version back through the registry, from a node
READ_BACK = """
import hashlib, json
from flywheel.registry import Registry
reg = Registry.open(%(registry)r, %(artifacts)r, cache_dir=%(cache)r)
mv = reg.resolve(%(ref)r)
print("RESULT", json.dumps({name: {"uri": art.uri,
                                   "sha256": hashlib.sha256(reg.read_artifact(mv.ref, name)).hexdigest()}
                            for name, art in mv.artifacts.items()}))
reg.close()
"""


def _s3fs(s3):
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=s3.endpoint, key="testing",
                             secret="testing", client_kwargs={"region_name": "us-east-1"})


def _latest_step(fs, prefix: str) -> int | None:
    """The step LATEST names in the job's checkpoint folder on S3, or None."""
    try:
        return json.loads(fs.cat_file(f"{prefix}/LATEST"))["step"]
    except FileNotFoundError:
        return None


def _jsonl(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def test_a_job_spread_over_both_nodes_checkpoints_to_s3_and_resumes_after_its_worker_node_dies(
        cluster, hosts, s3, postgres_dsn, tmp_path):
    artifacts = f"s3://{BUCKET}/artifacts"
    env = {"RAY_ADDRESS": cluster.address, "FLYWHEEL_HOME": str(tmp_path / "home"),
           "FLYWHEEL_REGISTRY_URI": postgres_dsn, "FLYWHEEL_ARTIFACTS_URI": artifacts}
    out = str(tmp_path / "driver.json")
    started = time.monotonic()
    driver = hosts.popen(1, [sys.executable, "-c", DRIVER % {"spec": repr(_spec(f"s3://{BUCKET}/jobs")), "out": out}],
                         env={**cluster.env, **env}, log=str(tmp_path / "driver.log"))
    job = wait_for(lambda: driver.poll() is None and _jsonl_once(out + ".job"), 120,
                   f"the job to be submitted (see {tmp_path}/driver.log)", every_s=0.5)
    placement_path = os.path.join(job["storage"], "placement.jsonl")
    prefix = f"{BUCKET}/jobs/spread-digits-{job['id']}/checkpoints"
    fs = _s3fs(s3)

    step = wait_for(lambda: driver.poll() is None and _latest_step(fs, prefix), 240,
                    f"a checkpoint on S3 (see {tmp_path}/driver.log)", every_s=0.2)
    first = _jsonl(placement_path)[0]["ranks"]
    assert sorted(r["ip"] for r in first) == sorted(hosts.addresses)  # one worker per node
    cluster.kill_node(2)  # the raylet and every process of its host, as a machine that dies
    killed = time.time()
    cluster.restart_node(2)
    rejoined_s = time.time() - killed

    wait_for(lambda: driver.poll() is not None, 420, f"the job to end (see {tmp_path}/driver.log)", every_s=1)
    total_s = time.monotonic() - started
    with open(out) as f:
        ended = json.load(f)
    assert ended["state"] == "succeeded", ended
    resumes = _jsonl(os.path.join(job["storage"], "attempts.jsonl"))
    assert resumes, ended["logs"]
    # from the checkpoint seen on S3 before the kill (or a later one), not
    # from step 0, and before the end: the kill cut training short
    assert resumes[0]["from_step"] >= step > 0, (resumes, step)
    assert resumes[0]["from_step"] < ended["result"]["global_step"], (resumes, ended["result"])
    attempts = _jsonl(placement_path)
    assert len(attempts) >= 2, attempts
    last = attempts[-1]["ranks"]
    assert sorted(r["ip"] for r in last) == sorted(hosts.addresses)
    # the worker node that came back is a new node at the same address
    worker = hosts.addresses[1]
    assert {r["node_id"] for r in last if r["ip"] == worker}.isdisjoint(
        {r["node_id"] for r in first if r["ip"] == worker})
    steps = sorted(int(p.rsplit("-", 1)[1]) for p in fs.ls(prefix, detail=False, refresh=True)
                   if p.rsplit("/", 1)[1].startswith("step-"))
    assert steps and steps[-1] == ended["result"]["global_step"]

    ref = ended["result"]["ref"]
    seen = {}
    for host in (1, 2):  # the registered model, read back through the registry from each node
        printed = cluster.python(host, READ_BACK % {"registry": postgres_dsn, "artifacts": artifacts, "ref": ref,
                                                     "cache": str(tmp_path / f"cache{host}")})
        seen[host] = _result(printed)
    assert set(seen[2]) >= {"model.onnx", "model.safetensors", "reference.npy"}
    assert all(a["uri"].startswith(f"s3://{BUCKET}/artifacts/") for a in seen[2].values())
    assert seen[1] == seen[2]
    print(f"\ncluster training: checkpoint at step {step} on S3, worker node killed; it rejoined "
          f"{rejoined_s:.1f} s after the kill, training resumed from step {resumes[0]['from_step']} "
          f"{resumes[0]['resumed_at'] - killed:.1f} s after the kill; the job took {total_s:.1f} s in all")


def _jsonl_once(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None
