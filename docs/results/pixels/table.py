"""docs/results.md (b), every payload of both payload issues: the table (table.md) and the
Pareto figure (frontier.png), from `sparsat sweep` runs of sweeps/pixels.yaml,
pixels_content.yaml, pixels_shared.yaml and tokens_energy.yaml in RUNS (each in RUNS/<name>),
and the token sweeps' committed sweep.csv (docs/results/tokens*/):

    .venv/bin/python docs/results/pixels/table.py OUT RUNS

Per configuration, over its seeds: final test accuracy (mean ± sd), downlink bytes per image
(everything the satellites sent over the images stored), uplink bytes per image (acks, and a
projection's basis, codebooks and dictionary), on-board MFLOP per image (encoder, projection,
tile choice) and on-board energy per image (results.json `energy`: encoder and other FLOPs,
coding, radio). Token payloads' accuracy and bytes are their 3-seed sweeps'; their energy and
FLOPs come from sweeps/tokens_energy.yaml's one seed (a dash where it was not run)."""

from __future__ import annotations

import csv
import json
import statistics as st
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOKEN_CSVS = ("tokens", "tokens_baseline", "tokens_entropy")

Key = tuple[str, str, str]  # (payload label, r, family)
# the token payloads shown (the whole token frontier: docs/results/tokens/table.md)
TOKENS_SHOWN = {("int8 CLS (192 values)", "0"), ("int8 CLS (192 values)", "0.5"),
                ("PCA D=64 int4", "0"), ("PCA D=32 int4", "0"), ("PCA D=32 int4", "0.5"),
                ("PCA D=64 pq", "0"), ("PCA D=32 pq", "0"), ("PCA D=8 pq", "0"),
                ("PCA D=32 int4, fixed scale, zstd", "0")}


def _codec_label(c: dict[str, Any] | None) -> tuple[str, str]:
    if not c or c.get("name", "raw") == "raw":
        return "raw", "raw"
    name = {"png": "PNG", "webp": "WebP", "jpeg": "JPEG", "jpegxl": "JPEG XL",
            "jpeg2k": "JPEG 2000"}[c["name"]]
    q = c.get("quality")
    label = name + ("" if q is None else f" {q} dB" if c["name"] == "jpeg2k" else f" q{q}")
    return label + (", shared header" if c.get("header") == "shared" else ""), name


def _ratio(mask: dict[str, Any]) -> str:
    return "0" if mask["kind"] == "none" else f"{mask.get('ratio', 0.5):g}"


def _pixel_key(cfg: dict[str, Any]) -> Key:
    s = cfg["sensors"]
    label, family = _codec_label(s["payload"].get("codec"))
    choice = s["mask"].get("choice", "random")
    return (f"patches, {label}" + (", content tiles" if choice == "content" else ""),
            _ratio(s["mask"]), family)


def _token_key(p: dict[str, Any] | None, ratio: str) -> Key:
    if p is None:
        return "int8 CLS (192 values)", ratio, "CLS"
    q = p.get("quantizer", "int4")
    scale = p.get("scale", "float16") if q in ("int8", "int4") else ""
    zstd = ", zstd" if p.get("zstd_level") else ""
    label = f"PCA D={p.get('dim', 32)} {q}" + (", fixed scale" if scale == "fixed" else "") + zstd
    return label, ratio, "CLS"


