"""Whether a metric name that alert rules or dashboards read is one that
Flywheel's source exports. Importable from every test module as
``_metric_names`` (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import re


def exported_name_in_source(name: str, source: str) -> bool:
    """Whether ``name`` (or the family it is a sample of: ``_bucket``,
    ``_count``, ``_sum``, ``_total`` dropped) is quoted in ``source``, as a
    metric family's name or the start of a hand-written sample line."""
    candidates = {name}
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if name.endswith(suffix):
            candidates.add(name[: -len(suffix)])
    return any(re.search(rf"""["']{re.escape(c)}(?!\w)""", source) for c in candidates)
