"""Training on data streamed by Ray Data (training/streamed.py): a driver
held to a memory cap trains on an npy data set several times that size,
and an image folder with a user transform trains a small CNN, survives a
killed worker and is registered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import yaml

from flywheel.common.settings import load_settings
from flywheel.registry import Registry
from flywheel.training.api import TrainingRuntime
from flywheel.training.loop import job_paths
from flywheel.training.stream_rows import held_out, path_keys
from flywheel.training.streamed import files_fingerprint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))
DRIVER_CAP = 512 << 20  # the driver peaks at ~250 MiB here
MINIMAL_JOB = {"name": "streamed", "model": {"architecture": "mlp", "hparams": {"in_features": 1, "hidden": [4],
                                                                               "out_features": 2}}}


class DriverCgroup:
    """A memory cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``)
    below this process's own, for one driver process: the session's Ray
    (its raylet, workers, object store) runs outside it, so only what the
    driver itself holds counts against ``limit``."""

    def __init__(self, limit: int) -> None:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        name = f"fw-train-driver-{os.getpid()}"
        unified = Path("/sys/fs/cgroup/cgroup.controllers")
        if unified.exists() and "memory" in unified.read_text().split():
            own = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
            self.path, self.v2 = Path("/sys/fs/cgroup") / own.lstrip("/") / name, True
        else:
            own = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), None)
            if own is None or not Path("/sys/fs/cgroup/memory").is_dir():
                pytest.skip("no memory cgroup controller here to cap the driver with")
            self.path, self.v2 = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / name, False
        try:
            self.path.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot make a memory cgroup at {self.path}: {exc}")
        limit_file = "memory.max" if self.v2 else "memory.limit_in_bytes"
        (self.path / limit_file).write_text(str(limit))
        swap = self.path / ("memory.swap.max" if self.v2 else "memory.memsw.limit_in_bytes")
        if swap.exists():
            swap.write_text("0" if self.v2 else str(limit))

    def enter(self) -> None:
        """preexec_fn: the child moves itself in before it execs."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)

    def peak(self) -> int:
        return int((self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")).read_text())

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:  # the driver's process is still leaving
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _npy_set(root: Path, pairs: int, rows: int, width: int) -> int:
    """``pairs`` features/labels file pairs (hard links of one pair: the
    disk holds one) of two classes told apart by their features' level; the
    bytes of features a driver would hold if it loaded them."""
    (root / "x").mkdir()
    (root / "y").mkdir()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, rows)
    x = (rng.random((rows, width)) - 0.5 + (y[:, None] - 0.5) / 2).astype(np.float32)  # class 1's are higher
    np.save(root / "x" / "part-000.npy", x)
    np.save(root / "y" / "part-000.npy", y)
    for i in range(1, pairs):
        os.link(root / "x" / "part-000.npy", root / "x" / f"part-{i:03d}.npy")
        os.link(root / "y" / "part-000.npy", root / "y" / f"part-{i:03d}.npy")
    return pairs * x.nbytes


def test_a_driver_capped_below_the_data_trains_on_it_streamed(tmp_path):
    import ray

    data_bytes = _npy_set(tmp_path, pairs=24, rows=16384, width=1024)  # 24 x 64 MiB = 1.5 GiB
    assert data_bytes >= 3 * DRIVER_CAP
    job = {
        "name": "npy-capped",
        "model": {"architecture": "mlp", "hparams": {"in_features": 1024, "hidden": [8], "out_features": 2}},
        "dataset": {"kind": "npy", "path": str(tmp_path / "x"), "labels_path": str(tmp_path / "y"),
                    "validation_fraction": 0.02, "reference_rows": 50},
        "resources": {"workers": 2, "cpus_per_worker": 1.0, "wait_s": 60},
        "epochs": 1, "batch_size": 2048, "seed": 1,
        "optimizer": {"name": "adam", "lr": 0.01},
        "checkpoint": {"every_epochs": 1, "keep": 1},
        "export": {"onnx": False, "register": True},
        "max_failures": 0,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    home = tmp_path / "home"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "FLYWHEEL_HOME": str(home)}
    cg = DriverCgroup(DRIVER_CAP)
    try:
        proc = subprocess.run([FLYWHEEL, "train", str(tmp_path / "job.yaml")], env=env, cwd=tmp_path,
                              preexec_fn=cg.enter, capture_output=True, text=True, timeout=300)
        oom, peak = cg.oom_kills(), cg.peak()
    finally:
        cg.remove()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert oom == 0, f"the kernel killed the driver at its {DRIVER_CAP >> 20} MiB cap"
    assert peak > 128 << 20  # the driver was charged to the capped cgroup
    assert "succeeded" in proc.stdout
    reg = Registry.open(f"sqlite://{home}/registry.db", str(home / "artifacts"))
    try:
        version = reg.get_version("npy-capped", 1)
    finally:
        reg.close()
    # the rows are learnable: a model that saw them (not a fraction) gets them right
    assert version.metrics["val_accuracy"] > 0.9
    assert version.lineage.data_fingerprint == files_fingerprint(
        "npy", sorted(str(p) for p in (tmp_path / "x").iterdir()) + sorted(str(p) for p in (tmp_path / "y").iterdir()))


_USER_TRANSFORM = '''
import numpy as np

def shift(x):
    with open({log!r}, "a") as f:
        f.write(" ".join(map(str, x.shape)) + "\\n")
    return np.clip(x + np.float32(0.01), 0, 1)
'''


def _image_folder(root: Path, per_class: int) -> list[str]:
    """3 classes of 8x8 grayscale PNGs: dark, bright, striped."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for label, name in enumerate(["dark", "light", "stripes"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(0, 40, (8, 8))
            pixels = [noise, 215 + noise, np.where(np.arange(8) % 2 == 0, 230, 10)[None, :] + 0 * noise][label]
            path = root / name / f"{i:03d}.png"
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
            paths.append(str(path))
    return paths


def test_an_image_folder_with_a_transform_trains_resumes_and_is_registered(tmp_path):
    paths = _image_folder(tmp_path / "images", per_class=16)
    code = tmp_path / "code"
    (code / "aug").mkdir(parents=True)
    (code / "aug" / "__init__.py").write_text("")
    (code / "aug" / "ops.py").write_text(_USER_TRANSFORM.format(log=str(tmp_path / "transform.log")))
    home = tmp_path / "home"
    settings = msgspec.structs.replace(load_settings(), home=str(home), registry_uri=f"sqlite:///{home}/registry.db",
                                       artifacts_uri=str(home / "artifacts"), ray_address="")
    fraction, seed, workers, batch, epochs = 0.25, 2, 2, 8, 1
    rt = TrainingRuntime(settings)
    try:
        job = rt.submit({
            "name": "shapes", "code": str(code),
            "model": {"architecture": "small_cnn", "hparams": {"channels": 1, "size": 8, "classes": 3, "width": 8}},
            "dataset": {"kind": "images", "path": str(tmp_path / "images"), "image_size": [8, 8],
                        "image_mode": "grayscale", "transform": "aug.ops:shift",
                        "validation_fraction": fraction, "reference_rows": 10},
            "resources": {"workers": workers, "cpus_per_worker": 1.0, "wait_s": 60},
            "epochs": epochs, "batch_size": batch, "seed": seed,
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_steps": 2, "every_epochs": 1, "keep": 2},
            "fault": {"kill_rank": 1, "at_step": 3},
            "export": {"onnx": True, "register": True},
            "max_failures": 1,
        })
        rec = job.wait(240)
    finally:
        rt.close()
    assert rec.state == "succeeded", job.logs()[-3000:]
    result = rec.result
    # the split the job used, from the file paths alone
    rel = [os.path.relpath(p, tmp_path / "images") for p in paths]
    train_rows = int((~held_out(path_keys(rel), seed, fraction)).sum())
    steps_per_epoch = (train_rows // workers) // (batch // workers)  # equal shards, full batches only
    # the killed worker's attempt resumed from its step-2 checkpoint and went
    # on to exactly the steps an unbroken run takes
    assert os.path.exists(job_paths(rec.storage)["fault"])
    assert "resumed from checkpoint at step 2" in job.logs()
    assert result["global_step"] == epochs * steps_per_epoch
    assert [row["epoch"] for row in job.metrics()] == [1]
    # the transform was checked on two sample rows in the driver, then ran
    # on the workers on every training batch (one rank's share) they trained
    calls = (tmp_path / "transform.log").read_text().splitlines()
    assert calls[0] == "2 1 8 8"
    assert set(calls[1:]) == {f"{batch // workers} 1 8 8"}
    assert len(calls) - 1 >= workers * epochs * steps_per_epoch
    reference = np.load(os.path.join(job_paths(rec.storage)["output"], "reference.npy"))
    assert reference.shape == (10, 64)
    assert reference.min() >= 0 and reference.max() <= 1
    reg = Registry.open(settings.registry_uri, settings.artifacts_uri)
    try:
        version = reg.get_version("shapes", 1)
    finally:
        reg.close()
    assert result["ref"] == version.ref
    assert version.lineage.data_fingerprint == files_fingerprint("images", paths, "[8, 8] grayscale "
                                                                 "['dark', 'light', 'stripes']")


def test_streamed_parquet_splits_every_row_once_without_loading_it_in_the_driver(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flywheel.training.spec import DatasetSpec
    from flywheel.training.streamed import open_streamed

    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        a, b = rng.random(300), rng.random(300)
        files.append(tmp_path / f"part-{i}.parquet")
        pq.write_table(pa.table({"a": a, "b": b, "label": (a > b).astype(np.int64) + 2 * i}), files[-1])
    spec = DatasetSpec(kind="parquet", path=str(tmp_path), stream=True, validation_fraction=0.25, reference_rows=20)
    data = open_streamed(spec, seed=5)
    assert data.streamed
    assert data.n_train + data.n_val == 600
    assert 100 < data.n_val < 200
    assert data.n_classes == 4  # labels 0..3, from the streamed pass
    assert data.x_train.shape[1:] == (2,) and 2 <= len(data.x_train) <= 20
    assert data.row_shape == (2,)
    assert data.fingerprint == files_fingerprint("parquet", [str(f) for f in files], "['a', 'b'] label")
    rows = {}
    for split in ("train", "validation"):
        got = [(tuple(r["x"].tolist()), int(r["y"])) for r in data.datasets[split].iter_rows()]
        rows[split] = got
    assert len(rows["train"]) == data.n_train
    assert len(rows["validation"]) == data.n_val
    table = pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()
    every = sorted(((np.float32(a).item(), np.float32(b).item()), y)
                   for a, b, y in zip(table["a"], table["b"], table["label"]))
    assert sorted(rows["train"] + rows["validation"]) == every


def test_a_ray_dataset_is_written_out_by_ray_data_and_keeps_stream(tmp_path):
    import pyarrow.parquet as pq
    import ray

    home = tmp_path / "home"
    settings = msgspec.structs.replace(load_settings(), home=str(home), registry_uri=f"sqlite:///{home}/registry.db",
                                       artifacts_uri=str(home / "artifacts"), ray_address="")
    rows = ray.data.range(120, override_num_blocks=3).map_batches(
        lambda b: {"a": b["id"].astype(np.float32), "label": b["id"] % 2}, batch_format="numpy")
    rt = TrainingRuntime(settings)
    try:
        job = rt.submit({**MINIMAL_JOB, "dataset": {"kind": "ray", "stream": True}}, dataset=rows, run=False)
        dataset = job.status().spec["dataset"]
    finally:
        rt.close()
    assert (dataset["kind"], dataset["stream"]) == ("parquet", True)
    files = sorted(Path(dataset["path"]).glob("*.parquet"))
    assert len(files) >= 1
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 120
