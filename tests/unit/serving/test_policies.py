"""Runtime routing policies (serving/policies.py): the fixed split's weighted
rendezvous hashing, the bandits, rewards, state snapshots and make_policy."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from scipy.stats import chisquare

from flywheel.protocol.errors import ConfigError, InvalidInputError
from flywheel.serving.policies import WeightedPicker, make_policy, weighted_choice
from flywheel.serving.policy_config import (
    EpsilonGreedyPolicy,
    FixedPolicy,
    ThompsonPolicy,
    UCB1Policy,
    decode_policy,
)

SPLIT = {"1": 0.7, "2": 0.2, "3": 0.1}


def _chi2_p(picks: list[str], weights: dict[str, float]) -> float:
    counts = Counter(picks)
    n = len(picks)
    return chisquare([counts[v] for v in weights], [w * n for w in weights.values()]).pvalue


# -- fixed split and weighted rendezvous hashing ------------------------------------------------


def test_fixed_split_matches_weights_without_key():
    p = make_policy(FixedPolicy(SPLIT), ["1", "2", "3"], seed=1)
    assert _chi2_p([p.choose() for _ in range(10_000)], SPLIT) > 0.001
    assert p.weights() == pytest.approx(SPLIT)


def test_fixed_split_matches_weights_over_distinct_keys():
    p = make_policy(FixedPolicy({"1": 7, "2": 2, "3": 1}), ["1", "2", "3"])  # normalized internally
    assert _chi2_p([p.choose(f"user-{i}") for i in range(10_000)], SPLIT) > 0.001


def test_same_key_sticks_across_calls_and_policy_objects():
    a = make_policy(FixedPolicy(SPLIT), ["1", "2", "3"], seed=1)
    b = make_policy(FixedPolicy(SPLIT), ["1", "2", "3"], seed=99)
    for key in ("alice", "bob", "carol", "ünïcode-ключ"):
        first = a.choose(key)
        assert {a.choose(key) for _ in range(1000)} == {first}
        assert b.choose(key) == first


def test_key_mapping_is_stable_across_processes_and_hash_seeds():
    keys = [f"k{i}" for i in range(200)]
    here = [weighted_choice(SPLIT, k, None) for k in keys]
    code = (
        "from flywheel.serving.policies import weighted_choice;"
        f"print(','.join(weighted_choice({SPLIT!r}, f'k{{i}}', None) for i in range(200)))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "12345"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(",") == here
    # pinned: a change of the hash would move every sticky user on upgrade
    assert here[:12] == ["1", "1", "1", "1", "1", "2", "1", "1", "1", "1", "1", "1"]
    assert here == [_reference_rendezvous(SPLIT, k) for k in keys]


def _reference_rendezvous(weights: dict[str, float], key: str) -> str:
    """The documented scheme, written out: score -w / ln(u), u from blake2b(key NUL variant)."""
    def score(v: str) -> float:
        h = int.from_bytes(hashlib.blake2b(f"{key}\0{v}".encode(), digest_size=8).digest(), "big") >> 12
        return -weights[v] / math.log((h + 0.5) / 2**52)
    return max(weights, key=score)


def test_raising_the_canary_weight_only_moves_keys_to_the_canary():
    before = WeightedPicker({"stable": 95, "canary": 5})
    after = WeightedPicker({"stable": 75, "canary": 25})
    keys = [f"session-{i}" for i in range(10_000)]
    b = [before.pick(k, None) for k in keys]
    a = [after.pick(k, None) for k in keys]
    assert all(y == "canary" for x, y in zip(b, a) if x == "canary")
    moved = sum(x != y for x, y in zip(b, a)) / len(keys)
    assert moved == pytest.approx(0.20, abs=0.02)  # just the 20 points of traffic that changed hands


def test_zero_weight_variants_are_never_chosen():
    pick = WeightedPicker({"1": 1.0, "2": 0.0, "3": 1.0})
    rng = random.Random(0)
    assert "2" not in {pick.pick(k, rng) for k in [None] * 2000 + [f"k{i}" for i in range(2000)]}
    assert pick.weights == {"1": 0.5, "2": 0.0, "3": 0.5}
    with pytest.raises(InvalidInputError, match="> 0"):
        WeightedPicker({"1": 0.0})
    with pytest.raises(InvalidInputError, match=">= 0"):
        WeightedPicker({"1": 1.0, "2": -1.0})


# -- bandits --------------------------------------------------------------------------------------


def _simulate(policy, reward, seed: int, learn: int = 2000, batch: int = 500) -> float:
    """Learn for `learn` rounds, then the best arm's share of `batch` more (still learning)."""
    rng = random.Random(seed)
    best = 0
    for t in range(learn + batch):
        v = policy.choose()
        policy.record(v, reward(v, rng))
        best += t >= learn and v == "c"
    return best / batch


