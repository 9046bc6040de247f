"""Routing policy configs: what an operator writes to say which variant (model
version) of an endpoint serves a request.

The ``kind``-tagged union :data:`PolicyConfig` (a fixed split or one of the
bandits), decoded and validated by :func:`decode_policy`; errors name the
field. serving/policies.py turns a config into the runtime Policy that
chooses per request (:func:`~flywheel.serving.policies.make_policy`).

A bandit routes among its ``arms`` (the variants it was set over; empty:
every variant it is given), so a variant added to an endpoint later takes
no bandit traffic until a policy names it; a fixed split routes among the
variants its weights name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from flywheel.protocol.errors import ConfigError

KINDS = ("fixed", "epsilon_greedy", "thompson", "ucb1")
REWARDS = ("bernoulli", "gaussian")


def _check_arms(arms: tuple[str, ...]) -> None:
    if not all(isinstance(a, str) and a for a in arms) or len(set(arms)) != len(arms):
        raise ConfigError(f"policy.arms {list(arms)} must be distinct, non-empty variant names")



class FixedPolicy(msgspec.Struct, tag="fixed", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    """A fixed split. weights: variant -> weight (finite, >= 0, not all 0),
    normalized, so ``{"1": 95, "2": 5}`` equals ``{"1": 0.95, "2": 0.05}``.
    Requests with a key stick to one variant (weighted rendezvous hashing)."""

    weights: dict[str, float]
    kind: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        bad = {v: w for v, w in self.weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ConfigError(f"policy.weights {bad}: each weight must be a finite number >= 0")
        if not any(w > 0 for w in self.weights.values()):
            raise ConfigError("policy.weights: at least one variant needs a weight > 0")


class EpsilonGreedyPolicy(
    msgspec.Struct, tag="epsilon_greedy", tag_field="kind", frozen=True, forbid_unknown_fields=True
):
    """With probability epsilon (in [0, 1]) a uniformly random variant, else the
    one with the best mean reward; a variant without rewards counts as best."""

    epsilon: float = 0.1
    arms: tuple[str, ...] = ()
    kind: ClassVar[str] = "epsilon_greedy"

    def __post_init__(self) -> None:
        _check_arms(self.arms)
        if not 0 <= self.epsilon <= 1:
            raise ConfigError(f"policy.epsilon {self.epsilon} must lie in [0, 1]")


class ThompsonPolicy(msgspec.Struct, tag="thompson", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    """Thompson sampling. reward: ``bernoulli`` (rewards in [0, 1], a fraction
    counting as a partial success; Beta(1, 1) prior) or ``gaussian`` (any real
    reward; serving/policies.py's Thompson policy says which posterior)."""

    reward: str = "bernoulli"
    arms: tuple[str, ...] = ()
    kind: ClassVar[str] = "thompson"

    def __post_init__(self) -> None:
        _check_arms(self.arms)
        if self.reward not in REWARDS:
            raise ConfigError(f"policy.reward {self.reward!r}: choose from {', '.join(REWARDS)}")


class UCB1Policy(msgspec.Struct, tag="ucb1", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    """UCB1: mean + scale * sqrt(2 ln N / n). Rewards must lie in [0, 1];
    scale (> 0) widens (> 1) or narrows (< 1) exploration."""

    scale: float = 1.0
    arms: tuple[str, ...] = ()
    kind: ClassVar[str] = "ucb1"

    def __post_init__(self) -> None:
        _check_arms(self.arms)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"policy.scale {self.scale} must be a finite number > 0")


PolicyConfig = FixedPolicy | EpsilonGreedyPolicy | ThompsonPolicy | UCB1Policy


def decode_policy(data: bytes | str | Mapping[str, Any]) -> PolicyConfig:
    """A PolicyConfig from JSON bytes/str or a mapping (e.g. from YAML).

    Raises ConfigError naming the bad field; an unknown ``kind`` lists the kinds.
    """
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        try:
            data = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise ConfigError(f"policy is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"policy must be a mapping with a 'kind' field, got {type(data).__name__}")
    if data.get("kind") not in KINDS:
        raise ConfigError(f"policy.kind {data.get('kind')!r}: choose from {', '.join(KINDS)}")
    try:
        return msgspec.convert(dict(data), PolicyConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid policy: {exc}") from None
