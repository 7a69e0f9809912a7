"""``python -m app.keys``: the admin API's key operations from a shell, for operators without
HTTP access to the proxy. It reads the same settings (config file, DATABASE_URL/DATABASE_PATH,
REDIS_URL) and changes the same database; running proxies see a change within
``database.refresh_interval`` seconds, at once when REDIS_URL is set. Output is JSON; a new or
rotated key's secret is printed once."""

from __future__ import annotations

import argparse
import sys

import orjson

from app.errors import ProxyError
from app.store import Store, actor_of_cli
from app.store.database import head, migrate, revision
from app.store.keys import parse_fields
from app.upstream.secrets import Secrets
from settings import SettingsError, load_settings


def _fields(args) -> dict:
    """The key fields the options set, in the admin API's shape (checked by the same code)."""
    body: dict = {}
    for name in ("owner", "team"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.models is not None:
        body["models"] = [m for m in args.models.split(",") if m.strip()]
    for name in ("requests_per_minute", "tokens_per_minute", "max_in_flight"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    budget = {name: getattr(args, name) for name in
              ("daily_usd", "monthly_usd", "total_usd", "soft_limit_percent")
              if getattr(args, name) is not None}
    if budget:
        body["budget"] = budget
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    if args.metadata is not None:
        try:
            body["metadata"] = orjson.loads(args.metadata)
        except orjson.JSONDecodeError:
            raise SystemExit("--metadata must be a JSON object") from None
    if getattr(args, "enabled", None) is not None:
        body["enabled"] = args.enabled
    return parse_fields(body, creating=False)


def _key_options(parser):
    parser.add_argument("--owner")
    parser.add_argument("--team")
    parser.add_argument("--models", help="comma-separated model names or glob patterns")
    parser.add_argument("--rpm", dest="requests_per_minute", type=int)
    parser.add_argument("--tpm", dest="tokens_per_minute", type=int)
    parser.add_argument("--max-in-flight", type=int)
    parser.add_argument("--daily-usd", type=float)
    parser.add_argument("--monthly-usd", type=float)
    parser.add_argument("--total-usd", type=float)
    parser.add_argument("--soft-limit-percent", type=float)
    parser.add_argument("--expires-at", help="ISO 8601 with its zone, e.g. 2027-01-31T00:00:00Z")
    parser.add_argument("--metadata", help="a JSON object")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__.split("\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a key; prints its secret once")
    create.add_argument("--id", help="default: key-<random>")
    _key_options(create)
    commands.add_parser("list", help="the keys (not revoked)")
    show = commands.add_parser("show", help="one key")
    show.add_argument("id")
    update = commands.add_parser("update", help="change a key's limits, models, budget")
    update.add_argument("id")
    _key_options(update)
    update.add_argument("--enable", dest="enabled", action="store_true", default=None)
    update.add_argument("--disable", dest="enabled", action="store_false")
    rotate = commands.add_parser("rotate", help="a new secret; the old one works --grace more "
                                                "seconds")
    rotate.add_argument("id")
    rotate.add_argument("--grace", type=float, default=None)
    revoke = commands.add_parser("revoke", help="revoke a key for good")
    revoke.add_argument("id")
    spend = commands.add_parser("spend", help="what keys spent, from the database")
    spend.add_argument("--key-id")
    spend.add_argument("--group-by", choices=("day", "model", "key"), default="day")
    migrate_cmd = commands.add_parser("migrate", help="bring the schema to the newest (or "
                                                      "--revision) version")
    migrate_cmd.add_argument("--revision", default="head")
    return main


def run(args, store: Store) -> object:
    actor = actor_of_cli()
    if args.command == "create":
        secret, key = store.keys.create(_fields(args), actor, args.id)
        store.changed()
        return {**key, "key": secret}
    if args.command == "list":
        return store.keys.list()
    if args.command == "show":
        return store.keys.get(args.id)
    if args.command == "update":
        key = store.keys.update(args.id, _fields(args), actor)
        store.changed()
        return key
    if args.command == "rotate":
        grace = store.settings.rotation_grace if args.grace is None else args.grace
        secret, key = store.keys.rotate(args.id, grace, actor)
        store.changed()
        return {**key, "key": secret}
    if args.command == "revoke":
        key = store.keys.revoke(args.id, actor)
        store.changed()
        return key
    if args.command == "spend":
        return store.spend_report(key_id=args.key_id, group_by=args.group_by)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"bad configuration: {e}", file=sys.stderr)
        return 2
    if not settings.database.enabled:
        print("the database is off (DATABASE_ENABLED=false)", file=sys.stderr)
        return 2
    if args.command == "migrate":
        settings.database.migrate = False
    store = Store(settings, secrets=Secrets(), start=False)
    try:
        with store.guarded():
            if args.command == "migrate":
                before = revision(store.engine)
                after = migrate(store.engine, args.revision)
                result = {"from": before, "to": after, "head": head()}
            else:
                result = run(args, store)
    except ProxyError as e:
        print(f"{e.code}: {e.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
