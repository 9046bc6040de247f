"""Routing policies at run time: which variant (model version) of an endpoint
serves a request.

:func:`make_policy` turns a config (serving/policy_config.py) into a runtime
:class:`Policy`: a fixed split (:class:`WeightedPicker`) or a bandit
(epsilon-greedy, Thompson sampling, UCB1). Each ingress replica calls
:meth:`Policy.choose` per request (microseconds, no I/O); the controller
folds rewards into its own Policy (``record``, ``add_stats``) and pushes
``state()`` snapshots that replicas ``load_state()`` about every 0.5 s, so a
replica's bandit decides on stats up to one push old.

Thread-safety: none; a Policy belongs to one thread (a replica's event loop).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from hashlib import blake2b
from itertools import accumulate
from typing import Any, ClassVar

import numpy as np

from flywheel.protocol.errors import ConfigError, InvalidInputError
from flywheel.serving.policy_config import (
    KINDS,
    EpsilonGreedyPolicy,
    FixedPolicy,
    PolicyConfig,
    ThompsonPolicy,
    UCB1Policy,
)

_MC_DRAWS = 1000  # posterior draws behind Thompson's weights() estimate
_TWO_52 = float(1 << 52)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class WeightedPicker:
    """Picks a variant by weight; built once per weight set, cheap per pick.

    ``pick(key, rng)``: with a key, weighted rendezvous hashing: each variant
    scores ``-w / ln(u)`` with ``u`` in (0, 1) from blake2b(key, variant), and
    the top score wins. The same key keeps its variant while the weights stay,
    in every process (no salted ``hash()``); variants win in proportion to
    their weights; and raising one variant's weight only moves keys *to* it
    (its score alone grows), so a canary ramp never bounces a user back.
    Without a key: a random draw by weight from ``rng`` (``random.Random``).
    Zero-weight variants are never picked. Raises InvalidInputError for a
    negative or non-finite weight, or when no weight is > 0.
    """

    __slots__ = ("weights", "_names", "_suffixes", "_w", "_cum", "_total")

    def __init__(self, weights: Mapping[str, float]) -> None:
        bad = {v: w for v, w in weights.items() if not (_finite(w) and w >= 0)}
        if bad:
            raise InvalidInputError(f"weights {bad}: each must be a finite number >= 0")
        live = [(v, float(w)) for v, w in weights.items() if w > 0]
        if not live:
            raise InvalidInputError("weights: at least one variant needs a weight > 0")
        total = sum(w for _, w in live)
        self.weights = {v: w / total for v, w in weights.items()}  # normalized share, zeros kept
        self._names = tuple(v for v, _ in live)
        self._suffixes = tuple(b"\0" + v.encode("utf-8", "surrogatepass") for v in self._names)
        self._w = tuple(w for _, w in live)
        self._cum = list(accumulate(self._w))
        self._total = self._cum[-1]  # not `total`: bisect must never run past the end

    def pick(self, key: str | None, rng: Any) -> str:
        names = self._names
        if len(names) == 1:
            return names[0]
        if key is None:
            return names[bisect_right(self._cum, rng.random() * self._total)]
        kb = key.encode("utf-8", "surrogatepass")
        best, best_cost = names[0], math.inf
        for name, suffix, w in zip(names, self._suffixes, self._w):
            h = int.from_bytes(blake2b(kb + suffix, digest_size=8).digest(), "big") >> 12
            # 52 bits so that (h + 0.5) is exact and u stays strictly inside (0, 1);
            # minimizing -ln(u) / w is maximizing -w / ln(u) without a division by ~0
            cost = -math.log((h + 0.5) / _TWO_52) / w
            if cost < best_cost:
                best, best_cost = name, cost
        return best


def weighted_choice(weights: Mapping[str, float], key: str | None, rng: Any) -> str:
    """One pick of :class:`WeightedPicker` (build the picker once on hot paths)."""
    return WeightedPicker(weights).pick(key, rng)


class Policy:
    """A runtime routing policy over a fixed list of variants (see module doc).

    Per-arm stats are count, sum and sum of squares of the rewards recorded.
    Bandits ignore ``choose``'s key: stickiness would fight exploration.
    Requests whose reward never arrives are not counted anywhere (there is no
    ``record_pull``): UCB1's N is the total number of rewards.
    """

    kind: ClassVar[str] = ""
    _reward_range: tuple[float, float] | None = None  # None: any finite reward
    _what = "this policy"  # as error messages name it

    def __init__(self, config: PolicyConfig, variants: tuple[str, ...], seed: int | None) -> None:
        self.config = config
        self._variants = variants
        self._index = {v: i for i, v in enumerate(variants)}
        self._count = [0] * len(variants)
        self._sum = [0.0] * len(variants)
        self._sumsq = [0.0] * len(variants)
        self._rng = random.Random(seed)
        # a generator of its own, so that weights() never shifts choose()'s draws
        self._mc = np.random.default_rng(seed)
        self._changed()

    @property
    def variants(self) -> tuple[str, ...]:
        return self._variants

    def choose(self, key: str | None = None) -> str:
        """The variant for one request (key: a sticky id, used by ``fixed`` only)."""
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Each variant's expected share of traffic now (for status and metrics)."""
        raise NotImplementedError

    def record(self, variant: str, reward: float) -> None:
        """Add one reward. InvalidInputError for an unknown variant, a
        non-finite reward or one outside this policy's range."""
        self.add_stats(variant, 1, reward, reward * reward if _finite(reward) else reward)

    def add_stats(self, variant: str, count: int, total: float, total_sq: float) -> None:
        """Fold in a batch of ``count`` rewards summing to ``total`` (squares:
        ``total_sq``), e.g. a replica's since its last report. Same errors as
        :meth:`record`; the range check applies to the batch's mean."""
        i = self._arm(variant)
        self._check_stats(variant, count, total, total_sq)
        self._count[i] += count
        self._sum[i] += float(total)
        self._sumsq[i] += float(total_sq)
        self._changed()

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot: ``{"kind", "arms": {variant: {count, sum,
        sumsq, mean, ...}}}`` (plus posterior parameters or weights by kind)."""
        arms = {}
        for i, v in enumerate(self._variants):
            c = self._count[i]
            arm = {"count": c, "sum": self._sum[i], "sumsq": self._sumsq[i],
                   "mean": self._sum[i] / c if c else None}
            arm.update(self._arm_extras(i))
            arms[v] = arm
        return {"kind": self.kind, "arms": arms}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace all arm stats with those of a :meth:`state` snapshot (of any
        kind: the stats mean the same). Arms of variants not in this policy are
        dropped; variants missing from the snapshot start from zero. All or
        nothing: InvalidInputError on a malformed snapshot changes nothing."""
        arms = state.get("arms") if isinstance(state, Mapping) else None
        if not isinstance(arms, Mapping):
            raise InvalidInputError("policy state needs 'arms': a mapping of variant -> {count, sum, sumsq}")
        k = len(self._variants)
        count, total, sq = [0] * k, [0.0] * k, [0.0] * k
        for v, arm in arms.items():
            i = self._index.get(v)
            if i is None:
                continue
            if not isinstance(arm, Mapping):
                raise InvalidInputError(f"policy state arms[{v!r}] must be a mapping with count, sum, sumsq")
            c, s, q = arm.get("count"), arm.get("sum"), arm.get("sumsq")
            self._check_stats(v, c, s, q)
            count[i], total[i], sq[i] = c, float(s), float(q)
        self._count, self._sum, self._sumsq = count, total, sq
        self._changed()

    # -- for subclasses -------------------------------------------------------

    def _changed(self) -> None:
        """Stats changed: refresh what choose() caches."""

    def _arm_extras(self, i: int) -> dict[str, Any]:
        return {}

    def _arm(self, variant: str) -> int:
        try:
            return self._index[variant]
        except (KeyError, TypeError):
            raise InvalidInputError(
                f"unknown variant {variant!r}: this endpoint has {list(self._variants)}"
            ) from None

    def _check_stats(self, variant: str, count: Any, total: Any, total_sq: Any) -> None:
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise InvalidInputError(f"count {count!r} for variant {variant!r} must be an integer >= 0")
        what = "reward" if count == 1 else f"sum of {count} rewards"
        if not (_finite(total) and _finite(total_sq) and total_sq >= 0):
            raise InvalidInputError(f"{what} {total!r} for variant {variant!r} must be a finite number")
        if count == 0 or self._reward_range is None:  # nothing to bound (and -inf * 0 is NaN)
            return
        lo, hi = self._reward_range
        tol = 1e-9 * count  # float sums of in-range rewards may overshoot by rounding
        if not lo * count - tol <= total <= hi * count + tol:
            raise InvalidInputError(
                f"{what} {total!r} for variant {variant!r}: {self._what} expects rewards in [{lo:g}, {hi:g}]"
            )

    def _pick(self, arms: Sequence[int]) -> str:
        return self._variants[arms[0] if len(arms) == 1 else self._rng.choice(arms)]

    def _unplayed(self) -> list[int]:
        return [i for i, c in enumerate(self._count) if c == 0]


