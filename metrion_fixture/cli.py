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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            try:
                from .demo.faq_bot import run_demo
                import anthropic  # noqa: F401
            except ImportError:
                print("metrion-cache demo needs the anthropic SDK: pip install 'metrion-fixture[demo]'", file=sys.stderr)
                return 2
            run_demo(args.url, latency=args.latency)
    except MetrionCacheError as error:
        print(f"metrion-cache: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
