"""``flywheel keys ...``: API keys for the serving endpoints.

The CLI talks to the registry database directly, so it is guarded by
whatever guards that database (file permissions, PostgreSQL credentials);
the keys it makes guard the network endpoints.
"""

from __future__ import annotations

import argparse

import msgspec

from flywheel.cli._shared import add_json_flag, add_registry_arguments, table, when
from flywheel.registry.keys import ROLES, KeyStore


def cmd_create(store: KeyStore, args) -> None:
    key, token = store.create(args.name, args.role or ["predict"], actor=args.actor)
    if args.json:
        print(msgspec.json.encode({"key": key, "token": token}).decode())
        return
    print(f"created API key {key.id} ({key.name}, roles {','.join(key.roles)}).")
    print("Its token is shown this once; store it now (only a salted hash is kept):\n")
    print(token)


def cmd_list(store: KeyStore, args) -> None:
    keys = store.list(include_revoked=args.all)
    if args.json:
        print(msgspec.json.encode(keys).decode())
        return
    print(table(
        ["id", "name", "roles", "created", "by", "revoked"],
        [(k.id, k.name, ",".join(k.roles), when(k.created_at), k.created_by,
          when(k.revoked_at) if k.revoked_at else "-") for k in keys],
    ))


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
    create.set_defaults(keys_func=cmd_create)
    listing = cmds.add_parser("list", help="keys (ids, names, roles; never secrets)")
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
