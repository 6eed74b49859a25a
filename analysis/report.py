"""One self-contained HTML report of a decomposition run: summary, curves, figures, components, config.

    python analysis/report.py RUN_DIR [--out DIR]

Writes OUT/report.html (OUT defaults to RUN_DIR/analysis): images embedded as base64 PNGs, inline CSS
and no scripts, so it opens offline in any browser. It opens with what a reader came for: the experiment's
headline metrics from results.json (MMCS/ML2R, CE unrecovered, accuracies: every result not per module),
per module its C, alive count, L0 and any other per-module result, the reconstruction losses and the run's
time; the whole results.json and the config are folded (<details>, no script needed). The component tables
come from OUT/harvest.json, which analysis/harvest.py writes first when it is missing or older than the
run's newest checkpoint, with the labels of OUT/autointerp.json when analysis/autointerp.py has run. A conv
module's table adds each subcomponent's coverage and spread, above it a grid of where its densest alive
subcomponents fire: their firing density at each output location, one small heatmap each.
Prints the path of the HTML as its last line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.autointerp import load_labels  # noqa: E402
from analysis.harvest import LOCAL_COVERAGE, SPREAD_MIN_SHARE, harvested  # noqa: E402
from spd_run import run_main  # noqa: E402

SECTIONS = ["Summary", "Training curves", "Figures", "Components", "Config"]  # the report's <h2>s, in order
RUN_KEYS = ["steps", "wall_s", "steps_per_s", "tokens_per_s", "peak_rss_mb", "peak_gpu_mem_mb", "resumed_from_step",
            "skipped_steps"]  # results.json's "Time" table; recon/*, train/* and faithfulness: "Losses"
HEADLINE_FIRST = ["mmcs", "ml2r", "ce_unrecovered", "acc_target", "acc_ci_masked"]  # the rest in results.json's order
SHOWN_CONTEXTS, SHOWN_TOKENS = 5, 5  # per LM subcomponent in the table (harvest.json keeps top-k of each)
SHOWN_MAPS = 32  # per conv module: location maps of its densest alive subcomponents
CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h2 { border-bottom: 2px solid #4a7; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #eef5f0; }
td.num { text-align: right; font-family: monospace; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 12px; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
.ctx { font-family: monospace; white-space: pre; font-size: 12px; }
.ctx mark { border-radius: 2px; color: #000; }
.note { color: #666; font-size: 13px; }
.module { display: inline-block; vertical-align: top; margin-right: 2em; }
.summary > div { display: inline-block; vertical-align: top; margin-right: 2.5em; }
.summary h3 { margin: 0.6em 0 0.2em; font-size: 15px; }
td.label { font-style: italic; color: #2d5e46; }
"""


def png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def fmt(v) -> str:
    """A results.json value as table-cell HTML: floats to 4 digits, a dict (e.g. C per module) one key a line."""
    if isinstance(v, dict):
        return "<br>".join(f"{escape(str(k))}: {fmt(x)}" for k, x in v.items())
    return f"{v:.4g}" if isinstance(v, float) else escape(str(v))


