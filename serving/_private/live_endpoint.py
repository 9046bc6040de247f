"""One endpoint as an ingress replica routes it: the per-request choice of a
variant, and what the replica owes the controller about it.

Everything here runs on the ingress's own loop thread, the only thread that
touches it, so there are no locks. The per-request work is one choice (a
weighted hash or draw, or a bandit's pick from arm statistics the controller
sent), a window observation (a bisect and two increments) and, for endpoints
with more than one variant, one dict insert for the request id.
"""

from __future__ import annotations

import os
import random
import time
from collections import OrderedDict

from flywheel.protocol.errors import InvalidInputError, UnavailableError
from flywheel.serving.canary import VariantWindow
from flywheel.serving.policies import WeightedPicker, make_policy
from flywheel.serving.policy_config import decode_policy

CANARY_OUTCOMES = ("promoted", "rolled_back", "aborted")
ID_TTL_S = 600.0  # how long a request id takes feedback
MAX_IDS = 100_000  # per replica; the oldest go first
MAX_ID_LENGTH = 128


def new_request_id() -> str:
    return os.urandom(12).hex()


def usable_request_id(rid: str | None) -> bool:
    """A caller's id that may be echoed in a response header: printable
    ASCII without spaces, at most 128 characters (anything else could split
    the header; such requests get an id of ours instead)."""
    return bool(rid) and len(rid) <= MAX_ID_LENGTH and rid.isascii() and rid.isprintable() and " " not in rid


