"""Canary rollouts: raise a new variant's share of traffic step by step while
its health gates pass; roll back at once when one fails.

Who does what: replicas fill a :class:`VariantWindow` per variant (requests,
errors, a latency histogram, rewards, shadow comparisons) and ship
``to_wire()`` to the controller, which merges them and calls
:meth:`Canary.evaluate` every so often. The Canary owns no clock and does no
I/O: every method takes ``now`` (seconds, any monotonic origin), so that a
controller restart can resume it from :meth:`Canary.state`.

The windows' contract: ``evaluate`` gets the stats gathered *since the
current step started* (:attr:`Canary.step_started_at`). Whenever ``evaluate``
returns anything other than "hold" (or :attr:`Canary.step` changes), the
caller resets both windows.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from itertools import accumulate, pairwise
from typing import Any

import msgspec

from flywheel.protocol.errors import ConfigError, InvalidInputError, PreconditionFailedError

# Latency histogram bucket edges, shared by every process so windows merge:
# 20 per decade from 10 us to 63 s (each bucket is 12.2 % wide). Bucket i
# counts latencies in (EDGES[i-1], EDGES[i]]; the last one those above 63 s.
BUCKETS_PER_DECADE = 20
BUCKET_EDGES: tuple[float, ...] = tuple(
    1e-5 * 10 ** (i / BUCKETS_PER_DECADE) for i in range(math.ceil(BUCKETS_PER_DECADE * math.log10(60 / 1e-5)) + 1)
)
_NB = len(BUCKET_EDGES) + 1
P99_FLOOR_S = 1e-3  # the p99 gate compares with at least this baseline p99
ACTIONS = ("hold", "advance", "promote", "rollback")
STATUSES = ("running", "rolled_back", "promoted", "completed", "aborted")
_INF = math.inf


class VariantWindow:
    """One variant's stats over a window; mergeable, cheap to ship.

    Every observed request, failed or not, counts in the latency histogram
    (a timeout is exactly the latency a gate must see). Not thread-safe.
    """

    __slots__ = ("requests", "errors", "buckets", "max_latency_s", "reward_count", "reward_sum",
                 "shadow_compared", "shadow_agreed", "shadow_abs_diff_sum")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = self.errors = self.reward_count = 0
        self.shadow_compared = self.shadow_agreed = 0
        self.reward_sum = self.shadow_abs_diff_sum = self.max_latency_s = 0.0
        self.buckets = [0] * _NB

    def observe(self, latency_s: float, ok: bool) -> None:
        """One request. InvalidInputError when latency_s is not finite and >= 0."""
        if not 0.0 <= latency_s < _INF:
            raise InvalidInputError(f"latency_s {latency_s!r} must be a finite number >= 0")
        self.requests += 1
        if not ok:
            self.errors += 1
        self.buckets[bisect_left(BUCKET_EDGES, latency_s)] += 1
        if latency_s > self.max_latency_s:
            self.max_latency_s = latency_s

    def add_reward(self, reward: float) -> None:
        """One reward (finite, else InvalidInputError)."""
        if not (isinstance(reward, (int, float)) and math.isfinite(reward)):
            raise InvalidInputError(f"reward {reward!r} must be a finite number")
        self.reward_count += 1
        self.reward_sum += reward

    def observe_shadow(self, agreed: bool, mean_abs_diff: float) -> None:
        """One shadow comparison (see policies.compare_outputs). A non-finite
        diff (outputs that did not match up) counts as a disagreement only."""
        self.shadow_compared += 1
        self.shadow_agreed += bool(agreed)
        if math.isfinite(mean_abs_diff):
            self.shadow_abs_diff_sum += mean_abs_diff

    def merge(self, other: VariantWindow) -> VariantWindow:
        """Add ``other``'s stats into this window; returns self."""
        for name in ("requests", "errors", "reward_count", "reward_sum", "shadow_compared", "shadow_agreed",
                     "shadow_abs_diff_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        self.max_latency_s = max(self.max_latency_s, other.max_latency_s)
        return self

    def copy(self) -> VariantWindow:
        return VariantWindow().merge(self)

    @property
    def error_rate(self) -> float:
        """errors / requests (0.0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.reward_count if self.reward_count else None

    @property
    def shadow_agreement(self) -> float | None:
        return self.shadow_agreed / self.shadow_compared if self.shadow_compared else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile (q in [0, 1]) of the latencies in seconds, None when
        empty: linear within its bucket, so within one bucket width (12.2 %)
        of the true value above 10 us, and never above the largest latency."""
        if not 0 <= q <= 1:
            raise InvalidInputError(f"quantile q {q!r} must lie in [0, 1]")
        cum = list(accumulate(self.buckets))
        if not cum[-1]:
            return None
        rank = q * cum[-1]
        i = bisect_left(cum, rank)
        while not self.buckets[i]:  # rank 0: the first non-empty bucket
            i += 1
        lo = BUCKET_EDGES[i - 1] if i else 0.0
        hi = BUCKET_EDGES[i] if i < len(BUCKET_EDGES) else self.max_latency_s
        before = cum[i] - self.buckets[i]
        return min(lo + (hi - lo) * (rank - before) / self.buckets[i], self.max_latency_s)

    def p99(self) -> float | None:
        return self.quantile(0.99)

    def to_wire(self) -> dict[str, Any]:
        """A compact JSON-able dict; the histogram as sparse [index, count] pairs."""
        return {
            "requests": self.requests, "errors": self.errors, "nb": _NB,
            "buckets": [[i, c] for i, c in enumerate(self.buckets) if c], "max_latency_s": self.max_latency_s,
            "reward_count": self.reward_count, "reward_sum": self.reward_sum,
            "shadow_compared": self.shadow_compared, "shadow_agreed": self.shadow_agreed,
            "shadow_abs_diff_sum": self.shadow_abs_diff_sum,
        }

    @classmethod
    def from_wire(cls, data: Any) -> VariantWindow:
        """Inverse of :meth:`to_wire`; InvalidInputError when malformed or
        made with other bucket edges."""
        w = cls()
        try:
            if data["nb"] != _NB:
                raise InvalidInputError(f"window has {data['nb']} latency buckets, this process {_NB}")
            for i, c in data["buckets"]:
                w.buckets[i] += int(c)
            for name in ("requests", "errors", "reward_count", "shadow_compared", "shadow_agreed"):
                setattr(w, name, int(data[name]))
            for name in ("max_latency_s", "reward_sum", "shadow_abs_diff_sum"):
                setattr(w, name, float(data[name]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInputError(f"malformed variant window: {exc!r}") from None
        return w


class GateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Health gates of a canary step, judged on the step's windows.

    max_error_rate_increase: canary error rate minus baseline error rate, in [0, 1].
    max_p99_ratio: canary p99 / max(baseline p99, 1 ms), > 0 (None: off).
    max_reward_drop: baseline minus canary mean reward, >= 0 (None: off);
        judged once both have min_rewards (>= 1) rewards.
    max_drift: the canary's drift score may not exceed it (None: off): the
        share of its input features (0-1) found drifting in its worst drift
        window of the step (serving/drift_monitor.py). A step with this gate
        does not advance before one window was scored (max_step_s bounds it).
    min_requests: no gate is judged before the canary's window has this many (>= 1).
    """

    max_error_rate_increase: float = 0.01
    max_p99_ratio: float | None = 2.0
    max_reward_drop: float | None = None
    min_rewards: int = 20
    max_drift: float | None = None
    min_requests: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.max_error_rate_increase <= 1:
            raise ConfigError(f"gates.max_error_rate_increase {self.max_error_rate_increase} must lie in [0, 1]")
        if self.max_p99_ratio is not None and not 0 < self.max_p99_ratio < _INF:
            raise ConfigError(f"gates.max_p99_ratio {self.max_p99_ratio} must be a finite number > 0 (or null)")
        if self.max_reward_drop is not None and not 0 <= self.max_reward_drop < _INF:
            raise ConfigError(f"gates.max_reward_drop {self.max_reward_drop} must be a finite number >= 0 (or null)")
        if self.max_drift is not None and not math.isfinite(self.max_drift):
            raise ConfigError(f"gates.max_drift {self.max_drift} must be a finite number (or null)")
        if self.min_rewards < 1 or self.min_requests < 1:
            raise ConfigError("gates.min_rewards and gates.min_requests must be >= 1")


class CanaryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A canary rollout of ``variant`` against ``baseline``.

    baseline: the variant now serving; empty = the caller fills in the
        endpoint's current one (a Canary refuses an empty baseline).
    steps: the canary's traffic percent per step, strictly increasing in (0, 100], ending at 100.
    hold_s: how long (> 0) each step must stay healthy before the next.
    promote: after the last step, make the canary the endpoint's only
        variant; False: stay at 100 % with status "completed".
    max_step_s: a step whose canary window has not reached
        gates.min_requests after this long (> 0) rolls back (None: wait forever).
    """

    variant: str
    baseline: str = ""
    steps: tuple[float, ...] = (1, 5, 25, 50, 100)
    hold_s: float = 30.0
    gates: GateConfig = GateConfig()
    promote: bool = True
    max_step_s: float | None = None

    def __post_init__(self) -> None:
        if not self.variant:
            raise ConfigError("canary.variant must name the new variant")
        if self.baseline == self.variant:
            raise ConfigError(f"canary.baseline {self.baseline!r} must differ from canary.variant")
        s = self.steps
        if not s or any(not 0 < p <= 100 for p in s) or any(a >= b for a, b in pairwise(s)) or s[-1] != 100:
            raise ConfigError(
                f"canary.steps {list(s)} must be percents in (0, 100], strictly increasing, ending at 100"
            )
        if not 0 < self.hold_s < _INF:
            raise ConfigError(f"canary.hold_s {self.hold_s} must be a finite number > 0")
        if self.max_step_s is not None and not 0 < self.max_step_s < _INF:
            raise ConfigError(f"canary.max_step_s {self.max_step_s} must be a finite number > 0 (or null)")


class GateResult(msgspec.Struct, frozen=True):
    """One gate's verdict: value vs limit (None when not judged), and why."""

    name: str
    passed: bool
    value: float | None
    limit: float | None
    detail: str


class Decision(msgspec.Struct, frozen=True):
    """What evaluate decided (and already applied to the Canary): ``action``
    is one of ACTIONS; ``gates`` is empty when none was judged."""

    action: str
    gates: list[GateResult]
    reason: str


class Canary:
    """The canary state machine (see the module doc for the window contract).

    Not thread-safe: one controller task owns it.
    """

    def __init__(self, config: CanaryConfig, now: float) -> None:
        if not config.baseline:
            raise ConfigError("canary.baseline is empty: fill in the endpoint's current variant")
        self.config = config
        self.status = "running"
        self.step = 0  # index into config.steps
        self.started_at = self.step_started_at = float(now)
        self.history: list[dict[str, Any]] = []
        self.last_gates: list[GateResult] = []
        # The baseline's stats of earlier steps: the late steps give it little
        # traffic (none at 100 %), and its gates still need a reference.
        self._baseline_ref = VariantWindow()
        self._log(now, "start", [], f"canary {config.variant} vs baseline {config.baseline}")

    @property
    def percent(self) -> float:
        """The canary's share of traffic now, in percent."""
        return 0.0 if self.status in ("rolled_back", "aborted") else float(self.config.steps[self.step])

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def weights(self) -> dict[str, float]:
        """Traffic shares, summing to 1: {baseline, canary}; {canary: 1} once promoted."""
        c, b = self.config.variant, self.config.baseline
        if self.status == "promoted":
            return {c: 1.0}
        p = self.percent / 100
        return {b: 1.0 - p, c: p}

    def evaluate(
        self, now: float, baseline: VariantWindow, canary: VariantWindow, drift: float | None = None
    ) -> Decision:
        """Judge the current step on its windows and apply the decision.

        rollback: the canary window has gates.min_requests and a gate fails
        (at once, hold_s or not), or max_step_s passed without min_requests.
        advance / promote: hold_s passed since the step started, with
        min_requests and every gate passing (promote on the last step; with
        promote=False the status becomes "completed" and the action is hold).
        Otherwise hold. A finished canary always holds and changes nothing.
        """
        if self.finished:
            return Decision("hold", [], f"canary is {self.status}")
        g, cfg = self.config.gates, self.config
        elapsed = now - self.step_started_at
        pct = self.percent
        if canary.requests < g.min_requests:
            self.last_gates = []
            if cfg.max_step_s is not None and elapsed >= cfg.max_step_s:
                return self._apply(now, "rollback", [], f"not enough traffic: {canary.requests} of "
                                   f"{g.min_requests} requests at {pct:g} % after {elapsed:.1f} s")
            return Decision("hold", [], f"waiting for traffic: {canary.requests} of {g.min_requests} requests")
        gates = self.last_gates = self._judge(baseline, canary, drift)
        failed = [x.name for x in gates if not x.passed]
        if failed:
            return self._apply(now, "rollback", gates, f"gate(s) failed at {pct:g} %: {', '.join(failed)}")
        if elapsed < cfg.hold_s:
            return Decision("hold", gates, f"healthy at {pct:g} % for {elapsed:.1f} of {cfg.hold_s:g} s")
        if g.max_drift is not None and drift is None:  # no step passes a drift gate without a score
            if cfg.max_step_s is not None and elapsed >= cfg.max_step_s:
                return self._apply(now, "rollback", gates, f"no drift score for the canary at {pct:g} % "
                                   f"after {elapsed:.1f} s")
            return Decision("hold", gates, f"healthy at {pct:g} %; waiting for a drift window of the canary")
        if self.step == len(cfg.steps) - 1:
            if cfg.promote:
                return self._apply(now, "promote", gates, f"healthy at 100 % for {elapsed:.1f} s: promoted")
            self._apply(now, "completed", gates, f"healthy at 100 % for {elapsed:.1f} s: completed")
            return Decision("hold", gates, "completed: the canary serves 100 %, promote is off")
        self._baseline_ref.merge(baseline)  # the step's whole window, by contract
        nxt = cfg.steps[self.step + 1]
        return self._apply(now, "advance", gates, f"healthy at {pct:g} % for {elapsed:.1f} s: to {nxt:g} %")

    def abort(self, now: float, reason: str) -> None:
        """Stop now and send all traffic back to the baseline (status "aborted").
        PreconditionFailedError when the canary has already finished."""
        if self.finished:
            raise PreconditionFailedError(f"canary of {self.config.variant} is already {self.status}")
        self._apply(now, "abort", [], reason)

    def _judge(self, baseline: VariantWindow, canary: VariantWindow, drift: float | None) -> list[GateResult]:
        g = self.config.gates
        ref, src = baseline, "baseline"
        if baseline.requests < g.min_requests and self._baseline_ref.requests:
            ref, src = self._baseline_ref.copy().merge(baseline), "baseline (incl. earlier steps)"
        inc = canary.error_rate - ref.error_rate
        out = [GateResult("error_rate", inc <= g.max_error_rate_increase, inc, g.max_error_rate_increase,
                          f"canary {canary.errors}/{canary.requests} vs {src} {ref.errors}/{ref.requests} errors")]
        if g.max_p99_ratio is not None:
            cp, bp = canary.p99(), ref.p99()
            ratio = cp / max(bp or 0.0, P99_FLOOR_S)
            detail = (f"canary p99 {cp * 1e3:.3g} ms vs {src} {bp * 1e3:.3g} ms (floor 1 ms)" if bp is not None else
                      f"canary p99 {cp * 1e3:.3g} ms vs the 1 ms floor: no baseline requests")
            out.append(GateResult("p99", ratio <= g.max_p99_ratio, ratio, g.max_p99_ratio, detail))
        if g.max_reward_drop is not None:
            if min(canary.reward_count, ref.reward_count) >= g.min_rewards:
                drop = ref.mean_reward - canary.mean_reward
                out.append(GateResult("reward", drop <= g.max_reward_drop, drop, g.max_reward_drop,
                                      f"{src} mean {ref.mean_reward:.4g} - canary mean {canary.mean_reward:.4g}"))
            else:
                out.append(GateResult("reward", True, None, g.max_reward_drop, f"not judged: canary "
                                      f"{canary.reward_count}, {src} {ref.reward_count} of {g.min_rewards} rewards"))
        if g.max_drift is not None:
            if drift is None:
                out.append(GateResult("drift", True, None, g.max_drift, "not judged: no drift score"))
            else:  # written so that a NaN score fails
                out.append(GateResult("drift", drift <= g.max_drift, drift, g.max_drift, "canary drift score"))
        return out

    def _apply(self, now: float, action: str, gates: list[GateResult], reason: str) -> Decision:
        if action == "advance":
            self.step += 1
            self.step_started_at = float(now)
        else:
            self.status = {"promote": "promoted", "completed": "completed", "rollback": "rolled_back",
                           "abort": "aborted"}[action]
        self._log(now, action, gates, reason)
        return Decision(action, gates, reason)

    def _log(self, now: float, action: str, gates: list[GateResult], reason: str) -> None:
        # step and percent as they are after the action (0 % after a rollback);
        # the reason says where the canary stood
        self.history.append({"time": float(now), "step": self.step, "percent": self.percent, "action": action,
                             "reason": reason, "gates": msgspec.to_builtins(gates)})

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot for :meth:`from_state`."""
        return {
            "variant": self.config.variant, "baseline": self.config.baseline, "status": self.status,
            "step": self.step, "started_at": self.started_at, "step_started_at": self.step_started_at,
            "history": [dict(h) for h in self.history], "last_gates": msgspec.to_builtins(self.last_gates),
            "baseline_ref": self._baseline_ref.to_wire(),
        }

    @classmethod
    def from_state(cls, config: CanaryConfig, state: dict[str, Any]) -> Canary:
        """Resume from :meth:`state` (e.g. after a controller restart). An
        empty config.baseline is taken from the state. InvalidInputError when
        the state is malformed or belongs to another canary."""
        try:
            if state["variant"] != config.variant:
                raise InvalidInputError(f"canary state is for {state['variant']!r}, not {config.variant!r}")
            if not config.baseline:
                config = msgspec.structs.replace(config, baseline=state["baseline"])
            step, status = state["step"], state["status"]
            if status not in STATUSES or not (isinstance(step, int) and 0 <= step < len(config.steps)):
                raise InvalidInputError(f"canary state: status {status!r} / step {step!r} out of range")
            c = cls(config, float(state["started_at"]))
            c.status, c.step, c.step_started_at = status, step, float(state["step_started_at"])
            c.history = [dict(h) for h in state["history"]]
            c.last_gates = msgspec.convert(state["last_gates"], list[GateResult])
            c._baseline_ref = VariantWindow.from_wire(state["baseline_ref"])
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
            raise InvalidInputError(f"malformed canary state: {exc!r}") from None
        return c
