"""The `flywheel` command line: every command registered and described,
every argument with help text, --json on either side of a sub-command, and
`python -m flywheel`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from flywheel.cli import COMMANDS, build_parser, main
from flywheel.common.version import flywheel_version


def _parsers(parser: argparse.ArgumentParser, path: str = "flywheel") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def _undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not action.help:
            missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_argument_of_every_command_has_help_text():
    missing = [m for path, p in _parsers(build_parser()) for m in _undocumented(p, path)]
    assert missing == []


def test_every_sub_command_has_help_text():
    parser = build_parser()
    undocumented = []
    for path, p in _parsers(parser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                undocumented += [f"{path} {name}" for name in action.choices if name not in helped]
    assert undocumented == []


def test_the_top_level_help_lists_every_command():
    text = build_parser().format_help()
    for name, _ in COMMANDS:
        assert f"\n  {name} " in text


def test_the_registered_commands_are_the_ones_the_parser_knows():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [name for name, _ in COMMANDS]


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "list", "--json"],
        ["models", "--json", "list"],
        ["keys", "list", "--json"],
        ["keys", "--json", "list"],
    ],
)
def test_json_works_on_either_side_of_the_sub_command(argv):
    assert build_parser().parse_args(argv).json is True


def test_without_json_the_flag_is_false():
    assert build_parser().parse_args(["models", "list"]).json is False


def test_models_list_json_prints_json(tmp_path, capsys):
    registry = f"sqlite://{tmp_path}/registry.db"
    assert main(["models", "--registry", registry, "--artifacts", str(tmp_path / "a"), "list", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


@pytest.mark.parametrize("module", ["flywheel", "flywheel.cli"])
def test_python_dash_m_runs_the_command(module, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"flywheel-ml {flywheel_version()}"


def test_a_flywheel_error_exits_2_with_its_message(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "error: --config" in capsys.readouterr().err


def test_phases_sum_up_where_the_time_went():
    from flywheel.cli._shared import Phases

    phases = Phases()
    phases.add("train", 12.0)
    with phases.phase("register"):
        pass
    phases.add("start Ray", 3.25)
    lines = phases.summary().splitlines()
    assert lines[0] == "where the time went:"
    assert [line.split()[0] for line in lines[1:]] == ["train", "register", "start", "total"]
    assert lines[1].endswith("12.0 s") and lines[3].endswith("3.2 s")
    assert float(lines[-1].split()[-2]) == pytest.approx(15.25, abs=0.06)
