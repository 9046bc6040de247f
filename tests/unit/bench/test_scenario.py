from pathlib import Path

import pytest

from flywheel.bench.harness import load_scenario, parse_scenario
from flywheel.bench.harness.configsearch import combinations
from flywheel.protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("bench-*.yaml")), ids=lambda p: p.name)
def test_shipped_scenarios_validate(preset):
    sc = load_scenario(preset)
    assert sc.model
    assert sc.duration_s > 0


@pytest.mark.parametrize(
    "data, field",
    [
        ({"load": {"levels": [0]}}, "load.levels"),
        ({"load": {"levels": [1.5]}}, "whole numbers"),
        ({"load": {"by": "sometimes"}}, "$.load.by"),
        ({"mix": {"http_json": 0}}, "mix"),
        ({"target": {"http": "http://10.1.2.3:8000"}}, "allow_remote"),
        ({"target": {"http": "ftp://127.0.0.1"}}, "target.http"),
        ({"duration_s": 0}, "duration_s"),
        ({"duration_s": "ten"}, "$.duration_s"),
        ({"mode": "capacity"}, "'capacity' section"),
        ({"capacity": {"start": 10, "increment": 5, "factor": 2}}, "exactly one of increment"),
        ({"payload": {"inputs": [{"name": "x", "shape": [1, 0]}]}}, "payload input 'x'"),
        ({"payload": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]}}, "numeric V2 type"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_fields_are_named(data, field):
    with pytest.raises(ConfigError) as err:
        parse_scenario({"model": "m", **data})
    assert field in err.value.message


def test_remote_targets_need_an_explicit_opt_in():
    sc = parse_scenario({"model": "m", "target": {"http": "http://10.1.2.3:8000", "grpc": "10.1.2.3:9000",
                                                  "allow_remote": True}})
    assert sc.target.http == "http://10.1.2.3:8000"


def test_capacity_levels_arithmetic_geometric_and_bounded():
    arith = parse_scenario({"model": "m", "capacity": {"start": 10, "increment": 10, "max_level": 45}}).capacity
    assert arith.levels() == [10, 20, 30, 40]
    geo = parse_scenario({"model": "m", "capacity": {"by": "users", "start": 1, "factor": 2, "max_level": 64,
                                                     "max_steps": 5}}).capacity
    assert geo.levels() == [1, 2, 4, 8, 16]


def test_relative_paths_resolve_against_the_scenario_file(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "model: m\npayload: {inputs: [{name: x, shape: [1, 4], generator: file, file: rows.npy}]}\n"
        "mode: config_search\ncapacity: {start: 1, increment: 1}\n"
        "config_search: {model: {path: m.onnx}, grid: {variants: [{name: int8, path: q.onnx}]}}\n"
    )
    sc = load_scenario(tmp_path / "s.yaml")
    assert sc.payload.inputs[0].file == str(tmp_path / "rows.npy")
    assert sc.config_search.model["path"] == str(tmp_path / "m.onnx")
    assert sc.config_search.grid.variants[0].path == str(tmp_path / "q.onnx")


def test_config_grid_expands_every_combination_into_model_configs():
    sc = parse_scenario({
        "model": "m", "mode": "config_search", "capacity": {"start": 1, "increment": 1},
        "config_search": {
            "model": {"path": "/a.onnx", "num_cpus": 0.5},
            "grid": {"max_batch_size": [1, 32], "intra_op_threads": [1, 2],
                     "variants": [{"name": "fp32", "path": "/a.onnx"}, {"name": "int8", "ref": "m@int8"}]},
        },
    })
    combos = combinations({"name": "m", **sc.config_search.model}, sc.config_search.grid)
    assert len(combos) == 8
    labels = {c[0] for c in combos}
    assert "max_batch_size=32, intra_op_threads=2, variant=int8" in labels
    _, settings, model = next(c for c in combos if c[1]["variant"] == "int8" and c[1]["max_batch_size"] == 1)
    assert model["ref"] == "m@int8"
    assert "path" not in model
    assert model["batching"]["max_batch_size"] == 1
    assert model["onnxruntime"]["intra_op_threads"] in (1, 2)
    # the grid is validated by the serving config itself
    from flywheel.serving import parse_config

    parse_config({"models": [model]})


def test_small_factors_by_users_still_add_a_user_each_step():
    cap = parse_scenario({"model": "m", "capacity": {"by": "users", "start": 2, "factor": 1.2, "max_level": 6}}).capacity
    assert cap.levels() == [2, 3, 4, 5, 6]
