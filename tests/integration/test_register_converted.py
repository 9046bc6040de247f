"""`flywheel models register --from-*` as a user runs it (a real SQLite
registry, the real CLI in a subprocess), and examples/xgboost_from_json run
command by command from its README."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

ROOT = Path(__file__).resolve().parents[2]
FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))
EXAMPLE = ROOT / "examples" / "xgboost_from_json"


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_ACTOR": "alice"}


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_register_from_xgboost_json_records_the_onnx_model_and_its_source(tmp_path, env):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    xgb.XGBClassifier(n_estimators=4, max_depth=2).fit(x, (x[:, 0] + x[:, 3] > 0).astype(int)).save_model(
        tmp_path / "model.json")
    proc = _run([FLYWHEEL, "models", "register", "boost", "--from-xgboost", "model.json", "--tag", "team=risk",
                 "--json"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    version = json.loads(proc.stdout)
    assert version["version"] == 1
    assert version["signature"] == {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]}
    source_sha = hashlib.sha256((tmp_path / "model.json").read_bytes()).hexdigest()
    assert version["tags"] == {"source_framework": "xgboost", "converted_by": version["tags"]["converted_by"],
                               "source_file": "model.json", "source_sha256": source_sha, "team": "risk"}
    assert version["tags"]["converted_by"].startswith("onnxmltools ")
    assert version["params"]["parity_rows"] == 64
    assert version["metrics"]["parity_max_abs_diff"] <= 1e-4
    assert set(version["artifacts"]) == {"model.onnx", "source.json"}
    assert version["artifacts"]["source.json"]["sha256"] == source_sha


@pytest.mark.parametrize("args, fragment", [
    (("--from-xgboost", "model.pkl"), "--from-xgboost 'model.pkl': a pickle (.pkl) is never loaded"),
    (("--from-lightgbm", "absent.txt"), "--from-lightgbm 'absent.txt': no such file"),
    ((), "register needs --artifact NAME=PATH, or a model to convert"),
    (("--from-xgboost", "m.json", "--tolerance", "-1"), "argument --tolerance: '-1': expected a number >= 0"),
])
def test_bad_register_flags_are_clear_errors(tmp_path, env, args, fragment):
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04K\x01.")
    proc = _run([FLYWHEEL, "models", "register", "boost", *args], tmp_path, env)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def _readme_commands() -> list[str]:
    text = (EXAMPLE / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_example_runs_as_its_readme_says(tmp_path, env):
    commands = _readme_commands()
    assert len(commands) <= 3
    work = tmp_path / "example"
    shutil.copytree(EXAMPLE, work)
    tools = {"python": sys.executable, "flywheel": FLYWHEEL}
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        proc = _run([tools.get(argv[0], argv[0]), *argv[1:]], work, env)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
        outputs.append(proc.stdout)
    assert outputs[1].startswith("registered cancer/1: ONNX converted from xgboost model.json")
    scored = re.match(r"cancer/1: accuracy (\S+) on 143 held-out rows; largest difference from XGBoost (\S+)",
                      outputs[2])
    assert scored, outputs[2]
    assert float(scored.group(1)) >= 0.9
    assert float(scored.group(2)) <= 1e-4