def _runs(root: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    import yaml

    out = []
    for d in sorted((root / "points").iterdir()) if (root / "points").exists() else []:
        f = d / "run" / "results.json"
        if f.exists():
            out.append((json.loads(f.read_text()), yaml.safe_load((d / "scenario.yaml")
                                                                  .read_text())))
    return out


def _measure(r: dict[str, Any], cfg: dict[str, Any]) -> dict[str, float]:
    """One point's figures per image. The radio's energy is the satellites' downlink bits at
    the link's rate (`radio_watts` while they are on the air): what results.json books since
    the radio counts transmit time only; runs made before that booked the downlinks' busy
    seconds (acks and latencies too), so it is made again here from the bytes, exact on the
    quickstart's lossless, unframed 100 kbit/s passes."""
    b, n = r["bytes"], r["samples"]["stored"]
    e = r.get("energy") or {}
    j = e.get("j", {})
    other = e.get("onboard_other_flops", 0)
    watts = cfg.get("sensors", {}).get("energy", {}).get("radio_watts", 5.0)
    rate = cfg.get("links", {}).get("downlink", {}).get("rate_bps")
    radio = 8 * b["downlink"] / rate * watts if rate else float("nan")
    missing = 0.0 if e else float("nan")  # no energy at all: a run from before it
    parts = [j.get(k, missing) for k in ("coding", "encoder", "choice_and_detector")]
    return dict(acc=r["final_accuracy"], down=b["downlink"] / n, up=b["uplink"] / n,
                flops=(r["compute"]["onboard_encoder"]["flops"] + other) / n,
                energy=(radio + sum(parts)) / n, radio=radio / n, coding=parts[0] / n,
                encoder=parts[1] / n)


def collect(runs: Path) -> dict[Key, list[dict[str, float]]]:
    rows: dict[Key, list[dict[str, float]]] = {}
    for name in ("pixels", "pixels_content", "pixels_shared"):
        for r, cfg in _runs(runs / name):
            rows.setdefault(_pixel_key(cfg), []).append(_measure(r, cfg))
    energy: dict[Key, dict[str, float]] = {}
    for r, cfg in _runs(runs / "tokens_energy"):
        s = cfg["sensors"]
        energy[_token_key(s["payload"].get("projection"), _ratio(s["mask"]))] = _measure(r, cfg)
    for name in TOKEN_CSVS:
        path = HERE.parent / name / "sweep.csv"
        if not path.exists():
            continue
        with open(path) as f:
            for row in csv.DictReader(f):
                if row["status"] != "done":
                    continue
                ratio = "0" if row.get("sensors.mask.kind", "none") == "none" else "0.5"
                proj = None
                if name != "tokens_baseline":
                    if row.get("sensors.payload.projection.method") == "supervised":
                        continue  # its own study (docs/results/tokens/table.md)
                    proj = {"dim": int(row["sensors.payload.projection.dim"]),
                            "quantizer": row["sensors.payload.projection.quantizer"]}
                    if row.get("sensors.payload.projection.scale"):
                        proj["scale"] = row["sensors.payload.projection.scale"]
                    if row.get("sensors.payload.projection.zstd_level") not in (None, "", "0"):
                        proj["zstd_level"] = int(row["sensors.payload.projection.zstd_level"])
                key = _token_key(proj, ratio)
                if key[:2] not in TOKENS_SHOWN:
                    continue
                n = float(row["downlink_bytes"]) / float(row["downlink_bytes_per_image"])
                m = energy.get(key, {})
                rows.setdefault(key, []).append(dict(
                    acc=float(row["final_accuracy"]),
                    down=float(row["downlink_bytes_per_image"]),
                    up=float(row["uplink_bytes"]) / n,
                    flops=m.get("flops", float("nan")), energy=m.get("energy", float("nan")),
                    radio=m.get("radio", float("nan")), coding=m.get("coding", float("nan")),
                    encoder=m.get("encoder", float("nan"))))
    return rows


def _beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def _ms(xs: list[float]) -> str:
    return f"{st.mean(xs):.4f}" + (f" ± {st.stdev(xs):.4f}" if len(xs) > 1 else "")


def _fronts(k: Key, front: set[Key], pixels: set[Key]) -> str:
    return ", ".join(n for n, f in (("**all**", front), ("**pixels**", pixels)) if k in f)


def _num(x: float, f: str) -> str:
    return "—" if x != x else f.format(x)  # NaN: not measured


def frontier(rows: dict[Key, list[dict[str, float]]]) -> list[Key]:
    pts = {k: (st.mean(x["down"] for x in v), st.mean(x["acc"] for x in v))
           for k, v in rows.items()}
    front = [k for k in pts if not any(o != k and _beats(pts[o], pts[k]) for o in pts)]
    return sorted(front, key=lambda k: pts[k][0])


def main(out: Path, runs: Path) -> None:
    rows = collect(runs)
    front = set(frontier(rows))
    # no encoder on board: the frontier of the pixel payloads alone
    pixels = set(frontier({k: v for k, v in rows.items() if k[2] != "CLS"}))
    keys = sorted(rows, key=lambda k: (k[2] == "CLS", st.mean(x["down"] for x in rows[k])))
    lines = ["| payload | r | seeds | accuracy | downlink B/image | uplink B/image | on-board "
             "MFLOP/image | on-board mJ/image (radio, coding, encoder) | Pareto frontier |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in keys:
        v = rows[k]
        mean = {f: st.mean(x[f] for x in v) for f in v[0]}
        lines.append(
            f"| {k[0]} | {k[1]} | {len(v)} | {_ms([x['acc'] for x in v])} | {mean['down']:.1f} "
            f"| {mean['up']:.2f} | {_num(mean['flops'] / 1e6, '{:.3g}')} "
            f"| {_num(mean['energy'] * 1e3, '{:.1f}')} ({_num(mean['radio'] * 1e3, '{:.1f}')}, "
            f"{_num(mean['coding'] * 1e3, '{:.2f}')}, {_num(mean['encoder'] * 1e3, '{:.2f}')}) "
            f"| {_fronts(k, front, pixels)} |")
    target = [k for k in keys if k[2] != "CLS" and k[2] != "raw"
              and st.mean(x["down"] for x in rows[k]) <= 200
              and st.mean(x["acc"] for x in rows[k]) >= 0.85]
    lines += ["", "Through an image codec at <= 200 B/image with accuracy >= 0.85 (the target): "
              + ("; ".join(f"{k[0]}, r = {k[1]}" for k in target) if target else "none")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _figure(out / "frontier.png", rows, front, pixels)


def _figure(path: Path, rows: dict[Key, list[dict[str, float]]], front: set[Key],
            pixels: set[Key]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"raw": "black", "PNG": "tab:gray", "WebP": "tab:blue", "JPEG": "tab:cyan",
               "JPEG XL": "tab:orange", "JPEG 2000": "tab:green", "CLS": "tab:red"}
    marks = {"0": "o", "0.5": "s", "0.75": "^"}
    fig, ax = plt.subplots(figsize=(11, 6.5))
    pts = {k: (st.mean(x["down"] for x in v), st.mean(x["acc"] for x in v),
               st.stdev(x["acc"] for x in v) if len(v) > 1 else 0.0) for k, v in rows.items()}
    for k, (x, y, sd) in pts.items():
        content = "content" in k[0]
        ax.errorbar(x, y, yerr=sd, fmt=marks.get(k[1], "o"), color=colours[k[2]], ms=6,
                    mfc="none" if content or "shared" in k[0] else colours[k[2]], capsize=2)
    for f, style in ((front, "k--"), (pixels, "b:")):
        line = sorted(f, key=lambda k: pts[k][0])
        ax.plot([pts[k][0] for k in line], [pts[k][1] for k in line], style, lw=0.9)
    for k in sorted(front | pixels, key=lambda k: pts[k][0]):
        ax.annotate(f"{k[0]} r={k[1]}", (pts[k][0], pts[k][1]), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    ax.axvline(200, color="grey", lw=0.6, ls=":")
    ax.axhline(0.85, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("downlink bytes per image (all protocol included)")
    ax.set_ylabel("final test accuracy (mean ± sd over seeds)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f) for f, c in
               colours.items()]
    handles += [plt.Line2D([], [], marker=m, ls="", color="grey", label=f"r = {r}")
                for r, m in marks.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", mfc="none", color="grey",
                           label="content tiles / shared header")]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title("Every payload: Fashion-MNIST, 12,000 training images, 5 epochs, IST K=2 "
                 "(the quickstart)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
