"""The frontier for tokens (docs/results.md "Tokens at the limit"): the table (table.md) and the
Pareto figure (frontier.png) from `sparsat sweep` runs of sweeps/tokens.yaml,
sweeps/tokens_baseline.yaml and sweeps/tokens_entropy.yaml:

    python3 docs/results/tokens/table.py OUT DIR [DIR ...]

Per configuration (the points' values but the seed), over its seeds: final test accuracy
(mean ± sd), downlink bytes per image (everything the satellites sent: batches, the streams'
call credentials and, for a supervised basis, the plain tokens it was fitted on, over the
images stored), uplink bytes (acks, bases, codebooks, dictionaries) in all and per image,
and the on-board FLOPs per image (encoder and projection)."""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path
from typing import Any


def _config(r: dict[str, Any], cfg: dict[str, Any]) -> tuple[str, str, str]:
    """(payload label, r, quantizer family) of a point's scenario."""
    s = cfg["sensors"]
    ratio = s["mask"].get("ratio", 0.0) if s["mask"]["kind"] != "none" else 0.0
    p = s["payload"].get("projection")
    if p is None:
        return f"int8 CLS, E = {192}", f"{ratio:g}", "plain"
    q = p.get("quantizer", "int4")
    scale = p.get("scale", "float16") if q in ("int8", "int4") else ""
    method = p.get("method", "pca")
    zstd = " + zstd" if p.get("zstd_level") else ""
    label = (f"{'supervised' if method == 'supervised' else 'PCA'} D={p.get('dim', 32)} {q}"
             + (f"/{scale}" if scale else "") + zstd
             + (f" ({p.get('fit_samples', 1000)} labelled)" if method == "supervised" else ""))
    return label, f"{ratio:g}", q if method == "pca" else "supervised"


def _points(roots: list[Path]) -> dict[tuple[str, str, str], list[dict[str, float]]]:
    import yaml

    out: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for root in roots:
        for d in sorted((root / "points").iterdir()):
            f = d / "run" / "results.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            cfg = yaml.safe_load((d / "scenario.yaml").read_text())
            b, n = r["bytes"], r["samples"]["stored"]
            up = b.get("uplink_breakdown", {"acks": b["uplink"]})
            out.setdefault(_config(r, cfg), []).append(dict(
                acc=r["final_accuracy"], down=b["downlink"] / n, uplink=b["uplink"],
                content=sum(v for k, v in up.items() if k != "acks"),
                flops=r["compute"]["onboard_encoder"]["flops"] / n, n=n,
                wall=r["wall_time_s"]))
    return out


def _beats(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """(bytes, accuracy) a is at least as small and as accurate as b, and better in one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def _ms(xs: list[float], f: str = "{:.4f}") -> str:
    return f.format(st.mean(xs)) + (" ± " + f.format(st.stdev(xs)) if len(xs) > 1 else "")


def main(out: Path, roots: list[Path]) -> None:
    rows = _points(roots)
    keys = sorted(rows, key=lambda k: (k[1], st.mean(x["down"] for x in rows[k])))
    lines = ["| payload | r | seeds | accuracy | downlink B/image | uplink B (all) | uplink "
             "B/image | on-board MFLOP/image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in keys:
        v = rows[k]
        lines.append(
            f"| {k[0]} | {k[1]} | {len(v)} | {_ms([x['acc'] for x in v])} "
            f"| {st.mean(x['down'] for x in v):.2f} | {st.mean(x['uplink'] for x in v):,.0f} "
            f"| {st.mean(x['uplink'] / x['n'] for x in v):.2f} "
            f"| {st.mean(x['flops'] for x in v) / 1e6:.1f} |")
    # the Pareto frontier per r: no other configuration is both smaller and more accurate
    for ratio in sorted({k[1] for k in keys}):
        mine = [k for k in keys if k[1] == ratio]
        pts = {k: (st.mean(x["down"] for x in rows[k]), st.mean(x["acc"] for x in rows[k]))
               for k in mine}
        front = [k for k in mine if not any(o != k and _beats(pts[o], pts[k]) for o in mine)]
        lines.append("")
        lines.append(f"Frontier at r = {ratio}: " + "; ".join(
            f"{k[0]} ({pts[k][0]:.1f} B, {pts[k][1]:.4f})"
            for k in sorted(front, key=lambda k: pts[k][0])))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _figure(out / "frontier.png", rows, keys)


def _figure(path: Path, rows: dict[tuple[str, str, str], list[dict[str, float]]],
            keys: list[tuple[str, str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"int8": "tab:blue", "int4": "tab:orange", "sign": "tab:green", "pq": "tab:red",
               "supervised": "tab:purple", "plain": "black"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, ratio in zip(axes, ["0", "0.5"], strict=True):
        mine = [k for k in keys if k[1] == ratio]
        pts = {k: (st.mean(x["down"] for x in rows[k]), st.mean(x["acc"] for x in rows[k]),
                   st.stdev(x["acc"] for x in rows[k]) if len(rows[k]) > 1 else 0.0)
               for k in mine}
        for k, (x, y, sd) in pts.items():
            zstd = "zstd" in k[0]
            ax.errorbar(x, y, yerr=sd, fmt="s" if zstd else "o", color=colours[k[2]],
                        mfc="none" if "fixed" in k[0] else colours[k[2]], ms=6, capsize=2)
        front = sorted((k for k in mine if not any(
            o != k and _beats(pts[o][:2], pts[k][:2]) for o in mine)), key=lambda k: pts[k][0])
        ax.plot([pts[k][0] for k in front], [pts[k][1] for k in front], "k--", lw=0.8)
        for k in front:
            ax.annotate(k[0].replace("PCA ", ""), (pts[k][0], pts[k][1]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
        ax.axvline(24, color="grey", lw=0.6, ls=":")
        ax.axhline(0.85, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("downlink bytes per image (all protocol included)")
        ax.set_title(f"r = {ratio}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (mean ± sd over seeds)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=q)
               for q, c in colours.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", mfc="none", color="grey",
                           label="fixed scale"),
                plt.Line2D([], [], marker="s", ls="", color="grey", label="zstd batches")]
    axes[1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle("Tokens at the limit: Fashion-MNIST, 12,000 training images, 5 epochs, IST K=2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
