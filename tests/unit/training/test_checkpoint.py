"""CheckpointStore: exact restore, atomic saves, fallback past damage, pruning,
local folders and fsspec memory://; DCP full state dict helpers in one process."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import uuid

import numpy as np
import pytest
import torch

from flywheel.protocol.errors import ConfigError, IntegrityError, InvalidInputError, NotFoundError
from flywheel.training import checkpoint as ckpt
from flywheel.training.checkpoint import CheckpointStore
from flywheel.training.checkpoint_storage import Storage
from flywheel.training.train_state import (
    TrainState,
    capture_rng,
    full_state_dicts,
    load_full_state_dicts,
    restore_rng,
)

torch.set_num_threads(1)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpts")
    return f"memory://ckpt-{uuid.uuid4().hex}"


def _state(step: int, **extra) -> TrainState:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3) + step
    return TrainState(
        model={"w": w, "b": torch.zeros(2)},
        optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": ["w", "b"]}]},
        scheduler={"last_epoch": step},
        counters={"epoch": 0, "global_step": step},
        rng={},
        metrics=[{"loss": 1.0 / (step + 1)}],
        extra=extra,
    )


# ------------------------------------------------------------ exact resume


def _make(seed: int):
    torch.manual_seed(seed)
    # Dropout makes the result depend on the torch RNG, so resuming must restore it.
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        # the batch comes from all three generators: each must be restored
        x = torch.randn(5, 4) + float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_resume_continues_bit_identically(root):
    store = CheckpointStore(root)
    model, opt, sched = _make(0)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    _train(model, opt, sched, 3)
    model_sd, optim_sd = full_state_dicts(model, opt)
    store.save(TrainState(model=model_sd, optimizer=optim_sd, scheduler=sched.state_dict(),
                          counters={"epoch": 0, "step_in_epoch": 3, "global_step": 3},
                          rng=capture_rng(), metrics=[{"loss": 0.5}]))
    _train(model, opt, sched, 3)  # the uninterrupted reference

    state = store.latest()
    assert state.counters == {"epoch": 0, "step_in_epoch": 3, "global_step": 3}
    saved_w = state.model["0.weight"].clone()
    model2, opt2, sched2 = _make(123)  # different initial weights, empty optimizer state
    load_full_state_dicts(model2, opt2, state.model, state.optimizer, rank=0)
    sched2.load_state_dict(state.scheduler)
    restore_rng(state.rng)
    _train(model2, opt2, sched2, 3)

    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name
    ref_opt, got_opt = opt.state_dict(), opt2.state_dict()
    for pid, entry in ref_opt["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, got_opt["state"][pid][key]), (pid, key)
    assert ref_opt["param_groups"][0]["lr"] == got_opt["param_groups"][0]["lr"]
    assert sched.state_dict() == sched2.state_dict()
    # loading copied the restored tensors: training did not write into them
    assert torch.equal(state.model["0.weight"], saved_w)


def test_dcp_optimizer_state_round_trips_types(tmp_path):
    model, opt, sched = _make(0)
    _train(model, opt, sched, 2)
    model_sd, optim_sd = full_state_dicts(model, opt)
    assert set(optim_sd["state"]) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    store = CheckpointStore(str(tmp_path))
    store.save(TrainState(model_sd, optim_sd, sched.state_dict(), {"global_step": 2}, {}, []))
    got = store.load(2).optimizer
    step = got["state"]["0.weight"]["step"]
    assert step.dim() == 0
    assert step.dtype == optim_sd["state"]["0.weight"]["step"].dtype
    assert float(step) == 2.0
    group, ref_group = got["param_groups"][0], optim_sd["param_groups"][0]
    assert group["params"] == ref_group["params"]
    assert all(isinstance(p, str) for p in group["params"])
    assert group == {k: v for k, v in ref_group.items()}  # betas stays a tuple, None stays None


def test_plain_optimizer_state_dict_keeps_int_keys(root):
    model, opt, sched = _make(0)
    _train(model, opt, sched, 2)
    plain = opt.state_dict()
    store = CheckpointStore(root)
    store.save(TrainState(model.state_dict(), plain, sched.state_dict(), {"global_step": 2}, {}, []))
    got = store.load(2).optimizer
    assert list(got["state"]) == [0, 1, 2, 3]
    assert all(type(k) is int for k in got["state"])
    assert got["param_groups"][0]["params"] == [0, 1, 2, 3]
    for pid, entry in plain["state"].items():
        assert entry.keys() == got["state"][pid].keys()
        for key, value in entry.items():
            assert torch.equal(value, got["state"][pid][key])
            assert value.dtype == got["state"][pid][key].dtype

    model2, opt2, _ = _make(5)
    opt2.load_state_dict(got)  # torch itself accepts it
    assert torch.equal(opt2.state_dict()["state"][1]["exp_avg"], plain["state"][1]["exp_avg"])
    model3, opt3, _ = _make(6)
    load_full_state_dicts(model3, opt3, model.state_dict(), got, rank=0)  # and through the helper
    assert torch.equal(opt3.state_dict()["state"][2]["exp_avg_sq"], plain["state"][2]["exp_avg_sq"])
    assert all(torch.equal(a, b) for a, b in zip(model3.parameters(), model.parameters()))


def test_rng_states_restore(root):
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    np.random.randn()  # a cached gaussian in NumPy's state
    random.gauss(0, 1)  # and in Python's
    store = CheckpointStore(root)
    store.save(TrainState({"w": torch.ones(1)}, {}, {}, {"global_step": 0}, capture_rng(), []))
    expected = (torch.rand(4), np.random.randn(4), [random.random() for _ in range(4)], random.gauss(0, 1))

    rng = store.latest().rng
    assert isinstance(rng["python"], tuple)
    assert isinstance(rng["python"][1], tuple)
    assert rng["numpy"][0] == "MT19937"
    assert rng["numpy"][1].dtype == np.uint32
    assert rng["torch"].dtype == torch.uint8
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    restore_rng(rng)
    got = (torch.rand(4), np.random.randn(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_nested_values_keep_their_types(tmp_path):
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    tricky = {
        0: "int key", "0": "str key", (1, "a"): None, 2.5: True,
        "$dollar": [1, (2, 3), {"x": float("inf")}],
        "nan": float("nan"), "neg": -math.inf, "big": 2**70, "np_scalar": np.float32(1.5),
        "lr_tensor": torch.tensor(0.01), "dtype": torch.bfloat16, "arr": np.arange(3, dtype=np.int16),
    }
    state = TrainState(
        model={"t": base.t(), "tied_a": base, "tied_b": base, "view": base[1], "half": torch.ones(2, dtype=torch.bfloat16)},
        optimizer={"state": {}, "param_groups": [{"params": [], "betas": (0.9, 0.99)}]},
        scheduler={"best": math.inf}, counters={"global_step": 4}, rng={}, metrics=[{"loss": float("nan")}],
        extra={"tricky": tricky},
    )
    CheckpointStore(str(tmp_path)).save(state)
    got = CheckpointStore(str(tmp_path)).load(4)
    assert list(got.model) == ["t", "tied_a", "tied_b", "view", "half"]
    for key, value in state.model.items():
        assert torch.equal(got.model[key], value), key
        assert got.model[key].dtype == value.dtype, key
    t = got.extra["tricky"]
    assert list(t) == list(tricky)
    assert [type(k) for k in t] == [type(k) for k in tricky]
    assert t["$dollar"] == [1, (2, 3), {"x": math.inf}]
    assert math.isnan(t["nan"])
    assert t["neg"] == -math.inf
    assert t["big"] == 2**70
    assert t["np_scalar"] == 1.5
    assert t["dtype"] is torch.bfloat16
    assert torch.equal(t["lr_tensor"], tricky["lr_tensor"])
    assert t["lr_tensor"].dim() == 0
    assert t["arr"].dtype == np.int16
    assert t["arr"].tolist() == [0, 1, 2]
    assert got.optimizer["param_groups"][0]["betas"] == (0.9, 0.99)
    assert got.scheduler == {"best": math.inf}
    assert math.isnan(got.metrics[0]["loss"])
    # state.json is standard JSON (no NaN/Infinity literals)
    raw = (tmp_path / "step-000000004" / "state.json").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_unsaveable_values_fail_with_their_path(tmp_path):
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(InvalidInputError, match=r"extra\.cb"):
        store.save(_state(1, cb=lambda: None))
    with pytest.raises(InvalidInputError, match="global_step"):
        store.save(TrainState({"w": torch.ones(1)}, {}, {}, {"epoch": 1}, {}, []))
    with pytest.raises(InvalidInputError, match="rank 0"):
        store.save(TrainState({}, {}, {}, {"global_step": 1}, {}, []))
    assert store.steps() == []
    assert os.listdir(tmp_path) == []  # nothing half-done left behind


# --------------------------------------------------- never lost, never half


def test_layout_and_manifest(tmp_path):
    store = CheckpointStore(str(tmp_path))
    path = store.save(_state(37))
    assert path == str(tmp_path / "step-000000037")
    assert sorted(os.listdir(path)) == ["model.safetensors", "optimizer.safetensors", "state.json", "state.safetensors"]
    assert json.loads((tmp_path / "LATEST").read_text()) == {"step": 37, "dir": "step-000000037"}
    assert sorted(os.listdir(tmp_path)) == ["LATEST", "step-000000037"]
    doc = json.loads((tmp_path / "step-000000037" / "state.json").read_text())
    assert set(doc["files"]) == {"model.safetensors", "optimizer.safetensors", "state.safetensors"}


def test_crash_mid_save_is_never_returned_and_is_pruned(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path))
    store.save(_state(1))
    store.save(_state(2))

    real_write = Storage.write

    def crash_on_state_json(self, data, *parts):
        if parts[-1] == "state.json":
            raise OSError("power cut")
        return real_write(self, data, *parts)

    monkeypatch.setattr(Storage, "write", crash_on_state_json)
    monkeypatch.setattr(Storage, "remove_dir", lambda self, name, **kw: None)  # died: no cleanup
    with pytest.raises(OSError, match="power cut"):
        store.save(_state(3))
    monkeypatch.undo()
    assert any(n.startswith(".tmp-step-000000003-") for n in os.listdir(tmp_path))
    assert CheckpointStore(str(tmp_path)).latest().counters["global_step"] == 2
    assert store.steps() == [1, 2]
    # a .tmp newer than the newest complete checkpoint may be a save in progress: kept
    assert store.prune(keep=5) == []

    store.save(_state(3))  # the job resumes and saves step 3 again
    removed = store.prune(keep=5)
    assert len(removed) == 1
    assert os.path.basename(removed[0]).startswith(".tmp-step-000000003-")
    assert sorted(os.listdir(tmp_path)) == ["LATEST", "step-000000001", "step-000000002", "step-000000003"]


def test_a_failed_save_cleans_up_and_keeps_the_previous_copy(root, monkeypatch):
    store = CheckpointStore(root)
    store.save(_state(1, version=1))
    real_move = Storage.move_dir

    def fail_into_final(self, src, dst, order):
        if src.startswith(".tmp-"):
            raise OSError("disk full")
        return real_move(self, src, dst, order)

    monkeypatch.setattr(Storage, "move_dir", fail_into_final)
    with pytest.raises(OSError, match="disk full"):
        store.save(_state(1, version=2))
    monkeypatch.undo()
    assert sorted(store._st.names()) == ["LATEST", "step-000000001"]
    assert CheckpointStore(root).latest().extra == {"version": 1}


def test_damaged_folders_are_skipped_and_pruned(root, caplog):
    store = CheckpointStore(root)
    for step in (1, 2, 3, 4):
        store.save(_state(step))
    st = store._st
    st.remove_file("step-000000002", "model.safetensors")  # a missing file
    data = bytearray(st.read("step-000000004", "optimizer.safetensors"))
    data[-1] ^= 0xFF  # same size, wrong hash
    st.write(bytes(data), "step-000000004", "optimizer.safetensors")
    st.makedirs(".tmp-step-000000003-abc123")  # an abandoned save
    st.write(b"partial", ".tmp-step-000000003-abc123", "model.safetensors")

    fresh = CheckpointStore(root)  # no verification cache
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        state = fresh.latest()
    assert state.counters["global_step"] == 3
    assert "step-000000004" in caplog.text
    assert "falling back to step-000000003" in caplog.text
    assert fresh.steps() == [1, 3]
    with pytest.raises(IntegrityError, match="manifest"):
        fresh.load(4)
    with pytest.raises(IntegrityError, match="step-000000002"):
        fresh.load(2)
    with pytest.raises(NotFoundError, match="no checkpoint for step 99"):
        fresh.load(99)

    removed = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fresh.prune(keep=1))
    # step 4 is corrupt but LATEST names it: never removed
    assert removed == [".tmp-step-000000003-abc123", "step-000000001", "step-000000002"]
    assert sorted(n for n in st.names() if n.startswith(("step-", ".tmp"))) == ["step-000000003", "step-000000004"]


def test_latest_pointing_at_a_deleted_folder_falls_back(root, caplog):
    store = CheckpointStore(root)
    for step in (1, 2, 3):
        store.save(_state(step))
    store._st.remove_dir("step-000000003")
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert store.latest().counters["global_step"] == 2
    assert "LATEST names step-000000003" in caplog.text
    store._st.remove_file("LATEST")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert store.latest().counters["global_step"] == 2
    assert "LATEST is missing" in caplog.text


def test_empty_store(root, caplog):
    store = CheckpointStore(root)
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert store.latest() is None
    assert store.steps() == []
    assert store.prune(keep=1) == []
    assert caplog.text == ""
    with pytest.raises(NotFoundError, match="no checkpoint for step 0"):
        store.load(0)


def test_saving_a_step_twice_replaces_it(root):
    store = CheckpointStore(root)
    store.save(_state(3, version=1))
    path = store.save(_state(3, version=2))
    assert path.endswith("step-000000003")
    assert store.steps() == [3]
    assert store.load(3).extra == {"version": 2}
    assert CheckpointStore(root).latest().extra == {"version": 2}
    assert sorted(store._st.names()) == ["LATEST", "step-000000003"]  # no leftovers


def test_prune_keeps_newest_and_what_latest_names(root):
    store = CheckpointStore(root)
    for step in (1, 2, 3, 4, 5):
        store.save(_state(step))
    store.save(_state(2, resumed=True))  # a job resumed from step 2: LATEST names it now
    assert store.latest().extra == {"resumed": True}
    removed = store.prune(keep=2)
    assert sorted(p.rsplit("/", 1)[-1] for p in removed) == ["step-000000001", "step-000000003"]
    assert store.steps() == [2, 4, 5]
    assert store.prune(keep=2) == []
    with pytest.raises(ConfigError, match="keep"):
        store.prune(keep=0)


def test_local_root_accepts_file_uri(tmp_path):
    store = CheckpointStore(f"file://{tmp_path}")
    store.save(_state(1))
    assert CheckpointStore(str(tmp_path)).steps() == [1]


# -------------------------------------------------- DCP helpers, no group


def test_full_state_dict_helpers_without_a_process_group():
    assert not torch.distributed.is_initialized()
    model, opt, sched = _make(0)
    _train(model, opt, sched, 1)
    model_sd, optim_sd = full_state_dicts(model, opt)
    assert list(model_sd) == [n for n, _ in model.named_parameters()]
    assert optim_sd["param_groups"][0]["params"] == list(model_sd)
    assert all(v.device.type == "cpu" for v in model_sd.values())

    model2, opt2, _ = _make(9)
    load_full_state_dicts(model2, opt2, model_sd, optim_sd, rank=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert list(optim_sd["state"]) == list(model_sd)  # the caller's dict was not rewritten
    with pytest.raises(ConfigError, match="rank"):
        load_full_state_dicts(model2, opt2, model_sd, optim_sd, rank=1)
    with pytest.raises(ConfigError, match="rank 0 must pass"):
        load_full_state_dicts(model2, opt2, {}, optim_sd, rank=0)
