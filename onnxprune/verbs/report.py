"""A self-contained HTML report of scores, a plan and a sweep, with SVG plots (matplotlib: onnxprune[report]).

Plots, depending on what is given:
- SR-init scores: the drop of each block when re-initialised, as bars with their standard error, the
  threshold as a line and the blocks a plan removes in another colour (like SR-init's figure);
- layer scores (capacity, sensitivity, compactness): each layer's importance, and with a plan the sparsity
  it allocated to each layer;
- a sweep: top-1 against sparsity for each allocation method, with the dense model as a line.
Everything is inline (SVG text, CSS): the file opens anywhere, offline.
"""

from __future__ import annotations

import html
import io
import os
from pathlib import Path

from onnxprune._version import __version__
from onnxprune.artefacts import Plan, Scores
from onnxprune.errors import InputError

__all__ = ["CSS", "build_report", "layers_figure", "srinit_figure", "sweep_figure", "write_report"]

REMOVED, KEPT, LINE = "#d9534f", "#4a78b0", "#333333"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError(f"report needs matplotlib ({exc}); install it with: pip install 'onnxprune[report]'") from exc
    plt.rcParams.update({"svg.fonttype": "path", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "onnxprune"})  # same input, same SVG
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    fig.clf()
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline SVG in HTML


def srinit_figure(scores: Scores, plan: Plan | None = None) -> str:
    plt = _pyplot()
    units = scores.units
    removed = {b["name"] for b in plan.blocks} if plan is not None else set()
    threshold = (plan.options.get("rule") or {}).get("threshold") if plan is not None else None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(units) + 2), 3.4))
    x = list(range(len(units)))
    colors = [REMOVED if u["name"] in removed else KEPT for u in units]
    ax.bar(x, [u["drop"] or 0 for u in units], yerr=[u.get("drop_se") or 0 for u in units], color=colors,
           error_kw={"elinewidth": 0.8, "ecolor": LINE})
    if threshold is not None:
        ax.axhline(threshold, color=LINE, linestyle="--", linewidth=1)
        ax.text(len(units) - 0.5, threshold, f" threshold {threshold:g}", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in x], fontsize=7)
    ax.set_xlabel(f"{scores.unit_kind[:-1]} (graph order)" + ("; red: removed by the plan" if removed else ""))
    influence = scores.method == "influence"
    ax.set_ylabel("influence (1 - cosine)" if influence else f"{scores.metric} drop when re-initialised")
    ax.set_title(f"{'Block influence' if influence else 'SR-init'}: {len(units)} {scores.unit_kind}, "
                 f"{scores.options.get('samples', '?')} samples")
    return _svg(fig)


