"""The ``metrion-cache`` command."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

from .core.directives import check_ttl
from .core.options import (
    OPTIONS,
    URL_ENV,
    Layer,
    argument_layer,
    environment_layer,
    flag_layer,
    mask_password,
    resolve,
)
from .errors import MetrionCacheError
from .integrations.cassettes import CASSETTE_SUFFIXES
from .reporting.reports import (
    GROUPINGS,
    KeyUse,
    StoredEntry,
    ago,
    answer_body,
    answer_json,
    answer_text,
    duration,
    entries,
    key_uses,
    plural,
    render_entries,
    render_report,
    stats,
    use_of,
    utc,
)
from .runtime.ledger import read_records
from .runtime.session import CacheSession
from .stores import default_store_url, open_store
from .stores.base import Store
from .stores.sqlite import SQLiteStore

# An import replaces what is stored (refresh), and reads each call's record back, so it keeps its records.
_IMPORT_FIXED: dict[str, object] = {"mode": "refresh"}
CASSETTE_PATTERNS = ", ".join(f"*{suffix}" for suffix in CASSETTE_SUFFIXES)
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
        help="load vcrpy, pytest-recording, pydantic-ai or langchain cassettes into the cache, keyed like live traffic",
    )
    imports.add_argument(
        "paths", nargs="+", metavar="PATH", help=f"cassette files, or folders to search for {CASSETTE_PATTERNS}"
    )
    for option in _IMPORT_OPTIONS:
        env = option.env if option.env and not option.spec.env_for_pytest_only else None
        imports.add_argument(
            option.flag,
            dest=option.name,
            **option.flag_arguments,
            help=option.spec.help + (f"; env: {env}" if env else ""),
        )
    add_ledger_commands(commands)
    add_serve_command(commands)
    add_dashboard_commands(commands)
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
    stats.add_argument(
        "--by", choices=GROUPINGS, help="one row per model, provider, day, namespace or source (test, cell, script)"
    )
    listing = commands.add_parser("ls", help="the stored answers")
    common(listing)
    listing.add_argument("--model", help="only answers of this model")
    show = commands.add_parser("show", help="one stored answer: its metadata and the answer itself")
    common(show)
    show.add_argument(
        "key", metavar="KEY", help="the cache key (x-metrion-cache-key, or its first 8+ characters) or storage key"
    )
    shown = show.add_mutually_exclusive_group()
    shown.add_argument("--text", action="store_true", help="print only the answer's text (a stream assembled)")
    shown.add_argument("--raw", action="store_true", help="print the stored body as sent (JSON, or the events)")
    purge = commands.add_parser("purge", help="delete stored answers (the ledger of calls is kept)")
    common(purge)
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="the answers of this model")
    which.add_argument("--key", metavar="PREFIX", help="the answers whose cache key starts with PREFIX (8+ characters)")
    which.add_argument("--older-than", metavar="AGE", help="answers stored longer ago than AGE, e.g. 3d, 12h")
    which.add_argument("--all", action="store_true", help="every answer (asks first, unless --yes)")
    purge.add_argument("--yes", action="store_true", help="do not ask before --all")


class NoStore(Exception):
    """A read-only command named a store that does not exist: it says so rather than create an empty one."""


def _store(args: argparse.Namespace) -> Store:
    store = open_store(args.url or os.environ.get(URL_ENV) or default_store_url())
    # Opening an SQLite store creates its file: a mistyped path would show an empty cache, so it is refused.
    if isinstance(store, SQLiteStore) and not store.path.exists():
        raise NoStore(f"no store at {store.path} (check --url or ${URL_ENV})")
    return store


def _store_failures() -> tuple[type[BaseException], ...]:
    """What a store that cannot be reached raises: the OS's errors, SQLite's, redis-py's (if it was imported)."""
    failures: list[type[BaseException]] = [OSError, sqlite3.Error]
    redis_exceptions = sys.modules.get("redis.exceptions")
    if redis_exceptions is not None:
        failures.append(redis_exceptions.RedisError)
    return tuple(failures)