class _Fixed(Policy):
    kind = "fixed"

    def __init__(self, config: FixedPolicy, variants: tuple[str, ...], seed: int | None) -> None:
        unknown = sorted(set(config.weights) - set(variants))
        if unknown:
            raise ConfigError(f"policy.weights names unknown variant(s) {unknown}; the endpoint has {list(variants)}")
        super().__init__(config, variants, seed)
        self._picker = WeightedPicker({v: config.weights.get(v, 0.0) for v in variants})

    def choose(self, key: str | None = None) -> str:
        return self._picker.pick(key, self._rng)

    def weights(self) -> dict[str, float]:
        return dict(self._picker.weights)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "weights": self.weights()}


class _EpsilonGreedy(Policy):
    kind = "epsilon_greedy"

    def _changed(self) -> None:
        # unplayed arms are optimistic: each gets traffic before any is ruled out
        best = self._unplayed()
        if not best:
            means = [s / c for s, c in zip(self._sum, self._count)]
            top = max(means)
            best = [i for i, m in enumerate(means) if m == top]
        self._best = best

    def choose(self, key: str | None = None) -> str:
        if self._rng.random() < self.config.epsilon:
            return self._variants[self._rng.randrange(len(self._variants))]
        return self._pick(self._best)

    def weights(self) -> dict[str, float]:
        eps, k = self.config.epsilon, len(self._variants)
        w = {v: eps / k for v in self._variants}
        for i in self._best:
            w[self._variants[i]] += (1 - eps) / len(self._best)
        return w


