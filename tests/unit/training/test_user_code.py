"""User code in a training job without Ray: import paths resolved from a
shipped folder, the driver's start-of-job check naming the bad field, the
objective's losses and metrics, the train_step contract, float labels for
regression, the code package the workers get, and the export of a factory
model."""

from __future__ import annotations

import os
import sys
import textwrap
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flywheel.protocol.errors import ConfigError, InvalidInputError
from flywheel.training.code_package import code_digest, pack_code
from flywheel.training.data import JobData, load_data
from flywheel.training.runner import _final_model, check_model, worker_runtime_env
from flywheel.training.spec import DatasetSpec, parse_spec
from flywheel.training.user_code import Objective, StepContext, resolve, shipped

USER = textwrap.dedent('''
    import torch

    def make_net(width=8, out=1):
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, out))

    def not_a_module():
        return [1, 2]

    def raises(**kwargs):
        raise RuntimeError("no GPU here")

    def l1(outputs, targets):
        return (outputs.squeeze(1) - targets).abs().mean()

    def returns_list(outputs, targets):
        return [1.0]

    def always_one(outputs, targets):
        return 1.0

    def step(model, batch, ctx):
        x, y = batch
        return {"loss": ctx.loss_fn(model(x), y), "rank": float(ctx.rank)}

    def step_no_loss(model, batch, ctx):
        return {"total": 1.0}

    def step_detached(model, batch, ctx):
        return torch.tensor(1.0)

    NOT_CALLABLE = 3
''')


@pytest.fixture()
def code(tmp_path):
    pkg = tmp_path / "code" / "userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(USER)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "models.cpython-311.pyc").write_bytes(b"stale")
    return str(tmp_path / "code")


def _spec(code: str, **over) -> object:
    base = {"name": "user", "code": code, "model": {"factory": "userpkg.models:make_net", "kwargs": {"width": 8}},
            "task": "regression", "batch_size": 4, "resources": {"workers": 1}}
    base.update(over)
    return parse_spec(base)


def _data(regression: bool = True, rows: int = 16) -> JobData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    y = rng.normal(size=rows).astype(np.float32) if regression else rng.integers(0, 3, rows).astype(np.int64)
    return JobData(x[:12], y[:12], x[12:], y[12:], "f" * 64, "test rows")


def test_shipped_code_imports_inside_the_block_only(code):
    with shipped(code):
        make_net = resolve("userpkg.models:make_net", "model.factory")
        assert isinstance(make_net(), torch.nn.Module)
    assert "userpkg.models" not in sys.modules  # another job may ship its own userpkg
    assert code not in sys.path
    with pytest.raises(ConfigError, match="model.factory 'userpkg.models:make_net': module 'userpkg.models' "
                                          "does not import"):
        resolve("userpkg.models:make_net", "model.factory")


def test_an_installed_module_resolves_without_a_code_folder():
    with shipped(""):
        fn = resolve("flywheel.training.code_package:code_digest", "loss")
    assert fn is code_digest


@pytest.mark.parametrize("path, fragments", [
    ("userpkg.models:missing", ["model.factory 'userpkg.models:missing'", "no attribute 'missing'"]),
    ("userpkg.models:NOT_CALLABLE", ["model.factory 'userpkg.models:NOT_CALLABLE'", "is a int", "callable"]),
    ("userpkg.nothing:make_net", ["module 'userpkg.nothing' does not import", "ModuleNotFoundError"]),
    ("userpkg/models.py", ["must be an import path 'package.module:callable'"]),
])
def test_a_bad_import_path_names_the_field_and_what_was_expected(code, path, fragments):
    with shipped(code), pytest.raises(ConfigError) as info:
        resolve(path, "model.factory")
    for fragment in fragments:
        assert fragment in info.value.message


def test_a_missing_code_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="code .* is not a folder"):
        with shipped(str(tmp_path / "nowhere")):
            pass


def test_a_good_user_model_passes_the_start_of_job_check(code):
    check_model(_spec(code, loss="userpkg.models:l1", metrics={"one": "userpkg.models:always_one"},
                      train_step="userpkg.models:step"), _data())