class LiveEndpoint:
    """Routing of one model name among its loaded versions."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.routable: tuple[str, ...] = ()
        self._picker: WeightedPicker | None = None
        self._policy = None
        self._single: str | None = None
        self.shadow: tuple[str, float] | None = None
        self.sticky_header = b"flywheel-routing-key"
        self.sticky_parameter = "routing_key"
        self.tracked = False  # ids are kept (feedback) and shadows sent
        self.weights: dict[str, float] = {}
        self.totals: dict[str, dict] = {}
        self.canary_step = 0.0
        self.canary_outcomes: dict[str, int] = {}
        self.policy_kind = "fixed"
        # owed to the controller (swapped out at each report)
        self.windows: dict[str, VariantWindow] = {}
        self.rewards: dict[str, list[float]] = {}
        self.new_ids: list[tuple[str, str, str]] = []
        self.used_ids: list[tuple[str, str]] = []
        self.ship = False  # ids also go to the controller (several ingress replicas)
        self._ids: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._rng = random.Random()

    def configure(self, snap: dict, loaded: set[str]) -> None:
        """Apply the controller's snapshot of this endpoint. Variants this
        replica has not (yet) loaded are left out of its choices. Everything
        is built before anything is replaced: a snapshot that cannot be
        applied raises and leaves the endpoint routing as before."""
        routable = tuple(v for v in snap["routable"] if v in loaded)
        shadow = snap.get("shadow")
        weights = snap.get("weights")
        picker = policy = single = None
        kind = "fixed"
        if weights is not None:
            weights = {v: w for v, w in weights.items() if v in routable and w > 0}
            if not weights and routable:
                weights = {routable[-1]: 1.0}
            if len(weights) == 1:
                single = next(iter(weights))
            elif weights:
                picker = WeightedPicker(weights)
        else:
            cfg = decode_policy(snap["policy"])
            kind = cfg.kind
            policy = make_policy(cfg, list(routable), snap.get("policy_state"))
            weights = policy.weights()
        self.routable = routable
        self.sticky_header = snap["sticky"]["header"].encode()
        self.sticky_parameter = snap["sticky"]["parameter"]
        self.totals = snap.get("totals", {})
        self.canary_step = snap.get("canary_step", 0.0)
        self.canary_outcomes = snap.get("canary_outcomes", {})
        self.shadow = (shadow["variant"], shadow["fraction"]) if shadow and shadow["variant"] in loaded else None
        self._picker, self._policy, self._single = picker, policy, single
        self.weights, self.policy_kind = weights, kind
        self.tracked = len(routable) > 1 or self.shadow is not None or policy is not None

    @property
    def needs_key(self) -> bool:
        """Whether a sticky key can change the choice (a weighted split)."""
        return self._picker is not None

    def choose(self, key: str | None) -> str:
        """The variant for one request (``key``: its sticky key, if any)."""
        if self._single is not None:
            return self._single
        if self._picker is not None:
            return self._picker.pick(key, self._rng)
        if self._policy is not None:
            return self._policy.choose(key)
        raise UnavailableError(f"endpoint {self.name!r} has no ready variant")

    def window(self, variant: str) -> VariantWindow:
        w = self.windows.get(variant)
        if w is None:
            w = self.windows[variant] = VariantWindow()
        return w

    # -- feedback -----------------------------------------------------------
    def remember(self, request_id: str, variant: str, ship: bool) -> None:
        self.ship = ship
        ids = self._ids
        ids[request_id] = (variant, time.monotonic())
        if len(ids) > MAX_IDS:
            ids.popitem(last=False)
        if ship:
            self.new_ids.append((request_id, self.name, variant))

    def take_feedback(self, request_id: str, reward: float) -> str | None:
        """Record a reward for a request this replica routed; the variant, or
        None when the id is not ours (the controller may know it)."""
        hit = self._ids.get(request_id)
        if hit is None:
            return None
        variant, at = hit
        if time.monotonic() - at > ID_TTL_S:
            del self._ids[request_id]
            return None
        if self._policy is not None and variant in self._policy.variants:
            # validates the reward for this policy (a Bernoulli arm takes 0..1)
            # before the id is used up; the controller's next snapshot
            # replaces these statistics with the sum over every replica
            self._policy.record(variant, reward)
        del self._ids[request_id]
        if self.ship:  # the controller knows this id too: it must not take it twice
            self.used_ids.append((request_id, self.name))
        arm = self.rewards.setdefault(variant, [0, 0.0, 0.0])
        arm[0] += 1
        arm[1] += reward
        arm[2] += reward * reward
        self.window(variant).add_reward(reward)
        return variant

    def expire(self) -> None:
        """Drop ids past their time (called about once a second)."""
        ids, cutoff = self._ids, time.monotonic() - ID_TTL_S
        while ids:
            rid, (_, at) = next(iter(ids.items()))
            if at >= cutoff:
                break
            del ids[rid]

    def take_report(self) -> tuple[dict, dict, list, list]:
        windows = {v: w.to_wire() for v, w in self.windows.items() if w.requests or w.reward_count or w.shadow_compared}
        rewards, ids, used = self.rewards, self.new_ids, self.used_ids
        self.windows, self.rewards, self.new_ids, self.used_ids = {}, {}, [], []
        return windows, rewards, ids, used

    def arm_means(self) -> dict[str, float]:
        """A bandit's mean reward per arm (empty for fixed splits)."""
        if self._policy is None:
            return {}
        return {v: arm.get("mean") or 0.0 for v, arm in self._policy.state().get("arms", {}).items()}


def check_reward(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"reward must be a number, not {type(value).__name__}")
    reward = float(value)
    if reward != reward or reward in (float("inf"), float("-inf")):
        raise InvalidInputError("reward must be a finite number")
    return reward


MAX_LABELS = 1 << 16  # numbers in one feedback label list (one per captured row)