def _bernoulli(v: str, rng: random.Random) -> float:
    return float(rng.random() < {"a": 0.2, "b": 0.5, "c": 0.7}[v])


@pytest.mark.parametrize("config", [ThompsonPolicy(), UCB1Policy()], ids=["thompson", "ucb1"])
@pytest.mark.parametrize("seed", range(5))
def test_bandits_find_the_best_of_three_bernoulli_arms(config, seed):
    # best-arm shares achieved in rounds 2001-2500, seeds 0-4: Thompson 0.998-1.0, UCB1 0.922-0.986
    policy = make_policy(config, ["a", "b", "c"], seed=seed)
    assert _simulate(policy, _bernoulli, seed) >= 0.90
    w = policy.weights()
    assert max(w, key=w.get) == "c"
    assert sum(w.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_gaussian_thompson_finds_the_best_arm(seed):
    # normal rewards, sd 1, means 0 / 0.5 / 1: best-arm shares achieved 0.992-1.0
    policy = make_policy(ThompsonPolicy(reward="gaussian"), ["a", "b", "c"], seed=seed)
    means = {"a": 0.0, "b": 0.5, "c": 1.0}
    assert _simulate(policy, lambda v, rng: rng.gauss(means[v], 1.0), seed) >= 0.90
    arm = policy.state()["arms"]["c"]
    assert arm["post_mean"] == pytest.approx(1.0, abs=0.2)
    assert 0 < arm["post_std"] < 0.1


@pytest.mark.parametrize("seed", range(5))
def test_epsilon_greedy_converges_to_the_best_mean(seed):
    policy = make_policy(EpsilonGreedyPolicy(epsilon=0.1), ["a", "b", "c"], seed=seed)
    share = _simulate(policy, _bernoulli, seed)
    assert share >= 0.85  # expected 0.9 + 0.1 / 3; achieved 0.918-0.946
    assert policy.weights() == pytest.approx({"a": 0.1 / 3, "b": 0.1 / 3, "c": 0.9 + 0.1 / 3})


def test_unplayed_arms_go_first():
    ucb = make_policy(UCB1Policy(), ["a", "b", "c"], seed=0)
    seen = set()
    for _ in range(3):
        v = ucb.choose()
        seen.add(v)
        ucb.record(v, 0.0)
    assert seen == {"a", "b", "c"}
    eg = make_policy(EpsilonGreedyPolicy(epsilon=0.0), ["a", "b"], seed=0)
    eg.record("a", 1.0)
    assert {eg.choose() for _ in range(20)} == {"b"}  # unplayed counts as best


def test_bandits_ignore_the_key():
    p = make_policy(ThompsonPolicy(), ["a", "b"], seed=3)
    assert {p.choose("same-key") for _ in range(200)} == {"a", "b"}


# -- rewards and stats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, variant, reward, fragment",
    [
        (ThompsonPolicy(), "a", 1.5, r"thompson \(bernoulli\) expects rewards in \[0, 1\]"),
        (ThompsonPolicy(), "a", -0.1, r"\[0, 1\]"),
        (UCB1Policy(), "a", 2.0, r"ucb1 expects rewards in \[0, 1\]"),
        (ThompsonPolicy(reward="gaussian"), "a", math.nan, "finite"),
        (EpsilonGreedyPolicy(), "a", math.inf, "finite"),
        (EpsilonGreedyPolicy(), "a", "1", "finite"),
        (EpsilonGreedyPolicy(), "zz", 1.0, r"unknown variant 'zz'.*\['a', 'b'\]"),
    ],
)
def test_bad_rewards_are_rejected_with_clear_errors(config, variant, reward, fragment):
    p = make_policy(config, ["a", "b"])
    with pytest.raises(InvalidInputError, match=fragment):
        p.record(variant, reward)
    assert all(arm["count"] == 0 for arm in p.state()["arms"].values())


def test_fractional_and_gaussian_rewards_are_accepted():
    p = make_policy(ThompsonPolicy(), ["a"])
    p.record("a", 0.25)
    assert p.state()["arms"]["a"] | {} == {"count": 1, "sum": 0.25, "sumsq": 0.0625, "mean": 0.25,
                                           "alpha": 1.25, "beta": 1.75}
    g = make_policy(ThompsonPolicy(reward="gaussian"), ["a"])
    g.record("a", -42.0)
    assert g.state()["arms"]["a"]["post_std"] is None  # one reward: no variance yet