class _UCB1(Policy):
    kind = _what = "ucb1"
    _reward_range = (0.0, 1.0)

    def _changed(self) -> None:
        # Arms without rewards go first, at random among them: with delayed
        # feedback, a fixed order would send every replica's traffic to one arm.
        best = self._unplayed()
        if not best:
            log_n, scale = math.log(sum(self._count)), self.config.scale
            scores = [s / c + scale * math.sqrt(2 * log_n / c) for s, c in zip(self._sum, self._count)]
            top = max(scores)
            best = [i for i, x in enumerate(scores) if x == top]
        self._best = best

    def choose(self, key: str | None = None) -> str:
        return self._pick(self._best)

    def weights(self) -> dict[str, float]:
        w = {v: 0.0 for v in self._variants}
        for i in self._best:
            w[self._variants[i]] = 1 / len(self._best)
        return w


class _Thompson(Policy):
    """Bernoulli: Beta(1 + sum, 1 + count - sum) per arm.

    Gaussian: an arm's mean is drawn from N(m, s^2 / n), where m is its sample
    mean and s^2 = (SS + v) / n shrinks its sum of squared deviations SS by one
    pseudo-observation of v, the variance pooled over all arms (a weak prior
    that needs no units). An arm with fewer than 2 rewards has no variance yet
    and is chosen first (at random among such arms).
    """

    kind = "thompson"

    def __init__(self, config: ThompsonPolicy, variants: tuple[str, ...], seed: int | None) -> None:
        self._bernoulli = config.reward == "bernoulli"
        self._reward_range = (0.0, 1.0) if self._bernoulli else None
        self._what = f"thompson ({config.reward})"
        super().__init__(config, variants, seed)

    def _changed(self) -> None:
        if self._bernoulli:
            self._a = [1.0 + max(s, 0.0) for s in self._sum]
            self._b = [1.0 + max(c - s, 0.0) for s, c in zip(self._sum, self._count)]
            return
        ss = [max(q - s * s / c, 0.0) if c >= 2 else 0.0 for s, q, c in zip(self._sum, self._sumsq, self._count)]
        dof = sum(c - 1 for c in self._count if c >= 2)
        pooled = sum(ss) / dof if dof else 0.0
        self._cold = [i for i, c in enumerate(self._count) if c < 2]
        self._mu = [s / c if c else 0.0 for s, c in zip(self._sum, self._count)]
        self._sd = [math.sqrt(x + pooled) / c if c >= 2 else math.inf for x, c in zip(ss, self._count)]

    def choose(self, key: str | None = None) -> str:
        rng = self._rng
        if self._bernoulli:
            draws = [rng.betavariate(a, b) for a, b in zip(self._a, self._b)]
        elif self._cold:
            return self._pick(self._cold)
        else:
            draws = [rng.gauss(m, s) for m, s in zip(self._mu, self._sd)]
        return self._variants[draws.index(max(draws))]

    def weights(self) -> dict[str, float]:
        k = len(self._variants)
        if self._bernoulli:
            draws = self._mc.beta(self._a, self._b, size=(_MC_DRAWS, k))
        elif self._cold:
            return {v: (1 / len(self._cold) if i in self._cold else 0.0) for i, v in enumerate(self._variants)}
        else:
            draws = self._mc.normal(self._mu, self._sd, size=(_MC_DRAWS, k))
        wins = np.bincount(draws.argmax(axis=1), minlength=k) / _MC_DRAWS
        return {v: float(wins[i]) for i, v in enumerate(self._variants)}

    def _arm_extras(self, i: int) -> dict[str, Any]:
        if self._bernoulli:
            return {"alpha": self._a[i], "beta": self._b[i]}
        cold = self._count[i] < 2
        return {"post_mean": None if cold else self._mu[i], "post_std": None if cold else self._sd[i]}