def _seconds(value: str, option: str) -> int:
    try:
        return check_ttl(value)
    except MetrionCacheError:
        raise MetrionCacheError(f"invalid {option} {value!r}; use a duration like 7d, 12h, 90m or seconds") from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def stats_command(args: argparse.Namespace, store: Store) -> int:
    since = time.time() - _seconds(args.since, "--since") if args.since else None
    report = stats(store, args.namespace, since=since, by=args.by)
    if args.json:
        _print_json(report.as_dict())
        return 0
    period = f"in the last {args.since}" if args.since else "in the ledger"
    print(f"metrion cache: {plural(report.total.requests, 'call')} {period} ({store.url})")
    print(render_report(report))
    return 0


def _selected(args: argparse.Namespace, store: Store) -> list[StoredEntry]:
    found = entries(store, args.namespace)
    if getattr(args, "model", None):
        found = [stored for stored in found if stored.entry.model == args.model]
    key = getattr(args, "key", None)
    if key is not None:
        found = [stored for stored in found if _key_matches(stored, key)]
    return found


def _key_matches(stored: StoredEntry, wanted: str) -> bool:
    """A storage key, a cache key, or the first 8+ characters of a cache key (as ls shows it)."""
    wanted = wanted.strip()
    return stored.storage_key == wanted or (len(wanted) >= 8 and stored.entry.key.startswith(wanted))


def _check_key(key: str) -> None:
    if ":" not in key and len(key.strip()) < 8:  # a storage key has colons; a cache key needs 8 characters
        raise MetrionCacheError(f"key {key!r} is too short: give at least its first 8 characters")


def _listed(stored: StoredEntry, use: KeyUse) -> dict[str, Any]:
    extra = {"hits": use.hits, "last_used": use.last_used, "source": use.source or None, "preview": use.preview or None}
    return {**stored.summary(), **extra}


def ls_command(args: argparse.Namespace, store: Store) -> int:
    found = _selected(args, store)
    uses = key_uses(read_records(store, args.namespace)) if found else {}
    if args.json:
        _print_json([_listed(stored, use_of(stored, uses)) for stored in found])
    elif not found:
        print("metrion cache: no stored answers" + (f" for model {args.model!r}" if args.model else ""))
    else:
        print(render_entries(found, uses))
        print(f"{plural(len(found), 'answer')}, {plural(sum(s.entry.size for s in found), 'byte')}")
    return 0


def show_command(args: argparse.Namespace, store: Store) -> int:
    found = _selected(args, store)
    if not found:
        print(f"metrion-cache: no stored answer with key {args.key.strip()!r} in {store.url}", file=sys.stderr)
        return 1
    uses = key_uses(read_records(store, args.namespace))
    if args.json:
        _print_json(
            [
                {
                    **_listed(stored, use_of(stored, uses)),
                    "headers": [list(header) for header in stored.entry.headers],
                    "text": answer_text(stored.entry),
                    "answer": answer_json(stored.entry),
                }
                for stored in found
            ]
        )
        return 0
    for number, stored in enumerate(found):
        if number:
            print()
        if args.text:
            print(answer_text(stored.entry))
            continue
        # Stored entries hold the provider's answer and replayable response headers only:
        # request headers (API keys) and set-cookie never enter the store.
        for name, value in _described(stored, use_of(stored, uses)):
            print(f"{name:>16}: {value}")
        print()
        print(answer_body(stored.entry) if args.raw else answer_text(stored.entry))
    return 0


