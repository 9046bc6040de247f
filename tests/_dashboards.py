"""The Grafana dashboards in deploy/grafana/, read for the tests: their
panels' queries, and Grafana's template variables replaced the way Grafana
replaces them before a query reaches Prometheus.

Importable from every test module as ``_dashboards`` (tests/ is on sys.path
through tests/conftest.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana"
DATASOURCE_UID = "${datasource}"
# Grafana's built-in interval variables, as concrete durations: the integration
# test's Prometheus scrapes every second, so 30 s windows hold many samples
BUILTINS = {"$__rate_interval": "30s", "$__interval": "15s", "$__range": "5m"}
_LABEL_VALUES = re.compile(r"^label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)$")


class Target(NamedTuple):
    dashboard: str  # file name
    panel: str  # panel title
    ref: str  # the target's refId
    expr: str

    @property
    def id(self) -> str:
        return f"{self.dashboard.removesuffix('.json')}:{self.panel}:{self.ref}"


def files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(doc: dict) -> Iterator[dict]:
    """Every panel, those nested in collapsed rows too."""
    for panel in doc.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def targets() -> list[Target]:
    return [Target(path.name, panel["title"], t["refId"], t["expr"])
            for path in files() for panel in panels(load(path)) for t in panel.get("targets", [])]


def query_variables(doc: dict) -> dict[str, tuple[str, str]]:
    """name -> (metric, label) of each ``label_values(metric, label)`` variable."""
    found = {}
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = _LABEL_VALUES.match(query.strip())
            if m is None:
                raise ValueError(f"variable {var['name']}: {query!r} is not label_values(metric, label)")
            found[var["name"]] = (m.group(1), m.group(2))
    return found


def substitute(expr: str, variables: dict[str, list[str]]) -> str:
    """``expr`` as Grafana sends it with every value of each variable
    selected: a multi-value variable becomes the regex ``(a|b)`` (values
    are plain names here: letters, digits, ``_.-``, nothing to escape)."""
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    # longest names first: $model must not eat the start of $models
    for name in sorted(variables, key=len, reverse=True):
        values = variables[name]
        joined = values[0] if len(values) == 1 else "(" + "|".join(values) + ")"
        expr = expr.replace("${" + name + "}", joined).replace("$" + name, joined)
    return expr