@pytest.mark.parametrize("over, error, fragments", [
    ({"model": {"factory": "userpkg.models:not_a_module"}}, ConfigError,
     ["model.factory 'userpkg.models:not_a_module'", "returned a list", "expected a torch.nn.Module"]),
    ({"model": {"factory": "userpkg.models:raises"}}, ConfigError,
     ["model.factory 'userpkg.models:raises'", "RuntimeError: no GPU here"]),
    ({"model": {"factory": "userpkg.models:make_net", "kwargs": {"depth": 3}}}, ConfigError,
     ["model.factory 'userpkg.models:make_net'", "model.kwargs", "depth"]),
    ({"model": {"factory": "nopkg.models:make_net"}}, ConfigError,
     ["model.factory 'nopkg.models:make_net'", "does not import", "code folder"]),
    ({"model": {"factory": "userpkg.models:make_net", "input_shape": [2, 3]}}, InvalidInputError,
     ["does not take the data's rows", "model.input_shape [2, 3]"]),
    ({"model": {"factory": "userpkg.models:make_net", "kwargs": {"out": 3}}}, InvalidInputError,
     ["task regression needs one value per row"]),
    ({"loss": "userpkg.models:returns_list"}, ConfigError, ["loss: the loss returned a list"]),
    ({"metrics": {"bad": "userpkg.models:returns_list"}}, ConfigError, ["metrics.bad gave a list", "a number"]),
    ({"train_step": "userpkg.models:step_no_loss"}, ConfigError, ["train_step returned a dict", "'loss'"]),
    ({"train_step": "userpkg.models:step_detached"}, ConfigError, ["train_step returned a Tensor",
                                                                   "requires grad"]),
])
def test_user_code_that_breaks_its_contract_fails_the_start_of_job_check(code, over, error, fragments):
    with pytest.raises(error) as info:
        check_model(_spec(code, **over), _data())
    for fragment in fragments:
        assert fragment in info.value.message


def test_classification_with_too_few_outputs_is_refused(code):
    spec = _spec(code, task="classification", model={"factory": "userpkg.models:make_net", "kwargs": {"out": 2}})
    with pytest.raises(InvalidInputError, match="the labels need 3 classes"):
        check_model(spec, _data(regression=False))


