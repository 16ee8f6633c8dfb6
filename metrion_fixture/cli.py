"""The ``metrion-cache`` command."""

from __future__ import annotations

import argparse
import sys

from .errors import MetrionCacheError


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
    imports.add_argument(
        "--url", help="cache store URL (default: METRION_CACHE_URL, else .metrion_cache/cache.sqlite3)"
    )
    imports.add_argument("--namespace", help="cache namespace (default: metrion)")
    imports.add_argument("--ttl", help="how long the entries live: seconds or a duration like 12h, 30d (default 7d)")
    return parser


def import_cassettes_command(args: argparse.Namespace) -> int:
    try:
        import vcr  # noqa: F401

        from .cassettes import import_cassettes
    except ImportError:
        print("metrion-cache import-cassettes needs vcrpy to read the cassettes: pip install vcrpy", file=sys.stderr)
        return 2
    report = import_cassettes(args.paths, url=args.url, namespace=args.namespace, ttl=args.ttl)
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
    except MetrionCacheError as error:
        print(f"metrion-cache: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
