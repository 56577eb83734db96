"""The study's outputs: the tidy table, the pooled comparison, the sensitivity ranking, the report.

Files in the study folder (docs/studies.md, "The table"):

- ``study.parquet`` (and ``study.csv`` up to 200 000 rows): one row per run, recorded iteration and
  curve, columns ``run_key, model, group, image, seed_index, seed_i, seed_j, seed_k, restart,
  method, iteration, curve, value, z`` (``curve`` is objective, probability, mask_voxels or a
  feature name; ``z`` the z-score, null without a reference or for the first three);
- ``runs.csv``: one row per run with its state (done, failed, interrupted), attempts, message,
  the run's result status, quality flags and folder;
- ``pooled.csv`` / ``pooled.png``: per group (models of one group = training seeds of one network),
  method, curve and iteration: the mean over all its runs, a 95 % t-interval over seed points (each
  seed point averaged over restarts and training seeds) and one over training seeds (each model
  averaged over seed points and restarts);
- ``sensitivity.csv`` (per run and feature, with the run's quality flags) and ``ranking.csv`` /
  ``ranking.md`` (per group; runs with quality flags are left out unless ``keep_flagged: true``);
- ``report.html``: counts, the pooled figure, the ranking, the runs with links to their folders.
"""

from __future__ import annotations

import csv
import html
import math
import warnings
from pathlib import Path

import numpy as np

from ..errors import DeepDreamError

CSV_ROW_LIMIT = 200_000
BASE = ("objective", "probability", "mask_voxels")
COLUMNS = ("run_key", "model", "group", "image", "seed_index", "seed_i", "seed_j", "seed_k", "restart", "method",
           "iteration", "curve", "value", "z")
# two-sided 95 % Student t quantiles by degrees of freedom (1..30); 1.96 beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def require_pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise DeepDreamError("The study table is written as Parquet with pyarrow, which is not installed: "
                             "pip install 'deepdream-analysis[study]'") from None
    return pyarrow


def read_curves(path: Path) -> dict[str, np.ndarray]:
    """A run's curves.csv as columns (empty cells are NaN)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    return {c: np.array([float(r[n]) if r[n] not in ("",) else math.nan for r in body], dtype=float)
            for n, c in enumerate(header)}


def _run_curves(outcome):
    """(run, curves) of every done run, in the study's order."""
    for run in outcome.runs:
        if outcome.status.get(run.key, {}).get("state") != "done":
            continue
        path = outcome.out / "runs" / run.key / "curves.csv"
        if path.is_file():
            yield run, read_curves(path)


def study_table(outcome):
    """The tidy table (a ``pyarrow.Table``) of every done run, iteration and curve."""
    pa = require_pyarrow()
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for run, curves in _run_curves(outcome):
        its = curves["iteration"].astype(int)
        names = [c for c in curves if c != "iteration" and not c.endswith("_z")]
        for name in names:
            vals = curves[name]
            zs = curves.get(f"{name}_z")
            n = len(its)
            cols["run_key"] += [run.key] * n
            cols["model"] += [run.model] * n
            cols["group"] += [run.group] * n
            cols["image"] += [run.image] * n
            cols["seed_index"] += [run.seed_index] * n
            cols["seed_i"] += [run.seed[0]] * n
            cols["seed_j"] += [run.seed[1]] * n
            cols["seed_k"] += [run.seed[2]] * n
            cols["restart"] += [run.restart] * n
            cols["method"] += [run.method] * n
            cols["iteration"] += its.tolist()
            cols["curve"] += [name] * n
            cols["value"] += [None if math.isnan(v) else float(v) for v in vals]
            cols["z"] += [None] * n if zs is None else [None if math.isnan(v) else float(v) for v in zs]
    types = {"seed_index": pa.int32(), "seed_i": pa.int32(), "seed_j": pa.int32(), "seed_k": pa.int32(),
             "restart": pa.int32(), "iteration": pa.int32(), "value": pa.float64(), "z": pa.float64()}
    return pa.table({c: pa.array(v, type=types.get(c, pa.string())) for c, v in cols.items()})