def test_add_stats_equals_recording_each_reward():
    rewards = [0.0, 1.0, 1.0, 0.5]
    one = make_policy(ThompsonPolicy(), ["a", "b"])
    for r in rewards:
        one.record("a", r)
    batch = make_policy(ThompsonPolicy(), ["a", "b"])
    batch.add_stats("a", len(rewards), sum(rewards), sum(r * r for r in rewards))
    assert batch.state() == one.state()
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        batch.add_stats("a", 2, 3.0, 5.0)  # a mean of 1.5
    with pytest.raises(InvalidInputError, match="integer >= 0"):
        batch.add_stats("a", -1, 0.0, 0.0)


@pytest.mark.parametrize(
    "config", [ThompsonPolicy(), ThompsonPolicy(reward="gaussian"), UCB1Policy(), EpsilonGreedyPolicy()],
    ids=["bernoulli", "gaussian", "ucb1", "epsilon"],
)
def test_state_round_trip_reproduces_choices(config):
    src = make_policy(config, ["a", "b", "c"], seed=7)
    rng = random.Random(0)
    for _ in range(300):
        src.record(rng.choice("abc"), rng.random())
    state = json.loads(json.dumps(src.state()))
    copy = make_policy(config, ["a", "b", "c"], state=state, seed=7)
    assert copy.state() == src.state()
    assert [copy.choose() for _ in range(300)] == [src.choose() for _ in range(300)]


def test_new_variants_keep_the_old_stats():
    old = make_policy(UCB1Policy(), ["1", "2"], seed=0)
    for v, r in [("1", 1.0), ("1", 0.0), ("2", 1.0)]:
        old.record(v, r)
    new = make_policy(UCB1Policy(), ["1", "2", "3"], state=old.state(), seed=0)
    arms = new.state()["arms"]
    assert (arms["1"]["count"], arms["1"]["sum"], arms["2"]["count"], arms["3"]["count"]) == (2, 1.0, 1, 0)
    assert new.choose() == "3"  # the new, unplayed variant goes first
    fewer = make_policy(UCB1Policy(), ["2"], state=old.state())
    assert list(fewer.state()["arms"]) == ["2"]
    assert fewer.state()["arms"]["2"]["count"] == 1


def test_load_state_is_all_or_nothing():
    p = make_policy(ThompsonPolicy(), ["a", "b"])
    p.record("a", 1.0)
    before = p.state()
    bad = {"arms": {"a": {"count": 5, "sum": 2.0, "sumsq": 2.0}, "b": {"count": 1, "sum": 9.0, "sumsq": 81.0}}}
    with pytest.raises(InvalidInputError, match="'b'"):
        p.load_state(bad)
    with pytest.raises(InvalidInputError, match="arms"):
        p.load_state({"kind": "thompson"})
    assert p.state() == before


def test_thompson_weights_estimate_selection_share():
    p = make_policy(ThompsonPolicy(), ["a", "b"], seed=0)
    p.add_stats("a", 100, 80.0, 80.0)
    p.add_stats("b", 100, 20.0, 20.0)
    assert p.weights()["a"] > 0.99
    assert make_policy(ThompsonPolicy(), ["a", "b"], seed=0).weights()["a"] == pytest.approx(0.5, abs=0.05)


# -- make_policy ----------------------------------------------------------------------------------


def test_make_policy_checks_variants():
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['9'\]"):
        make_policy(FixedPolicy({"1": 1, "9": 1}), ["1", "2"])
    with pytest.raises(ConfigError, match="distinct"):
        make_policy(UCB1Policy(), ["1", "1"])
    with pytest.raises(ConfigError, match="variants"):
        make_policy(UCB1Policy(), [])


def test_a_bandit_routes_only_among_its_arms():
    cfg = decode_policy({"kind": "ucb1", "arms": ["1", "3"]})
    policy = make_policy(cfg, ["1", "2", "3"], seed=1)
    assert policy.variants == ("1", "3")
    assert {policy.choose() for _ in range(200)} == {"1", "3"}
    with pytest.raises(ConfigError, match="names none of the variants"):
        make_policy(cfg, ["2"])
    with pytest.raises(ConfigError, match="distinct"):
        decode_policy({"kind": "thompson", "arms": ["1", "1"]})
