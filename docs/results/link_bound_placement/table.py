"""One-off: the table of docs/results.md "Two CubeSats, IID against label skew"
(timeline_table.md), from a `sparsat sweep sweeps/link_bound_placement.yaml --out DIR` run:
python3 table.py DIR."""

import json
import statistics as st
import sys
from pathlib import Path


def mean_sd(xs: list[float | None], f: str = "{:.4f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f.format(st.mean(xs)) + (" ± " + f.format(st.stdev(xs)) if len(xs) > 1 else "")


def main(root: Path) -> None:
    rows: dict[str, list[dict[str, float]]] = {}
    for d in sorted((root / "points").iterdir()):
        f = d / "run" / "results.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        first = next(t for t in r["timeline"] if t.get("update"))
        rows.setdefault(d.name.rsplit("_seed=", 1)[0], []).append(dict(
            delivered=r["captures"]["stored_on_ground"], first=first["accuracy"],
            ttt=r["time_to_accuracy_s"], hor=r["accuracy_at_horizon"]))
    print("| point | n | delivered | after the 1st update | time to 0.75 (h) | at the horizon |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, v in rows.items():
        print(f"| {k} | {len(v)} | {st.mean(x['delivered'] for x in v):,.0f} "
              f"| {mean_sd([x['first'] for x in v])} "
              f"| {mean_sd([x['ttt'] / 3600 if x['ttt'] else None for x in v], '{:.2f}')} "
              f"| {mean_sd([x['hor'] for x in v])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
