"""Write the sync driver and store calls (metrion_fixture/runtime/_sync) from the async ones (_async).

    python .ci/unasync.py           # regenerate
    python .ci/unasync.py --check   # exit 1 if a generated file is out of date (run by .ci/run)

The async code is the one source of truth, as in httpcore and hishel; these token
substitutions are the whole difference between the two.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent.parent / "metrion_fixture" / "runtime"
SUBSTITUTIONS = [
    (r"\bAsyncUpstream\b", "Upstream"),
    (r"\bAsyncStoreCalls\b", "StoreCalls"),
    (r"\basync_store_calls\b", "store_calls"),
    (r"\basync def ", "def "),
    (r"\basync (for|with) ", r"\1 "),
    (r"\bawait ", ""),
    (r"\bawaited\b", "blocking"),
    (r"\basyncio\.sleep\(", "time.sleep("),
    (r"^import asyncio$", "import time"),
    (r"\.a(get|set|acquire|release|locked|acquire_and_get)\(", r".\1("),
    (r"^\"\"\"The async ", '"""The sync '),
]
HEADER = "# Generated from metrion_fixture/runtime/_async/{name} by .ci/unasync.py: edit that file, not this one.\n"


def generated(source: Path) -> str:
    text = source.read_text()
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE)
    return HEADER.format(name=source.name) + text


def main(check: bool) -> int:
    stale = []
    for source in sorted((RUNTIME / "_async").glob("*.py")):
        target = RUNTIME / "_sync" / source.name
        text = generated(source)
        if source.name == "__init__.py":
            text = (
                HEADER.format(name=source.name) + '"""The sync driver and store calls, generated from ``_async``."""\n'
            )
        if not target.exists() or target.read_text() != text:
            stale.append(target)
            if not check:
                target.write_text(text)
    if check and stale:
        print("out of date (run python .ci/unasync.py):", *map(str, stale), sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
