"""Every benchmark in one run: a table on stdout, the details in benchmarks/results/.

    .venv/bin/python benchmarks/run.py            # everything, a few minutes on 2 cores
    .venv/bin/python benchmarks/run.py --quick    # without the 1,000,000-entry Redis fill
    .venv/bin/python benchmarks/run.py --smoke    # tiny counts: checks that it all runs

Each measure is a ratio against a baseline timed in the same run (see README.md).
Redis must answer at --redis; the scale measure also needs the empty DBs --scale-dbs,
which it fills and flushes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import concurrency  # noqa: E402
import first_read  # noqa: E402
import hit_overhead  # noqa: E402
import miss  # noqa: E402
import proxy  # noqa: E402
import scale  # noqa: E402
import storage  # noqa: E402
import streams  # noqa: E402
from common import Context, Row  # noqa: E402

MEASURES = ("hit_overhead", "scale", "streams", "miss", "concurrency", "storage", "proxy", "first_read")
RESULTS = Path(__file__).parent / "results"


def run(ctx: Context, only: tuple[str, ...] = MEASURES) -> dict[str, Any]:
    urls = hit_overhead.store_urls(ctx)
    parts = {
        "hit_overhead": lambda: hit_overhead.measure(ctx),
        "scale": lambda: scale.measure(ctx),
        "streams": lambda: streams.measure(ctx, urls),
        "miss": lambda: miss.measure(ctx, urls),
        "concurrency": lambda: concurrency.measure(ctx, urls),
        "storage": lambda: storage.measure(ctx, urls),
        "proxy": lambda: proxy.measure(ctx),
        "first_read": lambda: first_read.measure(ctx),
    }
    rows: list[Row] = []
    report: dict[str, Any] = {"meta": _meta(ctx), "measures": {}, "rows": []}
    for name in only:
        started = time.perf_counter()
        part_rows, raw = parts[name]()
        report["measures"][name] = raw
        report["meta"]["seconds"][name] = round(time.perf_counter() - started, 1)
        rows += part_rows
        print(f"# {name}: {report['meta']['seconds'][name]} s", file=sys.stderr, flush=True)
    report["rows"] = [row.as_dict() for row in rows]
    return report


def _meta(ctx: Context) -> dict[str, Any]:
    from importlib.metadata import version

    import redis.utils

    packages = {}
    for package in ("metrion-fixture", "anthropic", "httpx2", "redis", "hiredis", "vcrpy", "hishel", "uvicorn"):
        try:
            packages[package] = version(package)
        except Exception:  # noqa: BLE001 - not installed
            packages[package] = None
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": ctx.quick,
        "smoke": ctx.smoke,
        "requests": ctx.requests,
        "hiredis_parser": bool(redis.utils.HIREDIS_AVAILABLE),
        "packages": packages,
        "seconds": {},
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'measure':<14} {'case':<34} {'value':>12} {'baseline':>12} {'ratio':>7}  {'target':<18} ok",
        "-" * 106,
    ]
    for row in rows:
        unit = row["unit"]
        value = _number(row["value"], unit)
        base = "" if row["baseline"] is None else _number(row["baseline"], unit)
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        ok = {True: "yes", False: "NO", None: ""}[row["ok"]]
        lines.append(
            f"{row['measure']:<14} {row['case']:<34} {value:>12} {base:>12} {ratio:>7}  {row['target']:<18} {ok}"
        )
    return "\n".join(lines)


def _number(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:,.0f} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1,000,000-entry Redis fill")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check that everything runs")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per path for hit latencies")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="Redis for hits (namespaced, cleaned up)")
    parser.add_argument("--scale-redis", default="redis://127.0.0.1:6379", help="Redis server for the scale fill")
    parser.add_argument("--scale-dbs", default="12,13,14", help="empty DBs the scale fill may use and flush")
    parser.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated subset of {','.join(MEASURES)}")
    parser.add_argument("--json", type=Path, help="where to write the results (default: results/bench-TIME.json)")
    args = parser.parse_args(argv)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = set(only) - set(MEASURES)
    if unknown:
        parser.error(f"unknown measures {sorted(unknown)}; choose from {', '.join(MEASURES)}")
    with tempfile.TemporaryDirectory() as folder:
        ctx = Context(
            redis=args.redis,
            scale_redis=args.scale_redis.rstrip("/"),
            scale_dbs=tuple(int(db) for db in args.scale_dbs.split(",") if db.strip()),
            folder=folder,
            requests=args.requests,
            quick=args.quick,
            smoke=args.smoke,
        )
        report = run(ctx, only)
    print(table(report["rows"]))
    path = args.json or RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    if args.json is None:
        (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