def curves_png(rows: list[dict]) -> bytes:
    """Training loss terms (left) and eval L0 per module (right) against step, from metrics.jsonl rows."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, prefix, title in ((axes[0], "train/", "training losses"), (axes[1], "eval/l0/", "L0 per module")):
        keys = sorted({k for r in rows for k in r if k.startswith(prefix) and k not in ("train/lr",
                                                                                        "train/skipped_steps")})
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k.removeprefix(prefix))
        ax.set(yscale="log", xlabel="step", title=title)
        if keys:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[1].set_ylabel("active subcomponents per example / token")
    fig.tight_layout()
    return fig_png(fig)


def context_html(ctx: dict) -> str:
    """One context, each token shaded by the subcomponent's CI on it (older harvests: the firing token alone),
    the firing token outlined."""
    cis = ctx.get("token_ci") or [ctx["ci"] if i == ctx["pos"] else 0.0 for i in range(len(ctx["tokens"]))]
    parts = []
    for i, (tok, ci) in enumerate(zip(ctx["tokens"], cis)):
        tok = escape(tok.replace("\n", "⏎"))
        outline = "; outline: 1px solid #c60" if i == ctx["pos"] else ""
        parts.append(f'<mark style="background: rgba(255, 140, 0, {ci:.2f}){outline}">{tok}</mark>' if ci > 0 or outline
                     else tok)
    return f'<div class="ctx">{"".join(parts)}  <span class="note">CI {ctx["ci"]:.2f}</span></div>'


def tokens_html(effects: list[dict]) -> str:
    return "<br>".join(f'<span class="ctx">{escape(repr(e["token"]))}</span> {e["delta_prob"]:+.3f}'
                       for e in effects[:SHOWN_TOKENS])


def location_maps_png(m: dict) -> bytes:
    """A conv module's firing density per output location (harvest.json's maps) of its densest alive
    subcomponents, 8 to a row, each on its own scale (white 0, dark blue its max) and titled with its index,
    that max and its coverage."""
    loc, shown = m["locations"], m["alive"][:SHOWN_MAPS]
    cols = min(8, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, c in zip(axes.flat, shown):
        density = loc["density"][str(c)]
        top = max(map(max, density))
        ax.imshow(density, cmap="Blues", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(f"{c}: max {top:.2g}\ncoverage {loc['coverage'][c]:.2f}", fontsize=6)
    return fig_png(fig)


def kv_table(rows: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td class='num'>{fmt(v)}</td></tr>" for k, v in rows.items()) \
        + "</table>"


def summary_html(results: dict | None, h: dict) -> str:
    """Headline metrics, losses and time from results.json, then one row per module: C and alive (harvest), and
    every per-module result ("key/<module>": L0, alive, ablation accuracies, ...) as a column."""
    modules = list(h["modules"])
    per_module: dict[str, dict] = {}  # key prefix -> {module: value}
    headline, losses, time = {}, {}, {}
    for k, v in (results or {}).items():
        prefix, _, module = k.rpartition("/")
        if module in modules:
            per_module.setdefault(prefix, {})[module] = v
        elif k in RUN_KEYS:
            time[k] = v
        elif k.startswith(("recon/", "train/")) or k == "faithfulness":
            if k != "train/lr":
                losses[k] = v
        elif not isinstance(v, dict):  # e.g. C per module: the module table has it
            headline[k] = v
    headline = {k: headline[k] for k in sorted(headline, key=lambda k: k not in HEADLINE_FIRST)}
    parts = []
    if results is None:
        parts.append('<p class="note">no results.json: the run has not finished; alive counts from the harvest</p>')
    for title, rows in (("Headline metrics", headline), ("Losses (final)", losses), ("Time", time)):
        if rows:
            parts.append(f"<div><h3>{title}</h3>{kv_table(rows)}</div>")
    head = ["module", "C", "fired (harvest)"] + list(per_module)
    body = "".join("<tr>" + f"<td>{escape(n)}</td><td class='num'>{m['C']}</td><td class='num'>{len(m['alive'])}</td>"
                   + "".join(f"<td class='num'>{fmt(per_module[p].get(n, ''))}</td>" for p in per_module) + "</tr>"
                   for n, m in h["modules"].items())
    parts.append("<div><h3>Per module</h3><table><tr>" + "".join(f"<th>{escape(x)}</th>" for x in head)
                 + f"</tr>{body}</table></div>")
    out = f'<div class="summary">{"".join(parts)}</div>'
    if results is not None:
        out += f"<details><summary>all of results.json</summary>{kv_table(results)}</details>"
    return out


def components_html(h: dict, labels: dict | None = None) -> str:
    """Per module: its alive subcomponents, densest first (for LMs with contexts and next-token effects, and
    the autointerp label and detection score of each when `labels` has them)."""
    labels = labels or {}
    out = [f'<p class="note">{h["n_examples"]} held-out {"tokens" if h["lm"] else "examples"} '
           f'({h["n_batches"]} batches, checkpoint {escape(h["checkpoint"])}); a subcomponent fires when its '
           f'CI &gt; {h["ci_threshold"]} (a conv module\'s at some location of the image: its max over locations). '
           f'Weight norm = ||U[:, c]|| ||V[c]||.'
           + (" Conv modules: coverage = the share of an image's locations where c fires, over the images where "
              f"it fires (at most {LOCAL_COVERAGE}: a local detector); spread = the share of locations where it "
              f"fires on at least {SPREAD_MIN_SHARE:.0%} of the images (low: a fixed region)."
              if any("locations" in m for m in h["modules"].values()) else "")
           + (" Next-token effect: mean change in next-token probability when c is ablated (CI mask → 0) "
              "where it fires, this module alone masked; promoted tokens drop most, suppressed rise most."
              if h["lm"] else "")
           + (" Labels: analysis/autointerp.py; detection: balanced accuracy of an LLM predicting from the label "
              "which held-out contexts the subcomponent fires in (0.5 = chance)." if labels else "")
           + "</p>"]
    for name, m in h["modules"].items():
        alive = m["alive"]
        out.append(f'<div class="module"><h3>{escape(name)}</h3><p class="note">{len(alive)} of {m["C"]} subcomponents fired; '
                   f'the {m["C"] - len(alive)} that never did are not listed.</p>')
        conv = "locations" in m
        if conv and alive:
            shape = "x".join(map(str, m["locations"]["shape"]))
            out.append(f'<figure>{png_tag(location_maps_png(m), f"{name} location maps")}<figcaption>where '
                       f'{escape(name)}\'s {min(len(alive), SHOWN_MAPS)} densest alive subcomponents fire: the share '
                       f'of images with CI &gt; {h["ci_threshold"]} at each of its {shape} output locations'
                       f'</figcaption></figure>')
        head = ["c", "firing density", "mean CI", "weight norm"] + (["coverage", "spread"] if conv else [])
        if labels:
            head += ["label", "detection"]
        if h["lm"]:
            head += ["top activating contexts", "promotes", "suppresses"]
        rows = ["<tr>" + "".join(f"<th>{x}</th>" for x in head) + "</tr>"]
        for c in alive:
            cells = [f'<td class="num">{c}</td>'] + [f'<td class="num">{m[k][c]:.4g}</td>'
                                                      for k in ("density", "mean_ci", "weight_norm")]
            if conv:
                cells += [f'<td class="num">{m["locations"][k][c]:.3f}</td>' for k in ("coverage", "spread")]
            if labels:
                lab = labels.get(name, {}).get(str(c), {})
                score = lab.get("balanced_accuracy")
                cells += [f'<td class="label">{escape(lab.get("label") or "")}</td>',
                          f'<td class="num">{"" if score is None else f"{score:.2f}"}</td>']
            if h["lm"]:
                d = m["lm"][str(c)]
                cells += [f"<td>{''.join(context_html(x) for x in d['contexts'][:SHOWN_CONTEXTS])}</td>",
                          f"<td>{tokens_html(d['promotes'])}</td>", f"<td>{tokens_html(d['suppresses'])}</td>"]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        out.append(f"<table>{''.join(rows)}</table></div>")
    return "\n".join(out)


def report(run_dir: Path, out: Path) -> Path:
    """Write out/report.html for the run (harvesting first if needed); return its path."""
    h = harvested(run_dir, out)
    results = run_dir / "results.json"
    body = {"Summary": summary_html(json.loads(results.read_text()) if results.exists() else None, h),
            "Config": f"<details><summary>config.yaml</summary><pre>{escape((run_dir / 'config.yaml').read_text())}"
                      f"</pre></details>"}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    body["Training curves"] = png_tag(curves_png(rows), "training curves") if rows else \
        '<p class="note">no metrics.jsonl</p>'
    pngs = sorted((run_dir / "figures").glob("*.png"))
    body["Figures"] = "".join(f"<figure>{png_tag(p.read_bytes(), p.name)}<figcaption>{escape(p.name)}</figcaption>"
                              f"</figure>" for p in pngs) or '<p class="note">no figures/*.png</p>'
    body["Components"] = components_html(h, load_labels(out))

    title = f"SPD report: {run_dir.resolve()}"
    html = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title><style>{CSS}</style>'
            f"</head><body><h1>{escape(title)}</h1>"
            + "".join(f'<section id="{s.lower().replace(" ", "-")}"><h2>{s}</h2>{body[s]}</section>' for s in SECTIONS)
            + "</body></html>")
    path = out / "report.html"
    path.write_text(html)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a decomposition's run dir (holds config.yaml and checkpoints/)")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default RUN_DIR/analysis)")
    args = ap.parse_args()
    print(report(args.run_dir, args.out or args.run_dir / "analysis"))


if __name__ == "__main__":
    run_main(main)
