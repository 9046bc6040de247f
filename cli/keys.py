"""``flywheel keys ...``: API keys for the serving endpoints.

The CLI talks to the registry database directly, so it is guarded by
whatever guards that database (file permissions, PostgreSQL credentials);
the keys it makes guard the network endpoints.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import time

import msgspec

from flywheel.cli._shared import add_json_flag, add_registry_arguments, table, when
from flywheel.protocol.errors import InvalidInputError
from flywheel.registry.keys import ROLES, ApiKey, KeyStore

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str, now: float) -> float:
    """``--expires``: a duration from ``now`` (``30d``, ``12h``, ``90m``,
    ``45s``, ``2w``) or an ISO date or time (UTC unless it names a zone;
    a date alone means its midnight); epoch seconds, in the future."""
    m = _DURATION.match(text.strip())
    if m:
        at = now + float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        try:
            when_ = dt.datetime.fromisoformat(text.strip())
        except ValueError:
            raise InvalidInputError(
                f"--expires {text!r}: expected a number followed by s, m, h, d or w (e.g. 30d), "
                "or an ISO date (e.g. 2027-01-31 or 2027-01-31T12:00:00+00:00)"
            ) from None
        if when_.tzinfo is None:
            when_ = when_.replace(tzinfo=dt.timezone.utc)
        at = when_.timestamp()
    if at <= now:
        raise InvalidInputError(f"--expires {text!r}: that is not in the future")
    return at


def _models(values: list[str] | None) -> list[str]:
    """``--models a,b`` (repeatable) as one list; an empty name is an error."""
    out = []
    for value in values or ():
        names = [n.strip() for n in value.split(",")]
        if not all(names):
            raise InvalidInputError(f"--models {value!r}: give comma-separated model names or globs, none empty")
        out += names
    return out


def _number(flag: str, text: str | None, whole: bool):
    if text is None:
        return None
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < (1 if whole else 0):
        what = "a whole number of requests >= 1" if whole else "a number of requests per second >= 0 (0 = no limit)"
        raise InvalidInputError(f"{flag} {text!r}: expected {what}")
    return value


def cmd_create(store: KeyStore, args) -> None:
    models = _models(args.models)
    expires_at = parse_expiry(args.expires, time.time()) if args.expires is not None else None
    rate = _number("--rate", args.rate, whole=False)
    burst = _number("--burst", args.burst, whole=True)
    key, token = store.create(args.name, args.role or ["predict"], actor=args.actor, models=models,
                              expires_at=expires_at, rate=rate, burst=burst)
    if args.json:
        print(msgspec.json.encode({"key": key, "token": token}).decode())
        return
    print(f"created API key {key.id} ({key.name}, roles {','.join(key.roles)}; models {_scope_text(key)}; "
          f"expires {_expiry_text(key, time.time())}; rate {_rate_text(key)}).")
    print("Its token is shown this once; store it now (only a salted hash is kept):\n")
    print(token)


def cmd_list(store: KeyStore, args) -> None:
    keys = store.list(include_revoked=args.all)
    if args.json:
        print(msgspec.json.encode(keys).decode())
        return
    now = time.time()
    print(table(
        ["id", "name", "roles", "models", "expires", "rate", "created", "by", "revoked"],
        [(k.id, k.name, ",".join(k.roles), _scope_text(k), _expiry_text(k, now), _rate_text(k),
          when(k.created_at), k.created_by, when(k.revoked_at) if k.revoked_at else "-") for k in keys],
    ))


def _scope_text(key: ApiKey) -> str:
    return ",".join(key.models) if key.models else "all"


def _expiry_text(key: ApiKey, now: float) -> str:
    if key.expires_at is None:
        return "never"
    return when(key.expires_at) + (" (expired)" if key.expires_at <= now else "")


def _rate_text(key: ApiKey) -> str:
    if key.rate is None:
        return "server default"
    if key.rate == 0:
        return "no limit"
    return f"{key.rate:g}/s burst {key.burst or max(1, key.rate):g}"


def cmd_revoke(store: KeyStore, args) -> None:
    store.revoke(args.id, actor=args.actor)
    print(f"revoked {args.id}; servers stop accepting it within server.auth.reload_interval_s")


HELP = "API keys for the HTTP/gRPC endpoints: create, list, revoke"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help=HELP, description=__doc__)
    add_registry_arguments(p, artifacts=False)
    cmds = p.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    create = cmds.add_parser("create", help="a new key; prints its token once")
    create.add_argument("name", help="a name that says who or what uses the key")
    create.add_argument("--role", action="append", choices=ROLES,
                        help="predict (default), operate (includes predict) or admin (everything); repeatable")
    create.add_argument("--models", action="append", metavar="NAMES",
                        help="the only models (endpoints) the key may call: comma-separated names or globs "
                             "(e.g. fraud,digits or 'fraud-*'); repeatable; default: every model")
    create.add_argument("--expires", metavar="WHEN",
                        help="when the key stops working: a duration (30d, 12h, 90m, 45s, 2w) or an ISO date "
                             "or time (UTC unless it names a zone); default: never")
    create.add_argument("--rate", metavar="PER_S",
                        help="requests per second the key may make on each ingress replica (0 = no limit); "
                             "default: server.auth.rate_per_key")
    create.add_argument("--burst", metavar="N",
                        help="requests the key may make at once above --rate (its token bucket's size); "
                             "default: one second's worth of --rate")
    create.set_defaults(keys_func=cmd_create)
    listing = cmds.add_parser("list", help="keys (ids, names, roles, models, expiry, rate; never secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.set_defaults(keys_func=cmd_list)
    revoke = cmds.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", help="the key's id (flywheel keys list)")
    revoke.set_defaults(keys_func=cmd_revoke)
    add_json_flag(p, [create, listing, revoke], help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    store = KeyStore.open(args.registry)
    try:
        args.keys_func(store, args)
    finally:
        store.close()
