"""Promotion gates: a typed policy per model, checked before production.

A policy is a list of rules (YAML or code)::

    rules:
      - {rule: required_metrics, metrics: [accuracy, p99_latency_ms]}
      - {rule: not_worse_than_production, metric: accuracy, tolerance: 0.005}
      - {rule: max, metric: p99_latency_ms, value: 20}
      - {rule: approvals, count: 2}
      - {rule: evaluated_on, dataset: "s3://b/holdout/"}
      - {rule: evaluated_on, dataset: "s3://b/holdout/", metric: accuracy, min: 0.9}

``evaluated_on`` needs at least one recorded evaluation of the version
(``Registry.add_evaluation``) on that dataset, matched by the dataset string
or by its fingerprint; with ``metric`` (and ``min`` and/or ``max``) the newest
such evaluation's metric must lie within the bounds.

``not_worse_than_production`` compares like with like where it can: when the
version and the production version both have evaluations carrying the metric
on a common dataset fingerprint, the newest such pair decides (the pair whose
later evaluation is the most recent) and its message names the dataset; else
the two versions' own (training) metrics are compared. The other rules read
the version's own metrics.

``approvals`` counts distinct identities (the Registry normalises them and
records each once).

Tolerances and bounds are in the metric's own units (0.5 accuracy points on a
0-1 accuracy is 0.005). A refusal lists every failed rule with its numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import msgspec
import yaml

from flywheel.protocol.errors import ConfigError
from flywheel.registry.types import Evaluation


class MinRule(msgspec.Struct, tag="min", tag_field="rule", frozen=True, forbid_unknown_fields=True):
    """metric >= value"""

    metric: str
    value: float


class MaxRule(msgspec.Struct, tag="max", tag_field="rule", frozen=True, forbid_unknown_fields=True):
    """metric <= value"""

    metric: str
    value: float


class NotWorseRule(
    msgspec.Struct, tag="not_worse_than_production", tag_field="rule", frozen=True, forbid_unknown_fields=True
):
    """Not worse than the current production version by more than tolerance
    (passes when nothing is in production yet): on their newest common
    evaluation dataset when there is one, else on their own metrics."""

    metric: str
    tolerance: float = 0.0
    higher_is_better: bool = True


class RequiredMetricsRule(
    msgspec.Struct, tag="required_metrics", tag_field="rule", frozen=True, forbid_unknown_fields=True
):
    metrics: list[str]


class ApprovalsRule(msgspec.Struct, tag="approvals", tag_field="rule", frozen=True, forbid_unknown_fields=True):
    """At least ``count`` distinct identities approved this version."""

    count: int


class EvaluatedOnRule(
    msgspec.Struct, tag="evaluated_on", tag_field="rule", frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    """The version was evaluated on ``dataset`` (its string or fingerprint);
    with ``metric``, the newest such evaluation has it within [min, max]."""

    dataset: str
    metric: str | None = None
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ConfigError("evaluated_on: dataset must be a non-empty dataset string or fingerprint")
        if self.metric == "":
            raise ConfigError("evaluated_on: metric must be a non-empty name (or left out)")
        bounded = self.min is not None or self.max is not None
        if self.metric is not None and not bounded:
            raise ConfigError(f"evaluated_on: metric {self.metric!r} needs a min and/or a max")
        if self.metric is None and bounded:
            raise ConfigError("evaluated_on: min/max need the metric they bound")
        for field in ("min", "max"):
            bound = getattr(self, field)
            if bound is not None and not math.isfinite(bound):
                raise ConfigError(f"evaluated_on: {field} must be a finite number, got {bound}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ConfigError(f"evaluated_on: min {self.min:g} > max {self.max:g}")


Rule = Union[MinRule, MaxRule, NotWorseRule, RequiredMetricsRule, ApprovalsRule, EvaluatedOnRule]


class GatePolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rules: list[Rule] = []


def parse_policy(data) -> GatePolicy:
    """Validate a mapping into a GatePolicy; ConfigError names the bad field."""
    try:
        return msgspec.convert(data, GatePolicy)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid gate policy: {exc}") from None


def load_policy(path: str | Path) -> GatePolicy:
    try:
        return parse_policy(yaml.safe_load(Path(path).read_text()))
    except OSError as exc:
        raise ConfigError(f"cannot read policy {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy {path} is not valid YAML: {exc}") from None


@dataclass(frozen=True)
class GateContext:
    metrics: dict[str, float]
    production_metrics: dict[str, float] | None  # None: nothing in production
    approvers: frozenset[str]
    evaluations: tuple[Evaluation, ...] = ()  # the version's evaluations, oldest first
    production_evaluations: tuple[Evaluation, ...] = ()  # the production version's, oldest first


def evaluate(policy: GatePolicy, ctx: GateContext) -> list[str]:
    """The failures (empty when every rule passes), each naming its numbers."""
    failures = []
    m = ctx.metrics
    for rule in policy.rules:
        if isinstance(rule, RequiredMetricsRule):
            missing = [k for k in rule.metrics if k not in m]
            if missing:
                failures.append(f"required_metrics: missing {missing}")
        elif isinstance(rule, ApprovalsRule):
            if len(ctx.approvers) < rule.count:
                failures.append(
                    f"approvals: {len(ctx.approvers)} distinct approval(s) {sorted(ctx.approvers)}, need {rule.count}"
                )
        elif isinstance(rule, EvaluatedOnRule):
            failure = _evaluated_on(rule, ctx.evaluations)
            if failure:
                failures.append(failure)
        elif isinstance(rule, NotWorseRule):
            failure = _not_worse(rule, ctx)
            if failure:
                failures.append(failure)
        elif rule.metric not in m:
            failures.append(f"{rule.__struct_config__.tag}: metric {rule.metric!r} is missing")
        elif isinstance(rule, MinRule):
            if not m[rule.metric] >= rule.value:
                failures.append(f"min: {rule.metric} {m[rule.metric]:g} < {rule.value:g}")
        elif isinstance(rule, MaxRule):
            if not m[rule.metric] <= rule.value:
                failures.append(f"max: {rule.metric} {m[rule.metric]:g} > {rule.value:g}")
    return failures


def _newest_common(metric: str, mine: tuple[Evaluation, ...],
                   theirs: tuple[Evaluation, ...]) -> tuple[Evaluation, Evaluation] | None:
    """The newest evaluation of each side on the fingerprint both were most
    recently evaluated on with ``metric``; None when they share none."""
    def newest(evals):
        out: dict[str, Evaluation] = {}
        for e in evals:  # ids grow with every insert; clocks may not
            if metric in e.metrics and (e.fingerprint not in out or e.id > out[e.fingerprint].id):
                out[e.fingerprint] = e
        return out

    a, b = newest(mine), newest(theirs)
    common = a.keys() & b.keys()
    if not common:
        return None
    fp = max(common, key=lambda f: max(a[f].id, b[f].id))
    return a[fp], b[fp]


def _not_worse(rule: NotWorseRule, ctx: GateContext) -> str | None:
    pair = _newest_common(rule.metric, ctx.evaluations, ctx.production_evaluations)
    if pair is None and rule.metric not in ctx.metrics:
        return f"not_worse_than_production: metric {rule.metric!r} is missing"
    if ctx.production_metrics is None:
        return None  # nothing in production yet
    if pair is not None:
        got, prod = pair[0].metrics[rule.metric], pair[1].metrics[rule.metric]
        where = f" on dataset {pair[0].dataset!r} (fingerprint {pair[0].fingerprint[:12]})"
    else:
        prod = ctx.production_metrics.get(rule.metric)
        if prod is None:
            return None  # production predates this metric: nothing to compare
        got, where = ctx.metrics[rule.metric], ""  # the versions' own metrics
    if rule.higher_is_better and not got >= prod - rule.tolerance:
        return (f"not_worse_than_production: {rule.metric} {got:g} < production {prod:g} - "
                f"tolerance {rule.tolerance:g} = {prod - rule.tolerance:g}{where}")
    if not rule.higher_is_better and not got <= prod + rule.tolerance:
        return (f"not_worse_than_production: {rule.metric} {got:g} > production {prod:g} + "
                f"tolerance {rule.tolerance:g} = {prod + rule.tolerance:g}{where}")
    return None


def _evaluated_on(rule: EvaluatedOnRule, evaluations: tuple[Evaluation, ...]) -> str | None:
    on = [e for e in evaluations if rule.dataset in (e.dataset, e.fingerprint)]
    if not on:
        return f"evaluated_on: no evaluation on dataset {rule.dataset!r}"
    if rule.metric is None:
        return None
    # The newest run decides: a later evaluation on the same data supersedes
    # an earlier one (ids grow with every insert; clocks may not).
    newest = max(on, key=lambda e: e.id)
    where = f"on dataset {rule.dataset!r} (run {newest.run_id or f'#{newest.id}'})"
    got = newest.metrics.get(rule.metric)
    if got is None:
        return f"evaluated_on: metric {rule.metric!r} is missing from the newest evaluation {where}"
    if rule.min is not None and not got >= rule.min:
        return f"evaluated_on: {rule.metric} {got:g} < {rule.min:g} {where}"
    if rule.max is not None and not got <= rule.max:
        return f"evaluated_on: {rule.metric} {got:g} > {rule.max:g} {where}"
    return None
