"""A loop's declaration: the ``loops:`` section of a deploy config.

One loop keeps one endpoint fresh. Everything is validated when the config is
loaded (the training template included), so a loop that cannot run fails the
deploy naming the field, before anything starts.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from flywheel.loops.guards import GuardSpec
from flywheel.loops.notify import WebhookSpec
from flywheel.loops.triggers import TriggerSpec
from flywheel.protocol.errors import ConfigError, FlywheelError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class LoopData(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a run trains on.

    captured: train on the endpoint's captured, labelled traffic mixed with
        the template's own dataset (needs ``capture`` on the endpoint or its
        model); False trains on the template's dataset alone.
    captured_fraction: the share of captured rows in the training set, in (0, 1].
    since: which captures: ``last_run`` (those after the previous run started;
        all of them for the first run) or ``all``.
    """

    captured: bool = True
    captured_fraction: float = 0.5
    since: str = "last_run"

    def __post_init__(self) -> None:
        if not 0 < self.captured_fraction <= 1:
            raise ConfigError(f"data.captured_fraction {self.captured_fraction} must lie in (0, 1]")
        if self.since not in ("last_run", "all"):
            raise ConfigError(f"data.since {self.since!r} must be 'last_run' or 'all'")


class LoopSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One continuous-training loop.

    name: the loop's name (letters, digits, ``_.-``).
    endpoint: the served model name it keeps fresh.
    model: the registry model its candidates are registered under ("" = the
        endpoint's name).
    job: the training job template: a training JobSpec mapping (see
        training/spec.py). Each run submits it with ``export`` set by the loop
        (register under ``model``, no canary of its own) and, with
        ``data.captured``, the dataset replaced by captured + original rows.
    triggers: what starts a run (schedule, drift, new_data, performance; a
        manual trigger is always available: ``flywheel loops trigger``).
    guards: cooldown, daily budget, never during a canary or swap.
    policy: gate rules set on ``model`` when the loop starts (the registry's
        GatePolicy mapping, e.g. ``{rules: [{rule: not_worse_than_production,
        metric: accuracy}]}``); None keeps the model's own policy.
    canary: the canary plan for a candidate that passed the gates: the
        ``POST /v2/endpoints/{name}/canary`` body without ``variant``
        (steps, hold_s, gates, max_step_s).
    notify: webhooks told of drift, runs, gate refusals, approvals needed
        and canary outcomes.
    priority: the training job's queue priority.
    approval_timeout_s: how long a run waits in ``awaiting_approval`` before
        it ends as refused.
    job_retries: how often a failed training job is resumed from its last
        checkpoint before the run fails.
    tick_s: how often the controller looks at triggers and the running run.
    load_timeout_s: how long a candidate may take to load on the endpoint.
    stuck_after_s: how long a step may keep failing with errors a retry
        could clear (the endpoint or the database unavailable) before the
        run ends as failed; any other refusal ends it at once.
    """

    name: str
    endpoint: str
    job: dict[str, Any]
    model: str = ""
    triggers: list[TriggerSpec] = []
    guards: GuardSpec = GuardSpec()
    data: LoopData = LoopData()
    policy: dict[str, Any] | None = None
    canary: dict[str, Any] = {}
    notify: list[WebhookSpec] = []
    priority: int = 0
    approval_timeout_s: float = 86400.0
    job_retries: int = 1
    tick_s: float = 2.0
    load_timeout_s: float = 600.0
    stuck_after_s: float = 1800.0

    def __post_init__(self) -> None:
        where = f"loops.{self.name}"
        if not _NAME.match(self.name):
            raise ConfigError(f"loops: name {self.name!r} must match {_NAME.pattern}")
        if not self.endpoint:
            raise ConfigError(f"{where}.endpoint must name a served model")
        if self.model and not _NAME.match(self.model):
            raise ConfigError(f"{where}.model {self.model!r} must match {_NAME.pattern}")
        from flywheel.training.spec import parse_spec

        try:
            parse_spec(self.job)
        except FlywheelError as exc:
            raise ConfigError(f"{where}.job: {exc.message}") from None
        if self.policy is not None:
            from flywheel.registry import parse_policy

            try:
                parse_policy(self.policy)
            except FlywheelError as exc:
                raise ConfigError(f"{where}.policy: {exc.message}") from None
        if "variant" in self.canary:
            raise ConfigError(f"{where}.canary.variant is set by the loop (the candidate); leave it out")
        if not self.approval_timeout_s > 0:
            raise ConfigError(f"{where}.approval_timeout_s must be > 0")
        if self.job_retries < 0:
            raise ConfigError(f"{where}.job_retries must be >= 0")
        if not self.load_timeout_s > 0 or not self.stuck_after_s > 0:
            raise ConfigError(f"{where}.load_timeout_s and stuck_after_s must be > 0")
        if not 0.05 <= self.tick_s <= 3600:
            raise ConfigError(f"{where}.tick_s {self.tick_s} must lie in [0.05, 3600]")

    @property
    def model_name(self) -> str:
        return self.model or self.endpoint


def parse_loop(data: Any) -> LoopSpec:
    """Validate one mapping into a LoopSpec (ConfigError names the field)."""
    try:
        return msgspec.convert(data, LoopSpec, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid loop: {exc}") from None
