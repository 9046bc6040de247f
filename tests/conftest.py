"""Shared fixtures (small real ONNX models built once per test session, a
PostgreSQL server) and the guard that keeps Ray out of the fast suite: a test
that starts Ray must carry the ``integration`` marker, so that
``pytest -m "not integration"`` never starts one."""

from __future__ import annotations

import os
import sys

import numpy as np
import psutil
import pytest

# Ray's daemons: a test that leaves them among this process's children started
# a Ray (``ray start``, ``flywheel serve``, ``flywheel run`` in a subprocess).
_RAY_DAEMONS = frozenset({"raylet", "gcs_server"})
_ray_before = pytest.StashKey[tuple[bool, frozenset[int]]]()


def _ray_in_this_process() -> bool:
    ray = sys.modules.get("ray")  # never imported here just to ask
    return ray is not None and ray.is_initialized()


def _descendant_pids(pid: int) -> list[int]:
    """``pid``'s children, recursively: from /proc/<pid>/task/*/children where
    the kernel has it (microseconds; this runs twice per test), else from
    psutil (a scan of every process on the machine, milliseconds)."""
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:  # it ended while we looked
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _ray_daemons_among_children() -> dict[int, str]:
    found = {}
    for pid in _descendant_pids(os.getpid()):
        try:
            name = psutil.Process(pid).name()
        except psutil.Error:  # it ended while we looked
            continue
        if name in _RAY_DAEMONS:
            found[pid] = name
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture runs: the session's Ray (``ray_session``) is for
    integration tests only; remember what of Ray was already up."""
    if item.get_closest_marker("integration") is not None:
        return
    if "ray_session" in getattr(item, "fixturenames", ()):
        pytest.fail(f"{item.nodeid} uses ray_session (a real Ray) but is not marked integration: "
                    "add pytest.mark.integration to it", pytrace=False)
    in_process = _ray_in_this_process()
    # with the session's Ray up (a full run, after the integration tests) there is nothing to compare
    item.stash[_ray_before] = (in_process, frozenset() if in_process else frozenset(_ray_daemons_among_children()))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """After a test without the ``integration`` marker: fail it if Ray came
    up during its set-up or its body (in this process or as child daemons)."""
    result = yield
    in_process, daemons = item.stash.get(_ray_before, (True, frozenset()))
    if not in_process:
        started = ["ray.init() in this process"] if _ray_in_this_process() else []
        started += [f"{name} (pid {pid})" for pid, name in _ray_daemons_among_children().items() if pid not in daemons]
        if started:
            pytest.fail(f"{item.nodeid} started Ray ({', '.join(started)}) but is not marked integration: "
                        "add pytest.mark.integration to it, or keep Ray out of it", pytrace=False)
    return result


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory) -> str:
    """An untrained MLP 64 -> 32 -> 10 exported to ONNX (variable batch)."""
    import torch

    from flywheel.runtime.architectures import build
    from flywheel.runtime.export import export_onnx

    torch.manual_seed(0)
    module, sig = build("mlp", {"in_features": 64, "hidden": [32], "out_features": 10})
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    return export_onnx(module, sig, str(path))


@pytest.fixture(scope="session")
def multi_type_onnx(tmp_path_factory) -> str:
    """An ONNX model with one input and one identity-like output per datatype,
    built with onnx.helper (each output = input, so values round-trip)."""
    import onnx
    from onnx import TensorProto, helper

    types = {
        "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
        "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
        "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
        "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
        "BYTES": TensorProto.STRING,
    }
    inputs, outputs, nodes = [], [], []
    for name, t in types.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", t, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", t, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    graph = helper.make_graph(nodes, "types", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("models") / "types.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (skipped, with the reason,
    only where none can be started)."""
    from pg import started_or_skip  # tests/pg.py (tests/ is on sys.path via this conftest)

    server = started_or_skip()
    yield server
    server.stop()