def layers_figure(scores: Scores | None, plan: Plan | None) -> str:
    plt = _pyplot()
    names = [u["name"] for u in scores.units] if scores is not None else [e["name"] for e in plan.layers]
    rows = 2 if (scores is not None and plan is not None and plan.layers) else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 0.16 * len(names) + 2), 2.6 * rows), sharex=True,
                             squeeze=False)
    x = list(range(len(names)))
    k = 0
    if scores is not None:
        ax = axes[k][0]
        ax.bar(x, [u.get("importance", 0.0) for u in scores.units], color=KEPT)
        ax.set_ylabel("importance")
        ax.set_title(f"{scores.method} scores" + (f" ({scores.metric})" if scores.metric else ""))
        k += 1
    if plan is not None and plan.layers:
        ax = axes[k][0]
        by_name = {e["name"]: e for e in plan.layers}
        ax.bar(x, [by_name.get(n, {}).get("sparsity", 0.0) for n in names], color=REMOVED)
        ax.set_ylim(0, 1)
        ax.set_ylabel("allocated sparsity")
        ax.set_title(f"plan: {plan.method}, {plan.granularity}, budget {plan.budget}")
    axes[-1][0].set_xlabel("layer (graph order)")
    axes[-1][0].set_xticks(x[:: max(1, -(-len(x) // 20))])
    return _svg(fig)


def sweep_figure(sweep) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    metric = sweep.metric
    methods = list(dict.fromkeys(r["method"] for r in sweep.rows))
    for method in methods:
        pts = sorted((r["sparsity"], r[metric]) for r in sweep.rows if r["method"] == method and r.get(metric) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if sweep.dense.get(metric) is not None:
        ax.axhline(sweep.dense[metric], color=LINE, linestyle="--", linewidth=1, label="dense")
    what = "sparsity (fraction of weights zeroed)" if sweep.granularity == "unstructured" else \
        f"fraction of {sweep.budget} removed (channels)"
    ax.set_xlabel(what)
    ax.set_ylabel(sweep.metric_label)
    quality = "accuracy" if metric == "top1" else "output error"
    ax.set_title(f"one-shot {quality} against sparsity ({sweep.dense.get('samples', '?')} samples)")
    ax.legend(frameon=False)
    return _svg(fig)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}figure{margin:1em 0;overflow-x:auto}
table{border-collapse:collapse;font-size:.9em}td,th{border-bottom:1px solid #ddd;padding:.25em .8em;text-align:right}
td:first-child,th:first-child{text-align:left}.meta{color:#666;font-size:.85em}"""


def build_report(scores: Scores | None = None, plan: Plan | None = None, sweep=None, title: str | None = None) -> str:
    """The report as one HTML string (plots as inline SVG)."""
    if scores is None and plan is None and sweep is None:
        raise InputError("report needs at least one of --scores, --plan, --sweep")
    fps = {a.fingerprint for a in (scores, plan, sweep) if a is not None}
    if len(fps) > 1:
        raise InputError("the scores, plan and sweep were made for different models (fingerprints differ); "
                         "give artefacts of one model")
    parts = [f"<h1>{html.escape(title or 'onnxprune report')}</h1>",
             f"<p class='meta'>model fingerprint {html.escape(next(iter(fps)))} &middot; onnxprune {__version__}</p>"]
    if scores is not None:
        parts.append(f"<h2>Scores: {html.escape(scores.method)}</h2>")
        if scores.method in ("srinit", "influence"):
            parts.append(f"<figure id='srinit'>{srinit_figure(scores, plan)}</figure>")
            parts.append(_table(["#", scores.unit_kind[:-1], "params", "drop", "s.e.", "removed"],
                                [[str(i), u["name"], f"{u.get('params', 0):,}",
                                  "unscored" if u["drop"] is None else f"{u['drop']:.3f}",
                                  f"{u.get('drop_se') or 0:.3f}",
                                  "yes" if plan is not None and u["name"] in {b["name"] for b in plan.blocks} else ""]
                                 for i, u in enumerate(scores.units)]))
        else:
            parts.append(f"<figure id='layers'>{layers_figure(scores, plan)}</figure>")
    if plan is not None:
        parts.append(f"<h2>Plan: {html.escape(plan.method)} ({html.escape(plan.granularity)})</h2>")
        if plan.layers and scores is None:
            parts.append(f"<figure id='layers'>{layers_figure(None, plan)}</figure>")
        parts.append(_table(["total", "value"], [[k, f"{v:.4f}" if isinstance(v, float) else str(v)]
                                                 for k, v in plan.totals.items() if not isinstance(v, dict | list)]))
    if sweep is not None:
        metric = sweep.metric
        parts.append(f"<h2>Sweep: {html.escape(sweep.metric_label)} against sparsity</h2>")
        parts.append(f"<figure id='sweep'>{sweep_figure(sweep)}</figure>")
        targets = sorted({r["sparsity"] for r in sweep.rows})
        methods = list(dict.fromkeys(r["method"] for r in sweep.rows))
        cell = {(r["method"], r["sparsity"]): r for r in sweep.rows}
        parts.append(_table(["method", *[f"{s:g}" for s in targets]],
                            [[m, *["-" if cell.get((m, s), {}).get(metric) is None else
                                   f"{cell[(m, s)][metric]:.2f}" for s in targets]] for m in methods]))
        dense = (f"dense top-1 {sweep.dense['top1']:.2f} %" if metric == "top1" else
                 "no labels: output error of each pruned model against the dense model")
        parts.append(f"<p class='meta'>{dense} on {sweep.dense.get('samples', '?')} samples of "
                     f"{html.escape(str(sweep.data.get('data')))}</p>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title or 'onnxprune report')}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def write_report(output: str | os.PathLike, scores: Scores | None = None, plan: Plan | None = None, sweep=None,
                 title: str | None = None) -> Path:
    """Write the report atomically to ``output``."""
    from onnxprune.io import check_output_path, write_text

    out = Path(output)
    check_output_path(out, forceable=False)
    return write_text(out, build_report(scores, plan, sweep, title))
