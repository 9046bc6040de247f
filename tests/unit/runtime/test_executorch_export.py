"""ExecuTorch export: programs written from real models, run back through
ExecuTorch's Python runtime and checked against torch."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from flywheel.runtime.architectures import build
from flywheel.protocol.errors import ConfigError, InvalidInputError, UnavailableError
from flywheel.runtime.executorch_export import (
    INSTALL_HINT,
    executorch_version,
    export_executorch,
    load_executorch,
    run_executorch,
)

MLP = {"in_features": 64, "hidden": [32], "out_features": 10}

needs_executorch = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None,
    reason="ExecuTorch is not installed (pip install 'flywheel-ml[edge]')",
)


def _torch(module, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def fp32_programs(tmp_path_factory):
    """MLP and small_cnn (untrained, seeded) exported once with the default
    max_batch of 64."""
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("et")
    programs = {}
    for arch, hparams in (("mlp", MLP), ("small_cnn", {})):
        module, sig = build(arch, hparams)
        programs[arch] = (module, sig, export_executorch(module, sig, str(out / f"{arch}.pte")))
    return programs


@needs_executorch
@pytest.mark.parametrize("arch", ["mlp", "small_cnn"])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fp32_program_matches_torch(fp32_programs, arch, rows):
    # 64 rows on small_cnn: more than the 15 a convolution program traced
    # with a small batch is planned for (see the module docstring).
    module, sig, path = fp32_programs[arch]
    x = np.random.default_rng(rows).standard_normal((rows, *sig.inputs[0].shape[1:])).astype(np.float32)
    got = run_executorch(path, [x])
    assert len(got) == 1
    assert got[0].shape == (rows, 10)
    assert got[0].dtype == np.float32
    assert np.abs(got[0] - _torch(module, x)).max() <= 1e-5


@needs_executorch
def test_loaded_program_refuses_inputs_that_do_not_fit(fp32_programs):
    _, _, path = fp32_programs["mlp"]
    program = load_executorch(path)
    assert program.input_bounds == [(64, 64)]
    with pytest.raises(InvalidInputError, match=r"input 0: shape \[65, 64\] does not fit.*\[64, 64\]"):
        program([np.zeros((65, 64), np.float32)])
    with pytest.raises(InvalidInputError, match="input 0: the program wants float32, got float64"):
        program([np.zeros((2, 64))])
    with pytest.raises(InvalidInputError, match="takes 1 input"):
        program([])


@needs_executorch
def test_a_program_planned_for_fewer_rows_than_max_batch_never_lands(monkeypatch, tmp_path):
    # Traced with fewer than 16 rows, a convolution program is planned for 15
    # whatever max_batch says; the export's own check must catch that.
    from flywheel.runtime import executorch_export

    monkeypatch.setattr(executorch_export, "_TRACE_ROWS", 2)
    module, sig = build("small_cnn", {})
    with pytest.raises(RuntimeError, match=r"does not take 64 rows.*at most \[15, 1, 8, 8\]"):
        export_executorch(module, sig, str(tmp_path / "cnn.pte"))
    assert list(tmp_path.iterdir()) == []


@needs_executorch
def test_max_batch_one_exports_a_fixed_single_row(tmp_path):
    module, sig = build("small_cnn", {})
    path = export_executorch(module, sig, str(tmp_path / "one.pte"), max_batch=1)
    x = np.ones((1, 1, 8, 8), np.float32)
    assert np.abs(run_executorch(path, [x])[0] - _torch(module, x)).max() <= 1e-5
    with pytest.raises(InvalidInputError, match="does not fit"):
        run_executorch(path, [np.ones((2, 1, 8, 8), np.float32)])


@pytest.fixture(scope="module")
def digits_mlp():
    """An MLP 64 -> 32 -> 10 trained for a few epochs on the digits data (int8
    agreement is only meaningful on a model whose logits are not near-tied)."""
    import torch

    from flywheel.training.digits import load_digits_split

    xtr, ytr, xva, yva = load_digits_split(0)
    torch.manual_seed(0)
    module, sig = build("mlp", MLP)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(5):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(module(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    module.eval()
    return module, sig, xtr, xva, yva


@needs_executorch
def test_int8_program_agrees_with_torch_on_held_out_digits(digits_mlp, tmp_path):
    module, sig, xtr, xva, yva = digits_mlp
    path = export_executorch(
        module, sig, str(tmp_path / "q.pte"), quantize="int8", calibration=xtr[:256]
    )
    program = load_executorch(path)
    got = np.concatenate([program([xva[i : i + 64]])[0] for i in range(0, len(xva), 64)])
    want = _torch(module, xva)
    assert len(xva) >= 300
    agreement = float((got.argmax(1) == want.argmax(1)).mean())
    assert agreement >= 0.98, agreement
    fp32_acc = float((want.argmax(1) == yva).mean())
    assert fp32_acc > 0.9  # the model learned something, so agreement means something
    assert float((got.argmax(1) == yva).mean()) >= fp32_acc - 0.02


@needs_executorch
def test_version_is_reported():
    assert executorch_version().startswith("1.")


def _mlp():
    return build("mlp", MLP)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": True}, "max_batch"),
        ({"max_batch": 1 << 20}, "max_batch"),
        ({"quantize": "int4"}, "quantize"),
        ({"quantize": "int8"}, "calibration"),
        ({"calibration": np.zeros((4, 64), np.float32)}, "calibration"),
        ({"quantize": "int8", "calibration": np.zeros((4, 63), np.float32)}, "calibration"),
        ({"quantize": "int8", "calibration": np.zeros((4, 64), np.int64)}, "calibration"),
        ({"quantize": "int8", "calibration": np.full((4, 64), np.nan, np.float32)}, "calibration"),
        ({"quantize": "int8", "calibration": [[0.0] * 64]}, "calibration"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_argument(tmp_path, kwargs, argument):
    # Checked before ExecuTorch is imported, so these hold without it too.
    module, sig = _mlp()
    with pytest.raises(ConfigError, match=argument):
        export_executorch(module, sig, str(tmp_path / "m.pte"), **kwargs)
    assert not (tmp_path / "m.pte").exists()


def test_bad_module_signature_and_path_are_rejected_by_name(tmp_path):
    module, sig = _mlp()
    with pytest.raises(ConfigError, match="^module"):
        export_executorch(object(), sig, str(tmp_path / "m.pte"))
    with pytest.raises(ConfigError, match="^signature"):
        export_executorch(module, {"inputs": []}, str(tmp_path / "m.pte"))
    with pytest.raises(ConfigError, match="^path"):
        export_executorch(module, sig, "")
    with pytest.raises(ConfigError, match="^path"):
        run_executorch(str(tmp_path / "missing.pte"), [])


@needs_executorch
def test_a_file_that_is_not_a_program_is_rejected_by_name(tmp_path):
    bogus = tmp_path / "bogus.pte"
    bogus.write_bytes(b"not a program")
    with pytest.raises(ConfigError, match="^path .*not a loadable ExecuTorch program"):
        run_executorch(str(bogus), [])


@pytest.fixture
def without_executorch(monkeypatch):
    """Imports of executorch (and torchao) fail as if neither were installed."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("executorch", "torchao")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "executorch", None)
    monkeypatch.setitem(sys.modules, "torchao", None)


def test_without_executorch_every_call_names_the_install_hint(without_executorch, tmp_path):
    module, sig = _mlp()
    fake = tmp_path / "m.pte"
    fake.write_bytes(b"x")
    calls = [
        lambda: export_executorch(module, sig, str(tmp_path / "out.pte")),
        lambda: export_executorch(
            module, sig, str(tmp_path / "out.pte"), quantize="int8",
            calibration=np.zeros((4, 64), np.float32),
        ),
        lambda: run_executorch(str(fake), [np.zeros((1, 64), np.float32)]),
        executorch_version,
    ]
    for call in calls:
        with pytest.raises(UnavailableError, match=r"pip install 'flywheel-ml\[edge\]'"):
            call()
    assert INSTALL_HINT == "pip install 'flywheel-ml[edge]'"
