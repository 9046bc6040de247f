"""deploy/grafana/: every dashboard is a well-formed Grafana dashboard whose
panels query Prometheus through the ``datasource`` variable, with PromQL that
Prometheus's own parser accepts and metric names that Flywheel exports.
(tests/integration/test_grafana_dashboards.py runs each query against a real
Prometheus scraping a real deployment.)"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from _dashboards import DATASOURCE_UID, ROOT, files, load, panels, query_variables, substitute, targets
from _metric_names import exported_name_in_source

# the rooms whose source exports metrics the dashboards may read
EXPORTERS = ("serving", "loops")
EXPECTED = {"flywheel-serving-overview.json", "flywheel-endpoints.json", "flywheel-drift.json",
            "flywheel-training-loops.json"}
WITHOUT_QUERIES = ("row", "text")  # panel types that show no data


def test_the_four_dashboards_are_there():
    assert {p.name for p in files()} == EXPECTED


@pytest.mark.parametrize("path", files(), ids=lambda p: p.name)
def test_a_dashboard_is_well_formed(path):
    doc = load(path)
    assert doc["uid"] and doc["title"].startswith("Flywheel / ")
    assert doc["schemaVersion"] >= 36
    every = list(panels(doc))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    for panel in every:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] in WITHOUT_QUERIES:
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip(), f"{panel['title']} {t['refId']}: empty expr"
            assert t["datasource"]["uid"] == DATASOURCE_UID, panel["title"]


@pytest.mark.parametrize("path", files(), ids=lambda p: p.name)
def test_a_dashboard_picks_its_prometheus_through_the_datasource_variable(path):
    variables = load(path)["templating"]["list"]
    source = [v for v in variables if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in source] == [("datasource", "prometheus")]
    for var in variables:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == DATASOURCE_UID
    used = {m for p in panels(load(path)) for q in p.get("targets", []) for m in re.findall(r"\$(\w+)", q["expr"])}
    declared = {v["name"] for v in variables} | {"__rate_interval", "__interval", "__range"}
    assert used - declared == set()


def test_dashboard_uids_are_unique():
    uids = [load(p)["uid"] for p in files()]
    assert len(uids) == len(set(uids))


def test_every_metric_in_the_dashboards_is_exported_by_flywheel():
    """Renaming a metric in serving/ or loops/ without the dashboards fails here."""
    source = "\n".join(p.read_text() for room in EXPORTERS for p in (ROOT / room).rglob("*.py"))
    names = {n for t in targets() for n in re.findall(r"\bflywheel_\w+", t.expr)}
    assert len(names) > 20
    assert sorted(n for n in names if not exported_name_in_source(n, source)) == []


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian's prometheus package; `make test` installs it as root)")
def test_promtool_parses_every_query(tmp_path):
    """Each query, its variables filled in, as a recording rule: promtool
    parses it with Prometheus's own PromQL parser."""
    rules = []
    for path in files():
        variables = {name: ["a", "b"] for name in query_variables(load(path))}
        for t in targets():
            if t.dashboard == path.name:
                record = "dashboard:" + re.sub(r"\W", "_", t.id)
                rules.append({"record": record, "expr": substitute(t.expr, variables)})
    out = tmp_path / "dashboards.rules.yaml"
    out.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run([shutil.which("promtool"), "check", "rules", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_substitution_fills_grafana_variables_as_grafana_does():
    expr = 'rate(x{m=~"$model",e=~"${endpoint}"}[$__rate_interval]) and y[$__range]'
    assert substitute(expr, {"model": ["a", "b"], "endpoint": ["e"]}) == 'rate(x{m=~"(a|b)",e=~"e"}[30s]) and y[5m]'