def _t_interval(values: np.ndarray) -> tuple[float, float, int]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan, 0
    if v.size == 1:
        return math.nan, math.nan, 1
    half = (_T95[v.size - 2] if v.size - 1 <= len(_T95) else 1.96) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean() - half), float(v.mean() + half), int(v.size)


def pooled_rows(outcome, use_z: bool) -> list[dict]:
    """The pooled comparison (module docstring) as rows."""
    data: dict[tuple, dict[tuple, tuple[np.ndarray, np.ndarray]]] = {}
    for run, curves in _run_curves(outcome):
        its = curves["iteration"].astype(int)
        for name in curves:
            if name == "iteration" or name.endswith("_z"):
                continue
            vals = curves.get(f"{name}_z") if use_z and name not in BASE and f"{name}_z" in curves else curves[name]
            per_run = data.setdefault((run.group, run.method, name), {})
            per_run[(run.model, run.image, run.seed_index, run.restart)] = (its, np.asarray(vals, dtype=float))
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
        for (group, method, curve), per_run in data.items():
            # one row per run, one column per iteration any run recorded (NaN where a run has none)
            iterations = np.unique(np.concatenate([its for its, _ in per_run.values()]))
            values = np.full((len(per_run), len(iterations)), np.nan)
            for n, (its, vals) in enumerate(per_run.values()):
                values[n, np.searchsorted(iterations, its)] = vals
            keys = list(per_run)
            mean = np.nanmean(values, axis=0)
            by_seed = _group_means(values, [(image, si) for _m, image, si, _r in keys])
            by_model = _group_means(values, [model for model, *_ in keys])
            for col, it in enumerate(iterations.tolist()):
                s_lo, s_hi, n_s = _t_interval(by_seed[:, col])
                m_lo, m_hi, n_m = _t_interval(by_model[:, col])
                rows.append({"group": group, "method": method, "curve": curve, "iteration": it,
                             "mean": float(mean[col]), "seed_points": n_s, "ci_seed_low": s_lo, "ci_seed_high": s_hi,
                             "training_seeds": n_m, "ci_training_low": m_lo, "ci_training_high": m_hi,
                             "kind": "z" if use_z and curve not in BASE else "raw"})
    return rows


def _group_means(values: np.ndarray, labels: list) -> np.ndarray:
    """``[group, iteration]``: the NaN-ignoring mean of the rows of ``values`` with each label (in
    order of first appearance)."""
    groups: dict = {}
    for n, label in enumerate(labels):
        groups.setdefault(label, []).append(n)
    return np.stack([np.nanmean(values[idx], axis=0) for idx in groups.values()])


def _write_csv(path: Path, rows: list[dict], fields=None) -> Path:
    from ..atomic import atomic_path

    fields = list(fields or (rows[0].keys() if rows else []))
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return path


def plot_pooled(rows: list[dict], path: Path, title: str) -> Path:
    """Write :func:`pooled_figure` as a PNG to ``path`` (atomically); returns the path."""
    from ..atomic import atomic_path

    fig = pooled_figure(rows, title)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path


