"""The ``metrion-cache`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from .core.directives import check_ttl
from .core.options import OPTIONS, URL_ENV, Layer, argument_layer, environment_layer, flag_layer, resolve
from .errors import MetrionCacheError
from .reporting.reports import GROUPINGS, StoredEntry, answer_text, entries, render_entries, render_report, stats
from .runtime.session import CacheSession
from .stores import default_store_url, open_store
from .stores.base import Store

# An import replaces what is stored (refresh), and reads each call's record back, so it keeps its records.
_IMPORT_FIXED: dict[str, object] = {"mode": "refresh"}
_IMPORT_OPTIONS = tuple(option for option in OPTIONS if option.name not in (*_IMPORT_FIXED, "max_records"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metrion-cache", description="An LLM response cache inside your process.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="the FAQ-bot story, offline: a simulated provider, the anthropic SDK, the cache"
    )
    demo.add_argument("--url", help="cache store URL (default: METRION_CACHE_URL, else .metrion_cache/cache.sqlite3)")
    demo.add_argument("--latency", type=float, default=0.8, help="simulated provider delay in seconds (default 0.8)")
    imports = commands.add_parser(
        "import-cassettes",
        help="load vcrpy / pytest-recording cassettes (YAML or JSON) into the cache, keyed like live traffic",
    )
    imports.add_argument(
        "paths", nargs="+", metavar="PATH", help="cassette files, or folders to search for *.yaml, *.yml, *.json"
    )
    for option in _IMPORT_OPTIONS:
        env = option.env if option.env and not option.spec.env_for_pytest_only else None
        imports.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.spec.metavar,
            help=option.spec.help + (f"; env: {env}" if env else ""),
        )
    add_ledger_commands(commands)
    add_serve_command(commands)
    return parser


# -- stats, ls, show, purge -----------------------------------------------------------------------------------


def add_ledger_commands(commands: Any) -> None:
    def common(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--url", help="cache store URL (default: METRION_CACHE_URL, else .metrion_cache/cache.sqlite3)"
        )
        command.add_argument("--namespace", help="only this namespace (default: every namespace in the store)")
        command.add_argument("--json", action="store_true", help="print JSON instead of a table")

    stats = commands.add_parser("stats", help="requests, hit rate, tokens and dollars spent and saved, time saved")
    common(stats)
    stats.add_argument("--since", help="only calls in this last period, e.g. 7d, 12h, 90m (default: the whole ledger)")
    stats.add_argument("--by", choices=GROUPINGS, help="one row per model, provider, day or namespace")
    listing = commands.add_parser("ls", help="the stored answers")
    common(listing)
    listing.add_argument("--model", help="only answers of this model")
    show = commands.add_parser("show", help="one stored answer: its metadata and the answer itself")
    common(show)
    show.add_argument(
        "key", metavar="KEY", help="the cache key (x-metrion-cache-key, or its first 8+ characters) or storage key"
    )
    purge = commands.add_parser("purge", help="delete stored answers (the ledger of calls is kept)")
    common(purge)
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="the answers of this model")
    which.add_argument("--older-than", metavar="AGE", help="answers stored longer ago than AGE, e.g. 3d, 12h")
    which.add_argument("--all", action="store_true", help="every answer (asks first, unless --yes)")
    purge.add_argument("--yes", action="store_true", help="do not ask before --all")


def _store(args: argparse.Namespace) -> Store:
    return open_store(args.url or os.environ.get(URL_ENV) or default_store_url())


def _seconds(value: str, option: str) -> int:
    try:
        return check_ttl(value)
    except MetrionCacheError:
        raise MetrionCacheError(f"invalid {option} {value!r}; use a duration like 7d, 12h, 90m or seconds") from None


def stats_command(args: argparse.Namespace) -> int:
    since = time.time() - _seconds(args.since, "--since") if args.since else None
    report = stats(_store(args), args.namespace, since=since, by=args.by)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    period = f"in the last {args.since}" if args.since else "in the ledger"
    print(f"metrion cache: {report.total.requests} calls {period} ({_store(args).url})")
    print(render_report(report))
    return 0


def _selected(args: argparse.Namespace) -> list[StoredEntry]:
    found = entries(_store(args), args.namespace)
    if getattr(args, "model", None):
        found = [stored for stored in found if stored.entry.model == args.model]
    return found


def ls_command(args: argparse.Namespace) -> int:
    found = _selected(args)
    if args.json:
        print(json.dumps([stored.summary() for stored in found], indent=2))
    elif not found:
        print("metrion cache: no stored answers" + (f" for model {args.model!r}" if args.model else ""))
    else:
        print(render_entries(found))
        print(f"{len(found)} answers, {sum(s.entry.size for s in found):,} bytes")
    return 0


def show_command(args: argparse.Namespace) -> int:
    wanted = args.key.strip()
    found = [
        stored
        for stored in entries(_store(args), args.namespace)
        if stored.storage_key == wanted or (len(wanted) >= 8 and stored.entry.key.startswith(wanted))
    ]
    if not found:
        print(f"metrion-cache: no stored answer with key {wanted!r}", file=sys.stderr)
        return 1
    if args.json:
        shown = [
            {**stored.summary(), "headers": stored.entry.headers, "answer": answer_text(stored.entry)}
            for stored in found
        ]
        print(json.dumps(shown, indent=2, ensure_ascii=False))
        return 0
    for stored in found:
        # Stored entries hold the provider's answer and replayable response headers only:
        # request headers (API keys) and set-cookie never enter the store.
        info = stored.summary()
        for name, value in info.items():
            print(f"{name:>17}: {value}")
        print(f"{'headers':>17}: " + ", ".join(f"{name}: {value}" for name, value in stored.entry.headers))
        print()
        print(answer_text(stored.entry))
        print()
    return 0


def purge_command(args: argparse.Namespace) -> int:
    store = _store(args)
    found = _selected(args) if args.model else entries(store, args.namespace)
    what = f"model {args.model!r}" if args.model else ""
    if args.older_than:
        cutoff = time.time() - _seconds(args.older_than, "--older-than")
        found = [stored for stored in found if stored.entry.stored_at < cutoff]
        what = f"stored more than {args.older_than} ago"
    if args.all:
        where = f"namespace {args.namespace!r}" if args.namespace else "every namespace"
        what = f"all, in {where}"
        if found and not args.yes:
            try:
                reply = input(f"Delete all {len(found)} stored answers in {where} of {store.url}? [y/N] ")
            except EOFError:
                reply = ""
            if reply.strip().lower() not in ("y", "yes"):
                print("metrion-cache: nothing deleted (confirm, or pass --yes)", file=sys.stderr)
                return 1
    # Exact deletes: a shared entry's storage key is a prefix of the same prompt's per-credential keys.
    # Counted by what the store removed: an entry may expire or go elsewhere between listing and delete.
    removed = [stored for stored in found if store.delete(stored.storage_key)]
    size = sum(stored.entry.size for stored in removed)
    print(f"metrion cache: removed {len(removed)} stored answers ({what}), {size:,} bytes, from {store.url}")
    return 0


# -- serve ----------------------------------------------------------------------------------------------------

# A proxy passes requests through unless they opt in with x-metrion-cache, as the proxy this cache mirrors did.
_SERVE_DEFAULTS: dict[str, object] = {"mode": "off"}
_SERVE_OPTIONS = tuple(option for option in OPTIONS if option.name != "max_records")  # no one reads its calls list


def add_serve_command(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="a local caching proxy: point any SDK's base URL at http://HOST:PORT/anthropic (openai, gemini, ...)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token)"
    )
    serve.add_argument("--port", type=int, default=8787, help="port to listen on (default 8787)")
    serve.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="route /NAME/... to URL/... (overrides a provider's URL or adds a route; repeatable)",
    )
    serve.add_argument(
        "--token",
        help="require this value in every request's x-metrion-proxy-token header (env: METRION_PROXY_TOKEN)",
    )
    for option in _SERVE_OPTIONS:
        env = option.env if option.env and not option.spec.env_for_pytest_only else None
        text = option.spec.help
        if option.name == "mode":
            text = (
                "requests without an x-metrion-cache header: off (default: passed through), true (read and "
                "store), refresh (call the provider, replace the entry), replay (read only, never call the provider)"
            )
        serve.add_argument(
            option.flag, dest=option.name, metavar=option.spec.metavar, help=text + (f"; env: {env}" if env else "")
        )


def serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from .integrations.server import TOKEN_ENV, parse_upstreams, serve
    except ImportError:
        print("metrion-cache serve needs uvicorn and httpx2: pip install 'metrion-fixture[proxy]'", file=sys.stderr)
        return 2
    try:
        upstreams = parse_upstreams(args.upstream)
    except ValueError as error:
        raise MetrionCacheError(str(error)) from None
    given = {option.name: getattr(args, option.name) for option in _SERVE_OPTIONS}
    layers = (flag_layer(given), environment_layer(os.environ), Layer("default", _SERVE_DEFAULTS))
    options = resolve(*layers).options
    token = args.token or os.environ.get(TOKEN_ENV) or None
    serve(CacheSession(options=options), host=args.host, port=args.port, upstreams=upstreams, token=token)
    return 0


def import_cassettes_command(args: argparse.Namespace) -> int:
    try:
        import vcr  # noqa: F401

        from .integrations.cassettes import import_cassettes
    except ImportError:
        print("metrion-cache import-cassettes needs vcrpy to read the cassettes: pip install vcrpy", file=sys.stderr)
        return 2
    given = {option.name: getattr(args, option.name) for option in _IMPORT_OPTIONS}
    options = resolve(argument_layer(_IMPORT_FIXED), flag_layer(given), environment_layer(os.environ)).options
    report = import_cassettes(args.paths, session=CacheSession(options=options))
    for skipped in report.skipped:
        print(f"skipped {skipped.method} {skipped.uri} ({skipped.cassette}): {skipped.reason}")
    for cassette, why in report.unreadable:
        print(f"could not read {cassette}: {why}", file=sys.stderr)
    if report.store_failures:
        print(
            f"{report.store_failures} answers could not be written to {report.url}: is the store running?",
            file=sys.stderr,
        )
    print(
        f"imported {report.imported} answers from {len(report.cassettes)} cassettes into {report.url} "
        f"(namespace {report.namespace}); skipped {len(report.skipped)}"
    )
    if not report.cassettes and not report.unreadable:
        print("metrion-cache: no cassette found (*.yaml, *.yml, *.json)", file=sys.stderr)
        return 1
    return 1 if report.unreadable or report.store_failures else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            try:
                import anthropic  # noqa: F401

                from .demo.faq_bot import run_demo
            except ImportError:
                print(
                    "metrion-cache demo needs the anthropic SDK: pip install 'metrion-fixture[demo]'", file=sys.stderr
                )
                return 2
            run_demo(args.url, latency=args.latency)
        elif args.command == "import-cassettes":
            return import_cassettes_command(args)
        elif args.command == "serve":
            return serve_command(args)
        elif args.command in LEDGER_COMMANDS:
            return LEDGER_COMMANDS[args.command](args)
    except MetrionCacheError as error:
        print(f"metrion-cache: {error}", file=sys.stderr)
        return 2
    return 0


LEDGER_COMMANDS = {"stats": stats_command, "ls": ls_command, "show": show_command, "purge": purge_command}


if __name__ == "__main__":
    sys.exit(main())
