"""Compare two runs' results.json figure by figure: the check that a refactor changed nothing.

    python bench/results_diff.py BEFORE AFTER [NAME ...]

BEFORE and AFTER are run folders (each holds results.json) or folders of them (then every
NAME, default every sub-folder of BEFORE with a results.json). Every leaf of results.json is
a figure, named by its path (`.history[3].accuracy`); figures whose path contains `wall` (wall
clock) or `peak_rss_mb` (memory) differ from run to run and are left out. Prints one line per
run and each differing figure (the first 20), ends with one JSON line, and exits 1 if any
figure differs or is missing on one side. Issue 21's before/after check ran it on the
quickstart, a CLS run, pleo.yaml, cubesat_uhf.yaml and constellation.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SKIP = ("wall", "peak_rss_mb")
ABSENT = "<absent>"


def figures(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf of a results.json tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from figures(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from figures(v, f"{path}[{i}]")
    else:
        yield path, tree


def compare(before: Path, after: Path) -> tuple[int, list[tuple[str, Any, Any]]]:
    """(figures compared, [(path, before, after)] of those that differ) of two results.json."""
    a = dict(figures(json.loads(before.read_text())))
    b = dict(figures(json.loads(after.read_text())))
    keys = [k for k in sorted(set(a) | set(b)) if not any(s in k for s in SKIP)]
    return len(keys), [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in keys
                       if a.get(k, ABSENT) != b.get(k, ABSENT)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("names", nargs="*", help="runs to compare (sub-folders of both)")
    args = ap.parse_args(argv)
    if (args.before / "results.json").exists():
        pairs = {args.before.name: (args.before, args.after)}
    else:
        names = args.names or sorted(p.parent.name for p in args.before.glob("*/results.json"))
        pairs = {n: (args.before / n, args.after / n) for n in names}
    if not pairs:
        ap.error(f"no results.json in {args.before} or its sub-folders")
    summary: dict[str, dict[str, int]] = {}
    for name, (b, a) in pairs.items():
        for side in (b, a):
            if not (side / "results.json").exists():
                ap.error(f"{side / 'results.json'} not found")
        n, diff = compare(b / "results.json", a / "results.json")
        print(f"{name}: {n} figures compared, {len(diff)} differ")
        for path, x, y in diff[:20]:
            print(f"   {path}: {x!r} -> {y!r}")
        summary[name] = {"compared": n, "differ": len(diff)}
    print(json.dumps(summary))
    return 1 if any(s["differ"] for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
