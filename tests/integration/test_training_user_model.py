"""A training job on real Ray Train whose model, loss, metric and training
step are the user's, shipped as a folder with the job (the workers' runtime
working_dir): it trains a regression task, loses a worker process mid-run,
and ends with the same weights as an uninterrupted run; a factory that
returns no nn.Module fails the job at its start, naming the field."""

from __future__ import annotations

import os
import textwrap

import msgspec
import numpy as np
import pytest

from flywheel.common.settings import load_settings
from flywheel.registry import Registry
from flywheel.training.api import TrainingRuntime
from flywheel.training.checkpoint import CheckpointStore
from flywheel.training.loop import job_paths

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

# A user package: a model with no built-in counterpart, a Huber loss, a
# metric, and a step that adds input noise from torch's global generator
# (checkpointed, so an exact resume must restore it) and reports an extra
# scalar.
USER_MODULE = textwrap.dedent('''
    import torch


    class Regressor(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

        def forward(self, x):
            return self.body(x).squeeze(1)


    def make_net(width=16):
        return Regressor(width)


    def not_a_module():
        return {"weights": [1, 2, 3]}


    def huber(outputs, targets):
        return torch.nn.functional.smooth_l1_loss(outputs, targets)


    def within_one(outputs, targets):
        return float(((outputs - targets).abs() < 1.0).double().mean())


    def noisy_step(model, batch, ctx):
        x, y = batch
        pred = model(x + 0.01 * torch.randn_like(x))
        return {"loss": ctx.loss_fn(pred, y), "l1": (pred - y).abs().mean().detach()}
''')


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-code")
    (root / "tinyreg").mkdir()
    (root / "tinyreg" / "__init__.py").write_text("")
    (root / "tinyreg" / "net.py").write_text(USER_MODULE)
    return str(root)


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory):
    """Two runtimes on one job store: each runs one job at a time, so the
    reference and the faulted run train side by side (a Train run is
    mostly start-up, which overlaps well on a small machine)."""
    home = tmp_path_factory.mktemp("user-model-home")
    settings = msgspec.structs.replace(
        load_settings(), home=str(home), registry_uri=f"sqlite:///{home}/registry.db",
        artifacts_uri=str(home / "artifacts"), ray_address="",
    )
    pair = (TrainingRuntime(settings, stale_s=6.0), TrainingRuntime(settings, stale_s=6.0))
    yield pair
    for rt in pair:
        rt.close()


def user_spec(name: str, code: str, **over) -> dict:
    base = {
        "name": name,
        "code": code,
        "model": {"factory": "tinyreg.net:make_net", "kwargs": {"width": 16}},
        "task": "regression",
        "loss": "tinyreg.net:huber",
        "metrics": {"within_one": "tinyreg.net:within_one"},
        "train_step": "tinyreg.net:noisy_step",
        "resources": {"workers": 1, "cpus_per_worker": 1.0, "wait_s": 60},
        "epochs": 2, "batch_size": 64, "seed": 3,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "checkpoint": {"every_steps": 10, "every_epochs": 1, "keep": 2},
        "export": {"onnx": True, "register": True},
        "max_failures": 2,
    }
    base.update(over)
    return base


def _weights(job) -> dict:
    return CheckpointStore(job_paths(job.status().storage)["checkpoints"]).latest().model


def test_a_user_model_resumes_exactly_after_a_killed_worker_and_is_registered(runtimes, code):
    first, second = runtimes
    reference = first.submit(user_spec("user-ref", code))
    # the worker dies (os._exit) at step 15, after the step-10 checkpoint
    faulted = second.submit(user_spec("user-fault", code, fault={"kill_rank": 0, "at_step": 15},
                                      export={"onnx": False, "register": False}))
    rec = reference.wait(300)
    assert rec.state == "succeeded", reference.logs()
    frec = faulted.wait(300)
    assert frec.state == "succeeded", faulted.logs()
    assert "resumed from checkpoint at step 10" in faulted.logs()

    a, b = _weights(reference), _weights(faulted)
    assert a.keys() == b.keys() == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-6, worst

    ma, mb = reference.metrics(), faulted.metrics()
    assert [m["epoch"] for m in mb] == [1, 2]
    for x, y in zip(ma, mb):
        for key in ("loss", "train_l1", "val_loss", "val_mse", "val_mae", "val_within_one"):
            assert abs(x[key] - y[key]) <= 1e-6, (key, x, y)
    assert ma[-1]["val_mae"] < ma[0]["val_mae"] or ma[-1]["val_loss"] < ma[0]["val_loss"], ma

    # the registry flow: safetensors weights, an ONNX file, the factory in params
    assert "onnx" in rec.result, rec.result.get("onnx_error")
    reg = Registry.open(first.settings.registry_uri, first.settings.artifacts_uri)
    try:
        mv = reg.resolve(rec.result["ref"])
    finally:
        reg.close()
    assert set(mv.artifacts) >= {"model.safetensors", "model.onnx"}
    assert mv.params["factory"] == "tinyreg.net:make_net"
    assert mv.params["kwargs"] == {"width": 16}
    assert mv.signature["outputs"][0]["shape"] == [-1]
    assert "val_within_one" in mv.metrics

    # the registered version serves through backend torch and its factory
    # (what a model that could not export relies on), from its own code zip,
    # and answers as the ONNX file does
    import onnxruntime as ort

    from flywheel.runtime.backends.torch_backend import TorchModelConfig
    from flywheel.serving.config import ModelConfig, RegistryConfig
    from flywheel.serving.model_server import make_backend

    assert {"torch_model.json", "code.zip"} <= set(mv.artifacts)
    served = make_backend(
        ModelConfig(name="served", ref=mv.ref, artifact="model.safetensors", backend="torch",
                    torch=TorchModelConfig(factory="tinyreg.net:make_net")),
        RegistryConfig(uri=first.settings.registry_uri, artifacts=first.settings.artifacts_uri))
    served.load()
    try:
        x = np.random.default_rng(1).standard_normal((5, *mv.signature["inputs"][0]["shape"][1:])).astype(np.float32)
        got = served.infer({mv.signature["inputs"][0]["name"]: x})[mv.signature["outputs"][0]["name"]]
        onnx = ort.InferenceSession(rec.result["onnx"])
        want = onnx.run(None, {onnx.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    finally:
        served.close()


def test_a_factory_that_returns_no_module_fails_the_job_at_its_start(runtimes, code):
    job = runtimes[0].submit(user_spec("user-bad", code, model={"factory": "tinyreg.net:not_a_module"}))
    rec = job.wait(120)
    assert rec.state == "failed"
    assert "model.factory 'tinyreg.net:not_a_module'" in rec.error, rec.error
    assert "expected a torch.nn.Module" in rec.error, rec.error
    # it failed in the driver's check: no worker ever ran (no placement noted)
    assert not os.path.exists(job_paths(rec.storage)["placement"])