_RUNTIME: dict[type, type[Policy]] = {
    FixedPolicy: _Fixed, EpsilonGreedyPolicy: _EpsilonGreedy, ThompsonPolicy: _Thompson, UCB1Policy: _UCB1,
}


def make_policy(
    config: PolicyConfig, variants: Sequence[str], state: Mapping[str, Any] | None = None, seed: int | None = None
) -> Policy:
    """A runtime Policy over ``variants`` (distinct, non-empty strings; a
    bandit with ``arms`` over those of them that are arms).

    state: a :meth:`Policy.state` snapshot to start from; after variants were
    added or removed, pass the old policy's state: variants still present keep
    their stats, new ones start from zero. seed: for reproducible choices.
    Raises ConfigError for bad variants (or fixed weights naming unknown ones),
    InvalidInputError for a malformed state.
    """
    vs = tuple(variants)
    arms = getattr(config, "arms", ())
    if arms:
        vs = tuple(v for v in vs if v in arms)
        if not vs:
            raise ConfigError(f"policy.arms {list(arms)} names none of the variants {list(variants)}")
    if not vs or not all(isinstance(v, str) and v for v in vs) or len(set(vs)) != len(vs):
        raise ConfigError(f"variants {list(vs)} must be one or more distinct, non-empty strings")
    cls = _RUNTIME.get(type(config))
    if cls is None:
        raise ConfigError(f"policy config {config!r} is not one of {', '.join(KINDS)}")
    policy = cls(config, vs, seed)
    if state is not None:
        policy.load_state(state)
    return policy
