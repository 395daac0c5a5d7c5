"""Write (or check) the committed dashboard JSON from dashboards/definitions.py.

``python -m dashboards.generate`` rewrites dashboards/*.json; ``--check`` exits 1 when a committed file
differs from what the code generates, so a hand edit of the JSON cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dashboards.definitions import DASHBOARDS
from dashboards.grafana import Json

DASHBOARD_DIR = Path(__file__).resolve().parent


def render(dash: Json) -> str:
    """Stable text form: sorted keys, 2-space indent, trailing newline (reviewable diffs)."""
    return json.dumps(dash, indent=2, sort_keys=True) + "\n"


def generated() -> dict[str, str]:
    return {name: render(build()) for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, exit 1 on a difference")
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR, help="folder to write into")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generated().items():
        path = args.out / name
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print(f"out of date (run python -m dashboards.generate): {', '.join(stale)}", file=sys.stderr)
        return 1
    for name in stale:
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