def _described(stored: StoredEntry, use: KeyUse) -> list[tuple[str, str]]:
    info, now = stored.summary(), time.time()
    expires = info["expires_in"]
    used = "-" if info["input_tokens"] is None else f"{info['input_tokens']:,} in / {info['output_tokens'] or 0:,} out"
    lines = [
        ("key", info["key"]),
        ("storage key", info["storage_key"]),
        ("namespace", info["namespace"]),
        ("model", info["model"]),
        ("format", f"{info['wire_format']}, {'stream' if info['stream'] else 'json'}"),
        ("status", str(info["status"])),
        ("size", f"{plural(info['bytes'], 'byte')}, {plural(info['chunks'], 'chunk')}"),
        ("stored", f"{utc(info['stored_at'])} ({ago(info['stored_at'], now)})"),
        ("expires", "never" if expires is None else f"{utc(now + expires)} (in {duration(expires)})"),
        ("provider time", duration(info["provider_seconds"])),
        ("tokens", used),
        ("hits", f"{use.hits} (last used {ago(use.last_used, now)})"),
    ]
    if use.source:
        lines.append(("source", use.source))
    if use.preview:
        lines.append(("prompt", use.preview))
    lines.append(("headers", ", ".join(f"{name}: {value}" for name, value in stored.entry.headers)))
    return lines


def purge_command(args: argparse.Namespace, store: Store) -> int:
    found = _selected(args, store) if args.model or args.key else entries(store, args.namespace)
    what = f"model {args.model!r}" if args.model else f"key {args.key.strip()}" if args.key else ""
    if args.older_than:
        cutoff = time.time() - _seconds(args.older_than, "--older-than")
        found = [stored for stored in found if stored.entry.stored_at < cutoff]
        what = f"stored more than {args.older_than} ago"
    if args.all:
        where = f"namespace {args.namespace!r}" if args.namespace else "every namespace"
        what = f"all, in {where}"
        if found and not args.yes:
            # The question goes to stderr, so that --json's output stays JSON.
            print(
                f"Delete all {plural(len(found), 'stored answer')} in {where} of {store.url}? [y/N] ",
                end="",
                file=sys.stderr,
                flush=True,
            )
            try:
                reply = input()
            except EOFError:
                reply = ""
            if reply.strip().lower() not in ("y", "yes"):
                print("metrion-cache: nothing deleted (confirm, or pass --yes)", file=sys.stderr)
                return 1
    # Exact deletes: a shared entry's storage key is a prefix of the same prompt's per-credential keys.
    # Counted by what the store removed: an entry may expire or go elsewhere between listing and delete.
    removed = [stored for stored in found if store.delete(stored.storage_key)]
    size = sum(stored.entry.size for stored in removed)
    if args.json:
        _print_json(
            {
                "removed": len(removed),
                "bytes": size,
                "which": what,
                "url": store.url,
                "storage_keys": [stored.storage_key for stored in removed],
            }
        )
        return 0
    print(
        f"metrion cache: removed {plural(len(removed), 'stored answer')} ({what}), {plural(size, 'byte')}, "
        f"from {store.url}"
    )
    return 0


def run_ledger_command(args: argparse.Namespace) -> int:
    """stats, ls, show, purge: one line on stderr and exit code 1 when the store is missing or unreachable."""
    # Bad arguments are told before the store is looked for.
    for option in ("since", "older_than"):
        if getattr(args, option, None):
            _seconds(getattr(args, option), "--" + option.replace("_", "-"))
    if getattr(args, "key", None) is not None:
        _check_key(args.key)
    try:
        store = _store(args)
        return LEDGER_COMMANDS[args.command](args, store)
    except NoStore as error:
        problem = str(error)
    except BrokenPipeError:
        raise  # an OSError, but the reader's, not the store's: main ends quietly
    except _store_failures() as error:
        url = args.url or os.environ.get(URL_ENV) or default_store_url()
        problem = f"cannot reach the store {mask_password(url)}: {type(error).__name__}: {error}"
    print(f"metrion-cache: {problem}", file=sys.stderr)  # outside the except block: no chained traceback
    return 1


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
            option.flag, dest=option.name, **option.flag_arguments, help=text + (f"; env: {env}" if env else "")
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


# -- dashboard, report ----------------------------------------------------------------------------------------


