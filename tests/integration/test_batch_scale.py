"""Batch inference beyond the session's Ray: a run whose whole process tree
(driver, its own local Ray, the actors) is held to a memory cap by a kernel
cgroup while it scores several times that much data, and a run on a Ray
cluster of two nodes that scores on both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _batch_data import linear_onnx

pytestmark = pytest.mark.integration

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))
CAP = 2 << 30


class MemoryCgroup:
    """A memory cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``)
    below this process's own; the processes put in it, and their children,
    are held to ``limit`` bytes by the kernel (no swap here)."""

    def __init__(self, limit: int) -> None:
        self.path, self.v2 = self._make()
        self.limit = limit
        if self.v2:
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0") if (self.path / "memory.swap.max").exists() else None
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))

    @staticmethod
    def _make() -> tuple[Path, bool]:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        name = f"fw-batch-{os.getpid()}"
        unified = Path("/sys/fs/cgroup/cgroup.controllers")
        if unified.exists() and "memory" in unified.read_text().split():
            own = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
            path = Path("/sys/fs/cgroup") / own.lstrip("/") / name
            v2 = True
        else:
            own = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), None)
            root = Path("/sys/fs/cgroup/memory")
            if own is None or not root.is_dir():
                pytest.skip("no memory cgroup controller here to cap the job with")
            path = root / own.lstrip("/") / name
            v2 = False
        try:
            path.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot make a memory cgroup at {path}: {exc}")
        return path, v2

    def enter(self) -> None:
        """preexec_fn: the child moves itself in before it execs."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text()) if (self.path / name).exists() else -1

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:  # processes still leaving
                import time

                time.sleep(0.2)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def test_a_run_scores_several_times_its_memory_cap(tmp_path):
    # 32 partitions' worth of files, 1M rows x 64 float32 each: 7.6 GiB once
    # decoded (what a driver that materialised the data would hold), 3.8x the
    # cap. The values repeat, so each file is 31 MiB on disk.
    rows, k, files = 1_000_000, 64, 32
    linear_onnx(tmp_path / "m.onnx", features=k, classes=1)
    (tmp_path / "in").mkdir()
    levels = np.arange(16, dtype=np.float32) / 16
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({f"f{j}": levels[rng.integers(0, 16, rows)] for j in range(k)}),
                   tmp_path / "in" / "c-000.parquet", row_group_size=131_072)
    for i in range(1, files):
        shutil.copyfile(tmp_path / "in" / "c-000.parquet", tmp_path / "in" / f"c-{i:03d}.parquet")
    decoded = rows * k * 4 * files
    assert decoded > 3.5 * CAP

    cg = MemoryCgroup(CAP)
    try:
        proc = subprocess.run(
            [FLYWHEEL, "predict", "--model", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "in"),
             "--output", str(tmp_path / "out"), "--actors", "2", "--json"],
            env=_clean_env(), cwd=tmp_path, preexec_fn=cg.enter, capture_output=True, text=True, timeout=600)
        oom, peak = cg.oom_kills(), cg.peak()
    finally:
        cg.remove()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert oom == 0, f"the kernel killed {oom} process(es) of the job at its {CAP >> 20} MiB cap"
    assert peak > 256 << 20  # the job's processes were charged to the capped cgroup, not left outside it
    report = json.loads(proc.stdout)
    assert report["rows"] == rows * files and report["failed"] == []
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "out").glob("*.parquet"))
    assert written == rows * files


_CLUSTER_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from flywheel.batch import predict

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        report = predict(sys.argv[1], sys.argv[2], sys.argv[3], keys=["id"], label="y", columns={"x": ["f*"]},
                         num_cpus=1, progress=False)
        print(json.dumps({"nodes": nodes, "used": report.nodes, "actors": report.actors, "rows": report.rows,
                          "accuracy": report.metrics.get("accuracy")}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_a_two_node_cluster_scores_on_every_node(tmp_path):
    from _batch_data import parquet_files

    # partitions that take a while (a slow model), so that the run outlasts
    # the second actor's start and both nodes get work
    linear_onnx(tmp_path / "m.onnx", features=8, classes=3, layers=3, hidden=512)
    parquet_files(tmp_path / "in", np.zeros((8, 3), np.float32), files=12, rows=8000, features=8)
    (tmp_path / "run.py").write_text(_CLUSTER_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "m.onnx"), str(tmp_path / "in"),
                           str(tmp_path / "out")], env=_clean_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got["nodes"]) == 2
    assert got["actors"] == 2 and got["used"] == got["nodes"]  # the pool, sized to the cluster, spans both
    assert got["rows"] == 12 * 8000 and 0 <= got["accuracy"] <= 1