def pooled_figure(rows: list[dict], title: str):
    """One panel per curve (probability first): per group and method the mean, the seed-point interval
    shaded and the training-seed interval dashed; the normal band [-1, 1] grey for z-scores. A
    matplotlib Figure on its own Agg canvas, its panels placed without drawing it."""
    import matplotlib

    from ..outputs import figures

    curves = [c for c in dict.fromkeys(r["curve"] for r in rows) if c not in ("objective", "mask_voxels")]
    curves.sort(key=lambda c: c != "probability")
    lines = list(dict.fromkeys((r["group"], r["method"]) for r in rows))
    ncol = max(1, min(4, len(curves)))
    nrow = max(1, math.ceil(len(curves) / ncol))
    fig = figures.agg_figure(3.4 * ncol, 2.7 * nrow)  # its own Agg canvas: no pyplot, no GUI backend
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, curve in zip(axes.flat, curves):
        sel = [r for r in rows if r["curve"] == curve]
        if sel and sel[0]["kind"] == "z":
            ax.axhspan(-1, 1, color="0.85", zorder=0)
        for n, (g, m) in enumerate(lines):
            rs = sorted((r for r in sel if r["group"] == g and r["method"] == m), key=lambda r: r["iteration"])
            if not rs:
                continue
            x = np.array([r["iteration"] for r in rs])
            y = np.array([r["mean"] for r in rs])
            ok = np.isfinite(y)
            c = colours[n % len(colours)]
            label = g if len({mm for _, mm in lines}) == 1 else f"{g} ({m})"
            ax.plot(x[ok], y[ok], color=c, lw=1.5, label=label)
            lo, hi = np.array([r["ci_seed_low"] for r in rs]), np.array([r["ci_seed_high"] for r in rs])
            band = ok & np.isfinite(lo) & np.isfinite(hi)
            ax.fill_between(x[band], lo[band], hi[band], color=c, alpha=0.22, lw=0)
            tlo, thi = np.array([r["ci_training_low"] for r in rs]), np.array([r["ci_training_high"] for r in rs])
            tb = ok & np.isfinite(tlo)
            if tb.any():
                ax.plot(x[tb], tlo[tb], color=c, lw=0.8, ls="--")
                ax.plot(x[tb], thi[tb], color=c, lw=0.8, ls="--")
        ax.set_title(curve + (" (z)" if sel and sel[0]["kind"] == "z" else ""), fontsize=8)
        ax.set_xlabel("iteration", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    legend_cols = min(6, max(1, len(labels)))
    fig.legend(handles, labels, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    figures.place_suptitle(fig, title + " - mean; shaded: 95% interval over seed points; dashed: over training seeds", 9)
    # margins in inches: tight_layout would draw the whole figure more times just to measure it
    figures.layout_grid(fig, list(axes.flat)[:max(1, len(curves))], nrow, ncol, tick_font=7, title_font=8,
                        xlabel_font=7, suptitle_font=9,
                        legend_rows=figures.legend_rows(len(labels), legend_cols) if labels else 0, legend_font=8)
    return fig


def sensitivity_rows(outcome, use_z: bool):
    """(per-run rows, ranking) of the feature curves (docs/sensitivity.md)."""
    import dataclasses

    from .sensitivity import FIELDS, feature_sensitivity, rank_features

    rows, per_group = [], {}
    keep_flagged = getattr(outcome, "keep_flagged", False)
    for run, curves in _run_curves(outcome):
        its = curves["iteration"]
        flags = outcome.status.get(run.key, {}).get("quality_flags") or []
        for name in curves:
            if name in ("iteration",) + BASE or name.endswith("_z"):
                continue
            z = use_z and f"{name}_z" in curves and np.isfinite(curves[f"{name}_z"]).any()
            s = feature_sensitivity(its, curves[f"{name}_z"] if z else curves[name], name, bool(z))
            rows.append({"run_key": run.key, "model": run.model, "group": run.group, "image": run.image,
                         "seed_index": run.seed_index, "restart": run.restart, "method": run.method,
                         **{k: getattr(s, k) for k in FIELDS}, "quality_flags": " ".join(flags)})
            if flags and not keep_flagged:
                continue  # an untrustworthy dream is not ranked (docs/quality-flags.md)
            label = run.group if len({r.method for r in outcome.runs}) == 1 else f"{run.group} ({run.method})"
            per_group.setdefault(label, []).append(s)
    ranking = [dataclasses.asdict(r) for r in rank_features(per_group)]
    return rows, ranking


def write_study_outputs(spec, outcome):
    """Write every study-level file (module docstring); returns (paths, the tidy table)."""
    import pyarrow.parquet as pq

    from ..atomic import atomic_path, write_text_atomic
    from .sensitivity import RankedFeature, ranking_markdown

    out = outcome.out
    paths: dict[str, Path] = {}
    table = study_table(outcome)
    paths["parquet"] = out / "study.parquet"
    with atomic_path(paths["parquet"], suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    if table.num_rows <= CSV_ROW_LIMIT:
        paths["csv"] = out / "study.csv"
        with atomic_path(paths["csv"], suffix=".csv") as tmp:
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, tmp)
    run_rows = []
    for run in outcome.runs:
        st = outcome.status.get(run.key, {})
        run_rows.append({"run_key": run.key, "model": run.model, "group": run.group, "image": run.image,
                         "seed_index": run.seed_index, "seed": " ".join(map(str, run.seed)), "restart": run.restart,
                         "method": run.method, "state": st.get("state", "pending"), "attempts": st.get("attempts", 0),
                         "result_status": st.get("result_status", ""), "message": st.get("message") or st.get("fault") or "",
                         "quality_flags": " ".join(st.get("quality_flags") or []), "wall_s": st.get("wall_s", ""),
                         "folder": f"runs/{run.key}"})
    paths["runs"] = _write_csv(out / "runs.csv", run_rows)
    use_z = spec.reference is not None
    pooled = pooled_rows(outcome, use_z)
    if pooled:
        paths["pooled"] = _write_csv(out / "pooled.csv", pooled)
        paths["pooled_png"] = plot_pooled(pooled, out / "pooled.png", spec.name)
    sens, ranking = sensitivity_rows(outcome, use_z)
    if sens:
        paths["sensitivity"] = _write_csv(out / "sensitivity.csv", sens)
        paths["ranking"] = _write_csv(out / "ranking.csv", ranking)
        paths["ranking_md"] = out / "ranking.md"
        flagged = len({r["run_key"] for r in sens if r["quality_flags"]})
        note = (f"\n{flagged} run(s) with quality flags are left out of this ranking (docs/quality-flags.md; "
                "`keep_flagged: true` in the study file ranks them).\n") if flagged and not spec.keep_flagged else ""
        text = ranking_markdown([RankedFeature(**r) for r in ranking]) if ranking else "No run could be ranked.\n"
        write_text_atomic(paths["ranking_md"], text + note)
    paths["html"] = out / "report.html"
    write_text_atomic(paths["html"], report_html(spec, run_rows, paths, ranking))
    return paths, table


def report_html(spec, run_rows: list[dict], paths: dict, ranking: list[dict]) -> str:
    """A single self-contained page: counts, the pooled figure (linked), the ranking, the runs."""
    e = html.escape
    states = {}
    for r in run_rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(spec.name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}.failed{background:#fdd}.interrupted{background:#ffd}</style>",
             f"</head><body><h1>Study {e(spec.name)}</h1><p>{len(run_rows)} runs: {e(counts)}. "
             f"{len(spec.models)} models, {len(spec.images)} images, restarts {spec.restarts}, "
             f"methods {e(', '.join(spec.methods))}. Curves are {'z-scores' if spec.reference else 'raw values'}.</p>"]
    if "pooled_png" in paths:
        parts.append("<h2>Pooled comparison</h2><img src='pooled.png' style='max-width:100%'>"
                     "<p>Mean over runs; shaded: 95 % interval over seed points; dashed: over training seeds "
                     "(<a href='pooled.csv'>pooled.csv</a>, the full table: <a href='study.parquet'>study.parquet</a>).</p>")
    if ranking:
        parts.append("<h2>Sensitivity ranking</h2><table><tr><th>group</th><th>rank</th><th>feature</th><th>key</th>"
                     "<th>mean</th><th>std</th><th>runs</th></tr>")
        for r in ranking:
            parts.append(f"<tr><td>{e(str(r['model']))}</td><td>{r['rank']}</td><td>{e(r['feature'])}</td>"
                         f"<td>{e(r['key'])}</td><td>{r['mean']:.3g}</td><td>{r['std']:.3g}</td><td>{r['runs']}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Runs</h2><table><tr><th>run</th><th>model</th><th>image</th><th>seed</th><th>restart</th>"
                 "<th>method</th><th>state</th><th>attempts</th><th>message</th></tr>")
    for r in run_rows:
        link = f"<a href='{e(r['folder'])}/report.html'>{e(r['run_key'])}</a>" if r["state"] == "done" else e(r["run_key"])
        parts.append(f"<tr class='{e(r['state'])}'><td>{link}</td><td>{e(r['model'])}</td><td>{e(r['image'])}</td>"
                     f"<td>{e(r['seed'])}</td><td>{r['restart']}</td><td>{e(r['method'])}</td><td>{e(r['state'])}</td>"
                     f"<td>{r['attempts']}</td><td>{e(str(r['message']))}</td></tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)
