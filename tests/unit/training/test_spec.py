"""The typed job spec: defaults, validation naming the field, YAML, round trip."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.training.spec import (
    DatasetSpec,
    JobSpec,
    ModelSpec,
    ResourcesSpec,
    load_spec,
    parse_spec,
    spec_to_dict,
)

MINIMAL = {"name": "digits-mlp", "model": {"architecture": "mlp"}}


def _with(**overrides):
    return {**MINIMAL, **overrides}


def test_defaults():
    s = parse_spec(MINIMAL)
    assert (s.name, s.model.architecture, s.model.hparams) == ("digits-mlp", "mlp", {})
    assert (s.dataset.kind, s.dataset.path, s.dataset.features, s.dataset.label) == ("digits", "", (), "label")
    assert (s.dataset.validation_fraction, s.dataset.reference_rows) == (0.2, 500)
    assert (s.strategy, s.epochs, s.batch_size, s.seed, s.max_failures, s.priority, s.storage) == (
        "ddp", 5, 64, 0, 2, 0, "")
    assert s.resources == ResourcesSpec(workers=2, cpus_per_worker=1.0, gpus_per_worker=0.0, wait_s=120.0)
    assert (s.optimizer.name, s.optimizer.lr, s.optimizer.weight_decay, s.optimizer.momentum) == (
        "adamw", 1e-3, 0.0, 0.0)
    assert (s.schedule.kind, s.schedule.step_epochs, s.schedule.gamma, s.schedule.min_lr) == (
        "constant", 1, 0.1, 0.0)
    assert (s.checkpoint.every_steps, s.checkpoint.every_epochs, s.checkpoint.keep) == (0, 1, 2)
    assert (s.export.onnx, s.export.register, s.export.model_name, s.export.canary_url, s.export.canary) == (
        True, True, "", "", {})
    assert (s.fault.kill_rank, s.fault.at_step, s.fault.enabled) == (-1, -1, False)
    assert s.model_name == "digits-mlp"
    assert (s.resources.total_cpus, s.resources.total_gpus) == (2.0, 0.0)
    assert s.resources.placement == "pack"


def test_python_construction_validates_too():
    with pytest.raises(ConfigError, match="resources.workers"):
        JobSpec(name="j", model=ModelSpec("mlp"), resources=ResourcesSpec(workers=0))
    assert JobSpec(name="j", model=ModelSpec("mlp")).batch_size == 64


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"name": "bad name"}, ["name 'bad name'", "must match"]),
        ({"model": {"architecture": "resnet"}}, ["model.architecture 'resnet'", "mlp", "small_cnn", "$.model"]),
        ({"model": {"architecture": "mlp", "hparams": {"hiden": [8]}}},
         ["model.hparams", "'hiden'", "in_features, hidden, out_features"]),
        ({"model": {}}, ["architecture", "$.model"]),
        ({"dataset": {"kind": "sql"}}, ["dataset.kind 'sql'", "digits, parquet, csv, ray", "$.dataset"]),
        ({"dataset": {"kind": "parquet"}}, ["dataset.path is required", "parquet"]),
        ({"dataset": {"path": "/data/x.csv"}}, ["dataset.path", "dataset.kind"]),
        ({"dataset": {"kind": "csv", "path": "x.csv", "features": ["a", "label"]}}, ["dataset.features", "label"]),
        ({"dataset": {"kind": "csv", "path": "x.csv", "features": ["a", "a"]}}, ["dataset.features", "twice"]),
        ({"dataset": {"label": ""}}, ["dataset.label"]),
        ({"dataset": {"validation_fraction": 0.95}}, ["dataset.validation_fraction", "[0, 0.9]"]),
        ({"dataset": {"reference_rows": -1}}, ["dataset.reference_rows", ">= 0"]),
        ({"strategy": "zero3"}, ["strategy 'zero3'", "ddp, fsdp"]),
        ({"resources": {"workers": 0}}, ["resources.workers", ">= 1", "$.resources"]),
        ({"resources": {"cpus_per_worker": 0}}, ["resources.cpus_per_worker", "> 0"]),
        ({"resources": {"gpus_per_worker": -1}}, ["resources.gpus_per_worker", ">= 0"]),
        ({"resources": {"wait_s": 0}}, ["resources.wait_s", "> 0"]),
        ({"resources": {"placement": "everywhere"}}, ["resources.placement 'everywhere'", "strict_spread"]),
        ({"resources": {"wait_s": float("inf")}}, ["resources.wait_s", "finite"]),
        ({"resources": {"workers": "two"}}, ["$.resources.workers"]),
        ({"epochs": 0}, ["epochs must be >= 1"]),
        ({"batch_size": 0}, ["batch_size must be >= 1"]),
        ({"optimizer": {"name": "lamb"}}, ["optimizer.name 'lamb'", "sgd, adam, adamw"]),
        ({"optimizer": {"lr": 0}}, ["optimizer.lr", "> 0", "$.optimizer"]),
        ({"optimizer": {"lr": float("nan")}}, ["optimizer.lr"]),
        ({"optimizer": {"weight_decay": -0.1}}, ["optimizer.weight_decay", ">= 0"]),
        ({"optimizer": {"name": "sgd", "momentum": 1.0}}, ["optimizer.momentum", "[0, 1)"]),
        ({"optimizer": {"name": "adam", "momentum": 0.9}}, ["optimizer.momentum", "sgd only"]),
        ({"schedule": {"kind": "linear"}}, ["schedule.kind 'linear'", "constant, step, cosine"]),
        ({"schedule": {"kind": "step", "step_epochs": 0}}, ["schedule.step_epochs", ">= 1"]),
        ({"schedule": {"kind": "step", "gamma": 0}}, ["schedule.gamma", "(0, 1]"]),
        ({"schedule": {"min_lr": -1}}, ["schedule.min_lr", ">= 0"]),
        ({"schedule": {"kind": "cosine", "min_lr": 0.1}}, ["schedule.min_lr", "optimizer.lr"]),
        ({"checkpoint": {"every_steps": -1}}, ["checkpoint.every_steps", ">= 0"]),
        ({"checkpoint": {"every_epochs": -1}}, ["checkpoint.every_epochs", ">= 0"]),
        ({"checkpoint": {"every_epochs": 0}}, ["checkpoint.every_steps", "checkpoint.every_epochs"]),
        ({"checkpoint": {"keep": 0}}, ["checkpoint.keep", ">= 1"]),
        ({"max_failures": -1}, ["max_failures must be >= 0"]),
        ({"priority": 2**40}, ["priority must lie in"]),
        ({"export": {"model_name": "bad name"}}, ["export.model_name 'bad name'"]),
        ({"export": {"canary_url": "localhost:8000"}}, ["export.canary_url", "http://"]),
        ({"export": {"canary_url": "http://h:8000", "register": False}}, ["export.canary_url", "export.register"]),
        ({"export": {"canary": {"steps": [10, 50]}}}, ["export.canary", "canary_url"]),
        ({"fault": {"kill_rank": 0}}, ["fault.kill_rank", "fault.at_step"]),
        ({"fault": {"kill_rank": -2, "at_step": -2}}, ["fault.kill_rank", ">= -1"]),
        ({"fault": {"kill_rank": 2, "at_step": 5}}, ["fault.kill_rank 2", "[0, 1]"]),
        ({"model": {"architecture": "mlp", "factory": "pkg.mod:make"}},
         ["exactly one of model.architecture", "model.factory", "$.model"]),
        ({"model": {"factory": "pkg/mod.py"}}, ["model.factory 'pkg/mod.py'", "'package.module:callable'"]),
        ({"model": {"factory": "pkg.mod:make", "hparams": {"a": 1}}}, ["model.hparams", "model.kwargs"]),
        ({"model": {"architecture": "mlp", "kwargs": {"a": 1}}}, ["model.kwargs", "model.hparams"]),
        ({"model": {"factory": "pkg.mod:make", "input_shape": [1, 0]}}, ["model.input_shape", ">= 1"]),
        ({"task": "ranking"}, ["task 'ranking'", "classification, regression"]),
        ({"loss": "losses.huber"}, ["loss 'losses.huber'", "'package.module:callable'"]),
        ({"train_step": "steps:"}, ["train_step 'steps:'", "import path"]),
        ({"metrics": {"r2": "m.py"}}, ["metrics.r2 'm.py'", "import path"]),
        ({"metrics": {"bad name": "m:f"}}, ["metrics: name 'bad name'", "identifier"]),
        ({"metrics": {"accuracy": "m:f"}}, ["metrics.accuracy", "already reported", "'classification'"]),
        ({"task": "regression", "metrics": {"mae": "m:f"}}, ["metrics.mae", "already reported"]),
        ({"colour": "red"}, ["unknown field `colour`"]),
        ({"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}}, ["unknown field `betas`", "$.optimizer"]),
    ],
)
def test_invalid_spec_names_the_field(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        parse_spec(_with(**overrides))
    for fragment in fragments:
        assert fragment in info.value.message


def test_missing_required_fields_are_named():
    with pytest.raises(ConfigError, match="missing required field `model`"):
        parse_spec({"name": "j"})
    with pytest.raises(ConfigError, match="Expected `object`"):
        parse_spec(None)


def test_batch_size_must_divide_evenly_across_workers():
    with pytest.raises(ConfigError) as info:
        parse_spec(_with(batch_size=64, resources={"workers": 3}))
    assert "batch_size 64" in info.value.message
    assert "resources.workers (3)" in info.value.message
    assert "e.g. 63" in info.value.message
    assert parse_spec(_with(batch_size=63, resources={"workers": 3})).batch_size == 63


def test_valid_non_default_choices():
    s = parse_spec(_with(
        model={"architecture": "small_cnn", "hparams": {"channels": 1, "size": 8}},
        dataset={"kind": "parquet", "path": "s3://bucket/train/*.parquet", "features": ["a", "b"], "label": "y"},
        strategy="fsdp", optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        schedule={"kind": "cosine", "min_lr": 1e-4}, checkpoint={"every_steps": 100, "every_epochs": 0},
        export={"model_name": "digits", "canary_url": "http://127.0.0.1:8000", "canary": {"steps": [10, 100]}},
        fault={"kill_rank": 1, "at_step": 3}, priority=-5,
    ))
    assert s.dataset.features == ("a", "b")
    assert s.model_name == "digits"
    assert s.fault.enabled
    assert parse_spec(_with(dataset={"kind": "ray"})).dataset == DatasetSpec(kind="ray")
    for placement in ("pack", "spread", "strict_spread"):
        assert parse_spec(_with(resources={"placement": placement})).resources.placement == placement


def test_a_user_model_and_objective_by_import_path():
    s = parse_spec(_with(model={"factory": "mypkg.models:make_net", "kwargs": {"width": 32}, "input_shape": [1, 8, 8]},
                         code="/jobs/src", task="regression", loss="mypkg.losses:huber",
                         metrics={"within_1": "mypkg.metrics:within_1"}, train_step="mypkg.steps:Step.run"))
    assert (s.model.architecture, s.model.factory, s.model.kwargs, s.model.input_shape) == (
        "", "mypkg.models:make_net", {"width": 32}, (1, 8, 8))
    assert (s.code, s.task, s.loss, s.train_step) == ("/jobs/src", "regression", "mypkg.losses:huber",
                                                      "mypkg.steps:Step.run")
    assert parse_spec(spec_to_dict(s)) == s
    # defaults: today's classifier, no user code
    d = parse_spec(MINIMAL)
    assert (d.code, d.task, d.loss, d.metrics, d.train_step) == ("", "classification", "", {}, "")


def test_submit_checks_and_absolutizes_the_code_folder(tmp_path, monkeypatch):
    from flywheel.training.api import _with_code_folder

    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    s = _with_code_folder(parse_spec(_with(code="src")))
    assert s.code == str(tmp_path / "src")
    with pytest.raises(ConfigError, match="code 'nowhere': no such folder"):
        _with_code_folder(parse_spec(_with(code="nowhere")))


def test_a_job_files_code_folder_is_relative_to_the_file(tmp_path):
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "job.yaml"
    path.write_text("name: j\nmodel: {factory: 'pkg.mod:make'}\ncode: src\n")
    assert load_spec(path).code == str(tmp_path / "jobs" / "src")


def test_round_trip_to_dict_and_back():
    s = parse_spec(_with(dataset={"kind": "csv", "path": "d/*.csv", "features": ["x1", "x2"]},
                         model={"architecture": "mlp", "hparams": {"in_features": 2, "hidden": [4]}},
                         export={"canary_url": "https://fw:8000", "canary": {"steps": [5]}}))
    d = spec_to_dict(s)
    assert d["dataset"]["features"] == ["x1", "x2"]  # lists: equal after a JSON trip
    assert msgspec.json.decode(msgspec.json.encode(d)) == d
    assert parse_spec(d) == s
    assert spec_to_dict(parse_spec(d)) == d


def test_yaml_file_loads(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: digits-mlp\n"
        "model: {architecture: mlp, hparams: {in_features: 64, hidden: [128, 64], out_features: 10}}\n"
        "resources: {workers: 4, cpus_per_worker: 0.5}\n"
        "batch_size: 128\n"
        "optimizer: {lr: 3.0e-4}\n"
    )
    s = load_spec(path)
    assert (s.resources.workers, s.batch_size, s.optimizer.lr) == (4, 128, 3e-4)
    assert s.model.hparams["hidden"] == [128, 64]


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("name: j\nmodel: [\n", ["not valid YAML"]),
        ("name: j\nmodel: {architecture: mlp}\nepochs: 0\n", ["epochs must be >= 1"]),
        ("name: j\nmodel: {architecture: mlp}\noptimizer: {lr: -1}\n", ["optimizer.lr", "$.optimizer"]),
        ("", ["Expected `object`, got `null`"]),
    ],
)
def test_bad_yaml_file_names_the_file(tmp_path, text, fragments):
    path = tmp_path / "bad-job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(path) in info.value.message
    for fragment in fragments:
        assert fragment in info.value.message


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read job spec .*nope.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_loading_a_spec_does_not_import_ray(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: j\nmodel: {architecture: mlp}\n")
    code = ("import sys; from flywheel.training.spec import load_spec; from flywheel.training.jobs import JobStore; "
            f"load_spec({str(path)!r}); assert 'ray' not in sys.modules, 'ray was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