def test_the_objectives_losses_and_metrics():
    out = torch.tensor([[2.0], [0.0]])
    reg = Objective(parse_spec({"name": "r", "model": {"architecture": "mlp"}, "task": "regression"}))
    row = reg.evaluate(out, torch.tensor([1.0, 0.0]))
    assert row == {"val_loss": 0.5, "val_mse": 0.5, "val_mae": 0.5}
    cls = Objective(parse_spec({"name": "c", "model": {"architecture": "mlp"}}))
    row = cls.evaluate(torch.tensor([[3.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 1]))
    assert row["val_accuracy"] == 0.5
    assert set(row) == {"val_loss", "val_accuracy"}
    assert set(cls.empty_metrics()) == {"val_loss", "val_accuracy"}


def test_a_train_step_returns_its_loss_and_extra_scalars(code):
    with shipped(code):
        objective = Objective(_spec(code, train_step="userpkg.models:step"))
    model = torch.nn.Linear(4, 1)
    ctx = StepContext(rank=1, world_size=2, epoch=0, global_step=0, device=torch.device("cpu"),
                      loss_fn=objective.loss_fn)
    loss, extra = objective.step_loss(model, (torch.ones(2, 4), torch.zeros(2)), ctx)
    assert loss.shape == () and loss.requires_grad
    assert extra == {"rank": 1.0}


def test_regression_labels_arrive_as_float32_and_classification_refuses_them(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i / 4}\n" for i in range(10)))
    spec = DatasetSpec(kind="csv", path=str(path))
    data = load_data(spec, seed=0, regression=True)
    assert data.y_train.dtype == np.float32
    assert sorted(np.concatenate([data.y_train, data.y_val]).tolist()) == [i / 4 for i in range(10)]
    with pytest.raises(InvalidInputError, match="task: regression"):
        load_data(spec, seed=0)
    assert load_data(DatasetSpec(), seed=0, regression=True).y_train.dtype == np.float32  # digits 0..9


def test_the_code_package_holds_the_folder_under_a_name_from_its_contents(code, tmp_path):
    uri = pack_code(code, str(tmp_path / "job" / "code"))
    path = uri.removeprefix("file://")
    assert uri.startswith("file:///") and os.path.isfile(path)
    assert os.path.basename(path) == f"code-{code_digest(code)[:16]}.zip"
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["code/userpkg/__init__.py", "code/userpkg/models.py"]
    assert pack_code(code, str(tmp_path / "job" / "code")) == uri  # same files, same package
    with open(os.path.join(code, "userpkg", "extra.py"), "w") as f:
        f.write("X = 1\n")
    assert pack_code(code, str(tmp_path / "job" / "code")) != uri  # changed code, new name
    spec = _spec(code)
    assert worker_runtime_env(spec, str(tmp_path / "job2"))["working_dir"].startswith("file://")
    assert worker_runtime_env(_spec(""), str(tmp_path / "job3")) == {}


def test_a_factory_models_signature_comes_from_its_rows_and_task(code):
    with shipped(code):
        _, sig = _final_model(_spec(code), _data())
        _, cls_sig = _final_model(_spec(code, task="classification",
                                        model={"factory": "userpkg.models:make_net", "kwargs": {"out": 3}}),
                                  _data(regression=False))
    assert (sig.inputs[0].name, sig.inputs[0].shape) == ("input", (-1, 4))
    assert (sig.outputs[0].name, sig.outputs[0].shape) == ("output", (-1, 1))
    assert (cls_sig.outputs[0].name, cls_sig.outputs[0].shape) == ("logits", (-1, 3))


def test_a_factory_model_that_cannot_export_is_kept_and_the_result_says_why(code, tmp_path):
    from flywheel.training.checkpoint import CheckpointStore
    from flywheel.training.loop import job_paths
    from flywheel.training.runner import _finish
    from flywheel.training.train_state import TrainState

    with open(os.path.join(code, "userpkg", "odd.py"), "w") as f:
        f.write(textwrap.dedent('''
            import torch

            class Odd(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = torch.nn.Linear(4, 1)

                def forward(self, x):
                    # stands for any model an exporter cannot follow
                    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
                        raise NotImplementedError("this model does not export")
                    return self.lin(x)

            def make():
                return Odd()
        '''))
    spec = _spec(code, model={"factory": "userpkg.odd:make"}, export={"onnx": True, "register": False})
    paths = job_paths(str(tmp_path / "job"))
    os.makedirs(paths["output"])
    with shipped(code):
        weights = {k: v.clone() for k, v in _final_model(spec, _data())[0].state_dict().items()}
    CheckpointStore(paths["checkpoints"]).save(TrainState(
        model=weights, optimizer={}, scheduler={}, counters={"global_step": 3}, rng={},
        metrics=[{"epoch": 1, "val_loss": 0.5}]))
    record = SimpleNamespace(id="abc", name="user", spec={"storage": ""}, storage=str(tmp_path / "job"))
    result = _finish(record, spec, _data(), paths, "unused", "unused")
    assert "onnx" not in result
    assert result["onnx_error"].startswith("model.factory 'userpkg.odd:make' did not export to ONNX: ")
    assert "this model does not export" in result["onnx_error"]
    assert os.path.exists(result["weights"])  # the trained weights are kept (safetensors)
    assert result["global_step"] == 3


def test_a_resume_on_an_edited_code_folder_is_refused(code, tmp_path):
    from flywheel.protocol.errors import PreconditionFailedError
    from flywheel.training.loop import job_paths
    from flywheel.training.runner import _same_data_and_code, _user_code_digest

    paths = job_paths(str(tmp_path))
    spec = _spec(code)
    _same_data_and_code(paths, "f" * 64, _user_code_digest(spec))
    _same_data_and_code(paths, "f" * 64, _user_code_digest(spec))  # unchanged: the resume goes on
    with open(os.path.join(code, "userpkg", "models.py"), "a") as f:
        f.write("\nEDITED = True\n")
    with pytest.raises(PreconditionFailedError, match="code folder .* changed since this job started"):
        _same_data_and_code(paths, "f" * 64, _user_code_digest(spec))