def add_dashboard_commands(commands: Any) -> None:
    store_help = "cache store URL (default: METRION_CACHE_URL, else .metrion_cache/cache.sqlite3)"
    board = commands.add_parser(
        "dashboard", help="a local web page of the calls (Logs) and what the cache saved (Savings)"
    )
    board.add_argument("--url", help=store_help)
    board.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token)"
    )
    board.add_argument("--port", type=int, default=8788, help="port to listen on (default 8788)")
    board.add_argument(
        "--token", help="require this token: open the page as /_metrion/?token=TOKEN (env: METRION_PROXY_TOKEN)"
    )
    report = commands.add_parser("report", help="the dashboard's Logs and Savings as one self-contained HTML file")
    report.add_argument("--url", help=store_help)
    report.add_argument("--namespace", help="only this namespace (default: every namespace in the store)")
    report.add_argument("--html", required=True, metavar="FILE", help="write the report to FILE")
    report.add_argument("--period", default="30d", help="today, 7d, 30d, all, or a duration like 12h (default 30d)")


def dashboard_command(args: argparse.Namespace, store: Store) -> int:
    try:
        import uvicorn

        from .integrations.dashboard import PREFIX, DashboardApp
        from .integrations.server import TOKEN_ENV, check_bind
    except ImportError:
        print("metrion-cache dashboard needs uvicorn: pip install 'metrion-fixture[proxy]'", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token)  # the proxy's rule: beyond this machine only with a token
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"metrion cache dashboard on http://{shown}:{args.port}{PREFIX}{'?token=TOKEN' if token else ''} "
        f"(store {mask_password(store.url)}; Ctrl+C stops it)",
        file=sys.stderr,
        flush=True,
    )
    app = DashboardApp(store, token=token)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", ws="none")).run()
    return 0


def report_command(args: argparse.Namespace, store: Store) -> int:
    from .reporting.dashboard import render_page, report_data

    data = report_data(store, args.period, args.namespace)
    with open(args.html, "w", encoding="utf-8") as file:
        file.write(render_page(data))
    text = data["savings"]["text"]
    calls = data["savings"]["totals"]["requests"]
    print(
        f"metrion cache: wrote {args.html} ({data['savings']['label'].lower()}: {plural(calls, 'call')}, "
        f"hit rate {text['hit_rate']}, saved {text['saved_usd']})"
    )
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
    for collision in report.collisions:
        print(
            f"collision on {collision.storage_key}: {collision.replaced} and {collision.kept} record the same "
            f"model and messages with different request options; one answer per key is kept, the last read"
        )
    if report.store_failures:
        print(
            f"{plural(report.store_failures, 'answer')} could not be written to {report.url}: is the store running?",
            file=sys.stderr,
        )
    print(
        f"imported {plural(report.imported, 'answer')} from {plural(len(report.cassettes), 'cassette')} "
        f"into {report.url} "
        f"(namespace {report.namespace}); skipped {len(report.skipped)}"
        + (f"; {plural(len(report.collisions), 'key collision')}" if report.collisions else "")
    )
    if not report.cassettes and not report.unreadable:
        print(f"metrion-cache: no cassette found ({CASSETTE_PATTERNS})", file=sys.stderr)
        return 1
    return 1 if report.unreadable or report.store_failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader left early (| head): the rest is not wanted. Point stdout at devnull, so that
        # Python's own flush at exit does not fail again with a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace) -> int:
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
            return run_ledger_command(args)
    except MetrionCacheError as error:
        print(f"metrion-cache: {error}", file=sys.stderr)
        return 2
    return 0


LEDGER_COMMANDS: dict[str, Callable[[argparse.Namespace, Store], int]] = {
    "stats": stats_command,
    "ls": ls_command,
    "show": show_command,
    "purge": purge_command,
    "dashboard": dashboard_command,
    "report": report_command,
}


if __name__ == "__main__":
    sys.exit(main())
