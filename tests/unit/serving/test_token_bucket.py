"""The token bucket behind the per-key request rate, on a clock the test moves."""

import pytest

from flywheel.serving._private.token_bucket import TokenBucket


def test_a_full_bucket_lets_a_burst_through_then_refuses_with_the_wait():
    b = TokenBucket(rate=2.0, capacity=3, now=100.0)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)  # one token at 2/s


def test_tokens_come_back_at_the_rate_and_never_above_the_capacity():
    b = TokenBucket(rate=2.0, capacity=3, now=0.0)
    for _ in range(3):
        b.take(0.0)
    assert b.take(0.25) == pytest.approx(0.25)  # half a token back: another quarter second to go
    assert b.take(0.5) == 0.0
    # a long idle spell refills to the capacity, not beyond
    assert [b.take(1000.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert b.take(1000.0) > 0


def test_a_refused_take_costs_nothing():
    b = TokenBucket(rate=1.0, capacity=1, now=0.0)
    b.take(0.0)
    for t in (0.1, 0.2, 0.3):
        assert b.take(t) > 0
    assert b.take(1.0) == 0.0  # exactly one second after the one token was taken


def test_reshape_keeps_what_is_left_up_to_the_new_capacity():
    b = TokenBucket(rate=10.0, capacity=10, now=0.0)
    b.reshape(rate=1.0, capacity=2, now=0.0)
    assert [b.take(0.0) for _ in range(2)] == [0.0, 0.0]
    assert b.take(0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("rate, capacity", [(0.0, 1), (-1.0, 1), (1.0, 0.5)])
def test_a_bucket_that_could_never_give_a_token_is_refused(rate, capacity):
    with pytest.raises(ValueError, match="rate > 0 and capacity >= 1"):
        TokenBucket(rate, capacity, now=0.0)