def check_label(value) -> float | list[float]:
    """A feedback label: a finite number (every row of the request), or a
    list of them (one per row of a batched request). InvalidInputError
    naming ``label`` otherwise."""
    def one(v, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidInputError(f"{where} must be a number, not {type(v).__name__}")
        if v != v or v in (float("inf"), float("-inf")):
            raise InvalidInputError(f"{where} must be a finite number")
        return v

    if isinstance(value, list):
        if not 1 <= len(value) <= MAX_LABELS:
            raise InvalidInputError(f"label: a list must hold 1 to {MAX_LABELS} numbers (one per row)")
        return [one(v, f"label[{i}]") for i, v in enumerate(value)]
    return one(value, "label")


_COUNTERS = (  # summary field, metric, help
    ("requests", "flywheel_endpoint_requests_total",
     "Requests answered by each variant, shadow requests included (all ingress replicas)"),
    ("errors", "flywheel_endpoint_errors_total", "Of those, answered with an error (shadow requests included)"),
    ("rewards", "flywheel_endpoint_rewards_total", "Feedback rewards received per variant"),
    ("reward_sum", "flywheel_endpoint_reward_sum_total", "Sum of the rewards received per variant"),
    ("shadow_compared", "flywheel_endpoint_shadow_comparisons_total", "Shadow answers compared with the primary's"),
    ("shadow_agreed", "flywheel_endpoint_shadow_agreements_total", "Shadow answers that agreed with the primary's"),
    ("shadow_abs_diff_sum", "flywheel_endpoint_shadow_abs_diff_sum_total",
     "Sum of the shadow answers' mean abs differences"),
)


def render_endpoint_metrics(endpoints: list[LiveEndpoint]) -> bytes:
    """Prometheus text for every endpoint: the controller's totals over all
    ingress replicas (as of the last snapshot, about a second old), the
    current traffic shares, bandit arm means and the canary step.

    Every node's ingress renders the same cluster-wide totals: dashboards
    take ``max`` over instances, not ``sum``. Latency per variant is not
    here: a quantile since the deployment started cannot be windowed, and
    ``flywheel_request_latency_seconds{model=endpoint, version=variant}``
    (serving/metrics.py) is the histogram to take quantiles of."""
    out: list[str] = []
    rows = [(ep, v, t) for ep in endpoints for v, t in sorted(ep.totals.items())]

    def lab(ep: LiveEndpoint, v: str | None = None) -> str:
        name = ep.name.replace("\\", "\\\\").replace('"', '\\"')
        return f'endpoint="{name}"' + (f',variant="{v}"' if v is not None else "")

    for field, metric, help_text in _COUNTERS:
        out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        out += [f"{metric}{{{lab(ep, v)}}} {t.get(field) or 0}" for ep, v, t in rows]
    out += ["# HELP flywheel_endpoint_traffic_share Share of new requests each variant gets now",
            "# TYPE flywheel_endpoint_traffic_share gauge"]
    out += [f"flywheel_endpoint_traffic_share{{{lab(ep, v)}}} {w}" for ep in endpoints for v, w in sorted(ep.weights.items())]
    out += ["# HELP flywheel_endpoint_bandit_arm_mean A bandit arm's mean reward so far (posterior parameters: GET /v2/endpoints/{name})",
            "# TYPE flywheel_endpoint_bandit_arm_mean gauge"]
    for ep in endpoints:
        for v, mean in sorted(ep.arm_means().items()):
            out.append(f"flywheel_endpoint_bandit_arm_mean{{{lab(ep, v)}}} {mean}")
    out += ["# HELP flywheel_endpoint_canary_traffic_ratio Share of traffic (0-1) the running canary gets (0 = none)",
            "# TYPE flywheel_endpoint_canary_traffic_ratio gauge"]
    # the controller sends the step in percent, as canary configs and events speak of it
    out += [f"flywheel_endpoint_canary_traffic_ratio{{{lab(ep)}}} {ep.canary_step / 100}" for ep in endpoints]
    out += ["# HELP flywheel_endpoint_canaries_total Canaries ended, by outcome (promoted, rolled_back, aborted)",
            "# TYPE flywheel_endpoint_canaries_total counter"]
    out += [f'flywheel_endpoint_canaries_total{{{lab(ep)},outcome="{o}"}} {ep.canary_outcomes.get(o, 0)}'
            for ep in endpoints for o in CANARY_OUTCOMES]
    return ("\n".join(out) + "\n").encode()
