"""The drift bench's small-window table: every test scored on the real
kernels, alibi-detect compared only where its environment exists, and each
figure judged against its own target."""

from __future__ import annotations

from flywheel.bench import drift


def test_without_alibis_environment_the_rows_say_so_and_carry_no_ratio(tmp_path, capsys):
    rows = drift.small_window_rows(str(tmp_path / "no-venv"))
    assert [r["test"] for r in rows] == ["ks", "cvm", "chi2", "mmd"]
    assert all(r["numba_s"] > 0 and "vs_alibi" not in r for r in rows)
    assert "no environment at" in capsys.readouterr().out


def test_the_table_judges_each_figure_against_its_own_target(capsys):
    rows = [{"test": "ks", "shape": "s", "numba_s": 0.3e-3, "target_s": 0.4e-3, "alibi_s": 0.03, "vs_alibi": 100.0},
            {"test": "mmd", "shape": "s", "numba_s": 9e-3, "target_s": 8e-3, "alibi_s": 0.1, "vs_alibi": 11.1}]
    drift.print_small(rows)
    ks, mmd = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("ks ", "mmd "))]
    assert " met " in ks and "100x (>= 30x met)" in ks
    assert "MISSED" in mmd and "11x (>= 30x MISSED)" in mmd
