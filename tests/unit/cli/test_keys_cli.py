"""``flywheel keys create`` flags (--models, --expires, --rate, --burst) and
``keys list`` showing them, through the real CLI on a SQLite registry."""

import datetime as dt
import json

import pytest

from flywheel.cli.keys import parse_expiry
from flywheel.cli.main import main
from flywheel.protocol.errors import InvalidInputError

NOW = 1_800_000_000.0


@pytest.mark.parametrize("text, seconds", [("45s", 45), ("90m", 5400), ("12h", 43200), ("30d", 30 * 86400),
                                           ("2w", 14 * 86400), ("1.5h", 5400)])
def test_durations_count_from_now(text, seconds):
    assert parse_expiry(text, NOW) == NOW + seconds


def test_iso_dates_are_utc_unless_they_name_a_zone():
    assert parse_expiry("2027-01-31", NOW) == dt.datetime(2027, 1, 31, tzinfo=dt.timezone.utc).timestamp()
    assert parse_expiry("2027-01-31T12:00:00+02:00", NOW) == \
        dt.datetime(2027, 1, 31, 10, tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize("text, message", [
    ("3x", "--expires '3x': expected a number followed by s, m, h, d or w"),
    ("d", "--expires 'd': expected"),
    ("-5d", "--expires '-5d': expected"),
    ("0s", "--expires '0s': that is not in the future"),
    ("2020-01-01", "--expires '2020-01-01': that is not in the future"),
])
def test_bad_expiries_are_refused_naming_the_flag(text, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_expiry(text, NOW)


def _keys(tmp_path, *argv):
    return main(["keys", "--registry", f"sqlite:///{tmp_path}/registry.db", *argv])


def test_create_stores_the_flags_and_list_shows_them(tmp_path, capsys):
    assert _keys(tmp_path, "create", "app", "--models", "fraud,digits", "--models", "mnist-*", "--expires", "30d",
                 "--rate", "50", "--burst", "100", "--json") == 0
    created = json.loads(capsys.readouterr().out)["key"]
    assert created["models"] == ["fraud", "digits", "mnist-*"]
    assert (created["rate"], created["burst"]) == (50.0, 100)
    assert _keys(tmp_path, "create", "plain") == 0
    capsys.readouterr()
    assert _keys(tmp_path, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "name", "roles", "models", "expires", "rate", "created", "by", "revoked"]
    app = next(line for line in lines if " app " in line)
    assert "fraud,digits,mnist-*" in app
    assert "50/s burst 100" in app
    assert dt.datetime.fromtimestamp(created["expires_at"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") in app
    plain = next(line for line in lines if " plain " in line)
    assert " all " in plain
    assert " never " in plain
    assert "server default" in plain


@pytest.mark.parametrize("argv, message", [
    (["--expires", "3x"], "error: --expires '3x': expected a number followed by s, m, h, d or w"),
    (["--rate", "fast"], "error: --rate 'fast': expected a number of requests per second >= 0"),
    (["--rate", "5", "--burst", "1.5"], "error: --burst '1.5': expected a whole number of requests >= 1"),
    (["--burst", "10"], "error: burst needs a rate above 0"),
    (["--models", "fraud,,digits"], "error: --models 'fraud,,digits': give comma-separated model names or globs"),
    (["--models", "a b"], "error: model scope 'a b'"),
])
def test_bad_flags_fail_with_a_clear_error_and_create_nothing(tmp_path, capsys, argv, message):
    assert _keys(tmp_path, "create", "x", *argv) == 2
    assert message in capsys.readouterr().err
    assert _keys(tmp_path, "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
