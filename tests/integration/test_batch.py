"""Batch inference on a real Ray: the CLI against the registry's model,
evaluation recorded and used by a promotion gate, the torch backend, a
driver killed mid-run and resumed, and a corrupt file mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _batch_data import features_of, linear_onnx, parquet_files
from _poll import wait_for

pytestmark = pytest.mark.integration

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


def _env(registry=None) -> dict:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "FLYWHEEL_ACTOR": "evaluator"}
    if registry is not None:
        env.update(FLYWHEEL_REGISTRY_URI=registry.uri, FLYWHEEL_ARTIFACTS_URI=registry.artifacts)
    return env


def _digits_holdout(folder: Path, files: int = 3) -> tuple[np.ndarray, np.ndarray]:
    from flywheel.training.digits import load_digits_split

    _, _, x, y = load_digits_split(0)
    folder.mkdir(parents=True)
    for i, (xs, ys, ids) in enumerate(zip(np.array_split(x, files), np.array_split(y, files),
                                          np.array_split(np.arange(len(x)), files))):
        pq.write_table(pa.table({"id": ids, **{f"px{j}": xs[:, j] for j in range(64)}, "digit": ys}),
                       folder / f"holdout-{i}.parquet")
    return x, y


def _read(folder: Path):
    return pq.read_table(folder, columns=None).sort_by("id")


def test_the_cli_scores_evaluates_and_records_and_a_gate_uses_it(ray_session, demo_registry, tmp_path):
    import onnxruntime as ort

    from flywheel.registry import Registry, parse_policy

    x, y = _digits_holdout(tmp_path / "holdout")
    proc = subprocess.run(
        [FLYWHEEL, "predict", "--model", "digits@production", "--input", str(tmp_path / "holdout"),
         "--output", str(tmp_path / "scored"), "--keys", "id", "--label", "digit", "--map", "input=px*",
         "--register", "--dataset", "digits-holdout", "--actors", "2", "--num-cpus", "0.5", "--json"],
        env=_env(demo_registry), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows"] == len(x) and report["partitions"] == 3 and report["failed"] == []
    assert "batch: 3/3 partitions" in proc.stderr  # the progress line
    reg = Registry.open(demo_registry.uri, demo_registry.artifacts)
    try:
        mv = reg.resolve("digits@production")
        path = reg.artifact_path(mv.ref, "model.onnx")[1]
        (ev,) = reg.evaluations(mv.name, mv.version, dataset="digits-holdout")
        policy = {"rules": [{"rule": "evaluated_on", "dataset": "digits-holdout", "metric": "accuracy", "min": 0.8}]}
        reg.set_policy("digits", parse_policy(policy), actor="tests")
        assert reg.check_gates(mv.name, mv.version) == []
        strict = {"rules": [{"rule": "evaluated_on", "dataset": "digits-holdout", "metric": "accuracy", "min": 1.01}]}
        reg.set_policy("digits", parse_policy(strict), actor="tests")
        assert "evaluated_on: accuracy" in reg.check_gates(mv.name, mv.version)[0]
        reg.set_policy("digits", parse_policy({"rules": []}), actor="tests")
    finally:
        reg.close()
    table = _read(tmp_path / "scored")
    logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
    want = ort.InferenceSession(path).run(None, {"input": x})[0]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    accuracy = float(np.mean(want.argmax(1) == y))
    assert report["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert ev.metrics["accuracy"] == pytest.approx(accuracy) and ev.rows == len(x)
    assert ev.fingerprint == report["dataset_fingerprint"] and len(ev.fingerprint) == 64
    assert ev.run_id == report["run_id"] and ev.created_by == "evaluator"
    assert set(table.column("model_version").to_pylist()) == {mv.ref}


def test_the_torch_backend_scores_the_same_version(ray_session, demo_registry, tmp_path):
    from flywheel.batch import predict

    x, _ = _digits_holdout(tmp_path / "holdout", files=2)
    common = dict(keys=["id"], columns={"input": ["px*"]}, actors=1, num_cpus=0.5, progress=False,
                  registry=demo_registry.uri, artifacts=demo_registry.artifacts)
    onnx = predict("digits@production", str(tmp_path / "holdout"), str(tmp_path / "onnx"), **common)
    torch = predict("digits@production", str(tmp_path / "holdout"), str(tmp_path / "torch"), backend="torch",
                    **common)
    assert onnx.ok and torch.ok and torch.rows == len(x)
    a = np.stack(_read(tmp_path / "onnx").column("logits").to_numpy(zero_copy_only=False))
    b = np.stack(_read(tmp_path / "torch").column("logits").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _slow_job(tmp_path: Path) -> list[str]:
    # 24 partitions of a deliberately slow model on one actor: long enough
    # to kill the driver with some partitions written and some not
    w = linear_onnx(tmp_path / "slow.onnx", features=16, classes=4, layers=3, hidden=512)
    assert w.shape == (512, 4)
    parquet_files(tmp_path / "in", np.zeros((16, 4), np.float32), files=24, rows=4000, row_group=4000,
                  features=16)
    return ["--model", str(tmp_path / "slow.onnx"), "--input", str(tmp_path / "in"), "--keys", "id",
            "--map", "x=f*", "--actors", "1", "--num-cpus", "0.5", "--batch-rows", "256"]


def test_a_killed_driver_resumes_with_no_duplicate_or_missing_row(ray_session, tmp_path):
    from flywheel.batch import predict

    args = _slow_job(tmp_path)
    out = tmp_path / "out"
    cli = subprocess.Popen([FLYWHEEL, "predict", *args, "--output", str(out)], env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(out.glob("*.parquet"))) >= 3 or cli.poll() is not None, 240,
                 "three partitions written")
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait(30)
    written = len(list(out.glob("*.parquet")))
    assert 3 <= written < 24, f"the run ended before it could be killed ({written} written): {cli.stderr.read()}"
    manifest = json.loads((out / "_flywheel" / "manifest.json").read_text())

    proc = subprocess.run([FLYWHEEL, "predict", *args, "--output", str(out), "--json"], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["run_id"] == manifest["run_id"]  # the same run, resumed
    assert report["skipped"] >= written and report["skipped"] + report["scored"] == 24
    assert not list((out / "_flywheel" / "tmp").iterdir())  # the killed run's half-written file is gone

    whole = predict(str(tmp_path / "slow.onnx"), str(tmp_path / "in"), str(tmp_path / "whole"), keys=["id"],
                    columns={"x": ["f*"]}, actors=1, num_cpus=0.5, progress=False)
    assert whole.ok
    resumed, once = _read(out), _read(tmp_path / "whole")
    ids = resumed.column("id").to_numpy()
    assert len(ids) == 24 * 4000 and len(np.unique(ids)) == len(ids)  # no duplicate, no gap
    assert np.array_equal(ids, once.column("id").to_numpy())
    for col in ("source", "row", "logits"):
        assert resumed.column(col).to_pylist() == once.column(col).to_pylist(), col


def test_a_corrupt_file_mid_run_fails_its_partition_and_a_rerun_retries_it(ray_session, tmp_path):
    from flywheel.batch import predict

    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=4, rows=500, row_group=500)
    good = (tmp_path / "in" / "part-2.parquet").read_bytes()
    # the footer (what the pre-run check reads) is intact; the data pages are not
    (tmp_path / "in" / "part-2.parquet").write_bytes(good[:100] + b"\xff" * 2000 + good[2100:])
    kw = dict(keys=["id"], label="y", actors=2, num_cpus=0.5, progress=False)
    first = predict(str(tmp_path / "m.onnx"), str(tmp_path / "in"), str(tmp_path / "out"), **kw)
    assert [f.source for f in first.failed] == ["part-2.parquet"], first.failed
    assert "part-2.parquet" in first.failed[0].error
    assert first.scored == 3 and first.rows == 1500 and first.metrics == {}  # no metrics over a partial run
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 3
    report = json.loads((tmp_path / "out" / "_flywheel" / "report.json").read_text())
    assert report["failed"][0]["source"] == "part-2.parquet"

    (tmp_path / "in" / "part-2.parquet").write_bytes(good)  # mended
    second = predict(str(tmp_path / "m.onnx"), str(tmp_path / "in"), str(tmp_path / "out"), **kw)
    assert second.ok and second.skipped == 3 and second.scored == 1 and second.run_id == first.run_id
    assert second.metrics["accuracy"] == 1.0 and second.metrics["rows"] == 2000
    table = _read(tmp_path / "out")
    assert table.column("id").to_pylist() == list(range(2000))
    x = features_of(_read(tmp_path / "in"), 8)
    np.testing.assert_allclose(np.stack(table.column("logits").to_numpy(zero_copy_only=False)), x @ w,
                               rtol=1e-4, atol=1e-4)


def test_more_actors_than_the_cluster_holds_is_refused_not_awaited(ray_session, tmp_path):
    import ray

    from flywheel.batch import predict
    from flywheel.protocol.errors import UnavailableError

    w = linear_onnx(tmp_path / "m.onnx")
    parquet_files(tmp_path / "in", w, files=2, rows=10)
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(UnavailableError, match=f"actors {int(cpus) + 1} x num_cpus 1 .* the cluster has {cpus:g}"):
        predict(str(tmp_path / "m.onnx"), str(tmp_path / "in"), str(tmp_path / "o"), keys=["id"], label="y",
                actors=int(cpus) + 1, progress=False)


def test_a_scoring_actor_killed_mid_partition_is_replaced_and_its_partition_retried(ray_session, tmp_path):
    import threading

    import psutil

    from flywheel.batch import predict

    _slow_job(tmp_path)
    out = tmp_path / "out"
    result = {}
    job = threading.Thread(target=lambda: result.update(report=predict(
        str(tmp_path / "slow.onnx"), str(tmp_path / "in"), str(out), keys=["id"], columns={"x": ["f*"]},
        actors=1, num_cpus=0.5, batch_rows=256, progress=False)))
    job.start()
    try:
        wait_for(lambda: len(list(out.glob("*.parquet"))) >= 2, 240, "two partitions written")

        def scorer() -> psutil.Process | None:
            return next((p for p in psutil.process_iter(["cmdline"])
                         if "PartitionScorer" in " ".join(p.info["cmdline"] or ())), None)

        victim = wait_for(scorer, 30, "the scoring actor's process")
        victim.kill()  # mid-partition: a native crash or the OOM killer, as the actor sees it
    finally:
        job.join(600)
    report = result["report"]
    assert report.ok and report.scored == 24, report.failed
    ids = _read(out).column("id").to_numpy()
    assert len(ids) == 24 * 4000 and len(np.unique(ids)) == len(ids)
