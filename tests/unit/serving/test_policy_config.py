"""Policy configs (serving/policy_config.py): decoding from JSON or mappings,
and errors that name the bad field."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving.policy_config import EpsilonGreedyPolicy, FixedPolicy, UCB1Policy, decode_policy


def test_decode_policy_from_bytes_and_mappings():
    assert decode_policy(b'{"kind": "epsilon_greedy", "epsilon": 0.2}') == EpsilonGreedyPolicy(epsilon=0.2)
    assert decode_policy({"kind": "fixed", "weights": {"1": 3, "2": 1}}) == FixedPolicy({"1": 3.0, "2": 1.0})
    assert decode_policy({"kind": "ucb1"}) == UCB1Policy()
    assert decode_policy('{"kind": "thompson", "reward": "gaussian"}').kind == "thompson"


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"kind": "softmax"}, "policy.kind 'softmax': choose from fixed, epsilon_greedy, thompson, ucb1"),
        ({"epsilon": 0.1}, "policy.kind None"),
        ({"kind": "epsilon_greedy", "epsilon": 1.5}, r"policy.epsilon 1.5 must lie in \[0, 1\]"),
        ({"kind": "ucb1", "scale": 0}, "policy.scale"),
        ({"kind": "thompson", "reward": "poisson"}, "policy.reward 'poisson': choose from bernoulli, gaussian"),
        ({"kind": "fixed", "weights": {"1": -1}}, "policy.weights"),
        ({"kind": "fixed", "weights": {"1": 0}}, "policy.weights"),
        ({"kind": "fixed"}, "weights"),
        ({"kind": "ucb1", "exploration": 2}, "exploration"),
        ({"kind": "epsilon_greedy", "epsilon": "lots"}, r"\$.epsilon"),
        (b"{not json", "not valid JSON"),
        ([1, 2], "mapping"),
    ],
)
def test_decode_policy_errors_name_the_field(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        decode_policy(data)
