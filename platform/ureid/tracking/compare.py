"""The comparison of methods, read from MLflow: per dataset a Markdown and a CSV table and PNG plots
(mAP and cluster count per stage for every run on one axis; for a sweep, each swept parameter against
the objective), logged as the artifacts of a comparison run. A dataset without test labels (an unlabeled
folder) gets the label-free score in place of mAP, in the table and the per-stage plot.

Every row shows the stage the run's own criterion selected (label-free, validation or last) and, beside
it, the oracle-best stage by test-set mAP, which an unsupervised user could not have picked.
"""

from __future__ import annotations

import collections
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DEFAULT_SCORE, LABEL_FREE_SCORES
from . import _client, all_runs, finish_run, log_artifacts, start_run

SCORE_DIRECTION = {k: 1 if higher else -1 for k, higher in LABEL_FREE_SCORES.items()}  # +1: higher is better
STAGE_KEYS = ("mAP", "rank1", "rank5", "rank10", "rerank_mAP", "num_clusters", "stage_time_s", *SCORE_DIRECTION)


@dataclass
class RunRecord:
    run_id: str
    name: str
    method: str
    dataset: str
    status: str
    setting: str
    selection: str
    params: dict
    summary: dict
    stages: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> stage -> value
    parent: str | None = None


def _check_store_exists(uri: str) -> None:
    """A SQLite store that is not there is an error, not a new empty store: MLflow would create the file (and
    its tables) at a mistyped path and report no experiment."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow store at {path} (a run writes <output_dir>/mlflow.db, runs/mlflow.db "
                                    f"by default; --tracking-uri or $MLFLOW_TRACKING_URI names another)")


def _not_comparable(run) -> str | None:
    """Why ``run`` is not one of the method runs a comparison reads (a sweep or comparison run, a run of
    something else, an unfinished run), or None."""
    kind = run.data.tags.get("ureid.kind")
    if kind in ("sweep", "comparison") or "method" not in run.data.tags:
        children = "; its trials are its child runs" if kind == "sweep" else ""
        return f"a {kind or 'non-ureid'} run, not a method's{children}"
    if run.info.status not in ("FINISHED", "KILLED"):
        return f"{run.info.status}, not finished"
    if not any(key in run.data.metrics for key in ("stages_done", *STAGE_KEYS)):
        return f"{run.info.status} before its first stage"  # an ASHA stop that came first: a row of blanks
    return None


def _what_is_there(uri: str, experiment: str | None) -> str:
    """' (N runs there: ...)', why each run of the experiment is not compared, when it has any."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment or "ureid")
    runs = all_runs(client, [exp.experiment_id]) if exp is not None else []
    if not runs:
        return ""
    why = collections.Counter(_not_comparable(run) for run in runs)
    return f" ({len(runs)} run{'s' * (len(runs) > 1)} there: " \
        + "; ".join(f"{count} {reason}" for reason, count in sorted(why.items())) + ")"


def _named_runs(client, uri: str, run_ids: list[str]) -> list:
    """The runs ``--runs`` names, each a finished (or ASHA-stopped) method run: an id that is not there, or
    names a sweep, a comparison or an unfinished run, is an error naming it (not a traceback, not a silent
    skip)."""
    from mlflow.exceptions import MlflowException

    runs, wrong = [], []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            wrong.append(f"{run_id} (no such run)")
            continue
        if why := _not_comparable(run):
            wrong.append(f"{run_id} ({why})")
        else:
            runs.append(run)
    if wrong:
        raise ValueError(f"--runs at {uri}: {'; '.join(wrong)}")
    return runs


def collect(uri: str, experiment: str | None = None, run_ids: list[str] | None = None) -> list[RunRecord]:
    """The finished method runs of ``experiment`` (or the given run ids), with their per-stage metrics."""
    _check_store_exists(uri)
    client = _client(uri)
    if run_ids:
        runs = _named_runs(client, uri, run_ids)
    else:
        name = experiment or "ureid"
        exp = client.get_experiment_by_name(name)
        if exp is None:
            there = sorted(e.name for e in client.search_experiments() if e.name != "Default")
            raise FileNotFoundError(f"no MLflow experiment {name!r} at {uri} (experiments there: "
                                    f"{', '.join(map(repr, there)) or 'none'}; --experiment picks one)")
        runs = all_runs(client, [exp.experiment_id])
    records = []
    for run in runs:
        if _not_comparable(run):
            continue
        tags = run.data.tags
        rec = RunRecord(run.info.run_id, run.info.run_name, tags["method"], tags.get("dataset", "?"), run.info.status,
                        tags.get("ureid.setting", ""), tags.get("ureid.selection", ""), run.data.params,
                        dict(run.data.metrics), parent=tags.get("mlflow.parentRunId"))
        for key in STAGE_KEYS:
            rec.stages[key] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        records.append(rec)
    return records


def _pct(v) -> str:
    return "" if v is None else f"{v:.1%}"


def label_free_pick(r: RunRecord, score: str) -> int | None:
    """The stage ``score`` selects among a run's stages (ties: the earlier one, as runtime/selection.py)."""
    sign = SCORE_DIRECTION[score]
    scored = r.stages.get("mAP") or r.stages.get(score, {})  # the stages with mAP; every stage without test labels
    pts = [(st, sign * v) for st, v in r.stages.get(score, {}).items() if st in scored]
    return max(pts, key=lambda p: (p[1], -p[0]))[0] if pts else None


def rows(records: list[RunRecord], score: str = DEFAULT_SCORE) -> list[dict]:
    """One row per run: its own selection, the stage ``score`` picks (shown for every run, whatever it kept),
    the oracle beside them."""
    out = []
    for r in records:
        pick = label_free_pick(r, score)
        m, s = r.stages.get("mAP", {}), r.summary
        selected = s.get("selected_at_stage")
        oracle = s.get("oracle_at_stage")
        times = r.stages.get("stage_time_s", {})
        clusters = r.stages.get("num_clusters", {})
        out.append({
            "method": r.method, "dataset": r.dataset, "run": r.name, "status": r.status, "setting": r.setting,
            "selected_stage": "" if selected is None else int(selected), "selected_by": r.selection,
            "selected_mAP": s.get("selected_mAP"), "selected_rank1": s.get("selected_rank1"),
            "selected_rank5": s.get("selected_rank5"), "selected_rank10": s.get("selected_rank10"),
            "selected_rerank_mAP": r.stages.get("rerank_mAP", {}).get(selected),  # train.eval_rerank runs only
            "label_free_score": score, "label_free_stage": "" if pick is None else pick,
            "label_free_mAP": m.get(pick), "label_free_rank1": r.stages.get("rank1", {}).get(pick),
            "oracle_stage": "" if oracle is None or not m else int(oracle), "oracle_mAP": s.get("best_mAP"),
            "stage0_mAP": m.get(0), "stages": len(m) or len(clusters),
            "label_free_at_selected": r.stages.get(score, {}).get(selected),
            "final_clusters": int(clusters[max(clusters)]) if clusters else "",
            "wall_time_min": (s["wall_time_s"] / 60) if "wall_time_s" in s else sum(times.values()) / 60,
        })
    return out


def markdown(table: list[dict]) -> str:
    score = table[0]["label_free_score"] if table else ""
    if not any(r["stage0_mAP"] is not None or r["selected_mAP"] is not None for r in table):
        return markdown_unlabeled(table)
    reranked = any(r["selected_rerank_mAP"] is not None for r in table)  # a column only where some run has it
    head = ["method", "setting", "selected (how)", "mAP", "rank-1", "rank-5", "rank-10",
            *(["re-ranked mAP"] if reranked else []),
            f"{score} pick: mAP / rank-1 (stage)", "oracle-best mAP (stage)", "stage-0 mAP", "final clusters", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join([
            r["method"], r["setting"], f"{r['selected_stage']} of {r['stages']} ({r['selected_by']})",
            _pct(r["selected_mAP"]), _pct(r["selected_rank1"]), _pct(r["selected_rank5"]), _pct(r["selected_rank10"]),
            *([_pct(r["selected_rerank_mAP"])] if reranked else []),
            f"{_pct(r['label_free_mAP'])} / {_pct(r['label_free_rank1'])} ({r['label_free_stage']})",
            f"{_pct(r['oracle_mAP'])} ({r['oracle_stage']})", _pct(r["stage0_mAP"]), str(r["final_clusters"]),
            f"{r['wall_time_min']:.1f} min"]) + " |")
    return "\n".join(lines)


def markdown_unlabeled(table: list[dict]) -> str:
    """The table of a dataset without test labels (an unlabeled folder): no mAP, so the label-free score at the
    stage each run kept and the stage the score itself picks."""
    score = table[0]["label_free_score"] if table else ""
    head = ["method", "setting", "selected (how)", f"{score} there", f"{score} pick (stage)", "final clusters",
            "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        value = "" if r["label_free_at_selected"] is None else f"{r['label_free_at_selected']:.4f}"
        lines.append("| " + " | ".join([
            r["method"], r["setting"], f"{r['selected_stage']} of {r['stages']} ({r['selected_by']})", value,
            str(r["label_free_stage"]), str(r["final_clusters"]), f"{r['wall_time_min']:.1f} min"]) + " |")
    return "\n".join(lines)


def score_rows(records: list[RunRecord]) -> list[dict]:
    """How well each label-free score ranks stages by test-set mAP, over every stage of every run (a sweep's
    trials included): Spearman and Kendall pooled over all (run, stage) points, the mean Spearman within a run
    (the ranking a run's own selection uses), and the mean mAP of the stage each score would select per run,
    beside the last stage and the oracle. Scores are signed so that +1 is a perfect ranking."""
    from ..evaluation.label_free import kendall, spearman

    runs = [r for r in records if len(r.stages.get("mAP", {})) >= 2]
    out = []
    for score, sign in SCORE_DIRECTION.items():
        xs, ys, within, picked = [], [], [], []
        for r in runs:
            pts = sorted((st, sign * v, r.stages["mAP"][st]) for st, v in r.stages.get(score, {}).items()
                         if st in r.stages["mAP"])
            if not pts:
                continue
            xs += [p[1] for p in pts]
            ys += [p[2] for p in pts]
            if len(pts) >= 3:
                within.append(spearman([p[1] for p in pts], [p[2] for p in pts]))
            picked.append(r.stages["mAP"][label_free_pick(r, score)])
        if len(xs) < 3:
            continue
        out.append({"score": score, "points": len(xs), "runs": len(picked), "spearman": spearman(xs, ys),
                    "kendall": kendall(xs, ys), "mean_within_run_spearman": float(np.nanmean(within)) if within else None,
                    "mean_selected_mAP": float(np.mean(picked))})
    if out:
        last = [r.stages["mAP"][max(r.stages["mAP"])] for r in runs]
        best = [max(r.stages["mAP"].values()) for r in runs]
        out.append({"score": "last (no selection)", "points": "", "runs": len(last), "spearman": None,
                    "kendall": None, "mean_within_run_spearman": None, "mean_selected_mAP": float(np.mean(last))})
        out.append({"score": "oracle_map (test labels)", "points": "", "runs": len(best), "spearman": None,
                    "kendall": None, "mean_within_run_spearman": None, "mean_selected_mAP": float(np.mean(best))})
    return out


def score_markdown(table: list[dict]) -> str:
    def f(v):
        return "" if v is None or v == "" else f"{v:+.2f}"

    lines = ["| score | stages (runs) | Spearman vs mAP | Kendall vs mAP | mean within-run Spearman | "
             "mean mAP of the stage it selects |", "|---|---|---|---|---|---|"]
    for r in table:
        pts = f"{r['points']} ({r['runs']})" if r["points"] != "" else f"({r['runs']})"
        lines.append(f"| {r['score']} | {pts} | {f(r['spearman'])} | {f(r['kendall'])} | "
                     f"{f(r['mean_within_run_spearman'])} | {_pct(r['mean_selected_mAP'])} |")
    return "\n".join(lines)


def _plot_stages(records: list[RunRecord], key: str, ylabel: str, path: Path, percent: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    # a marker and a line style per run, drawn smaller each time: runs with the same values (BUC and DBC's
    # first stages, say) stay visible one over the other instead of the later one hiding the earlier
    markers, styles = "osD^vP*X", ["-", "--", "-.", ":"]
    for i, r in enumerate(records):
        series = sorted(r.stages.get(key, {}).items())
        if series:
            ax.plot([s for s, _ in series], [100 * v if percent else v for _, v in series],
                    marker=markers[i % len(markers)], linestyle=styles[i // len(markers) % len(styles)],
                    markersize=max(2.0, 7.0 - 0.6 * i),
                    label=f"{r.method} ({r.name})" if len(records) > 8 else r.method)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # stages are whole numbers
    ax.set_xlabel("stage")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per stage, {records[0].dataset}" if records else ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _axis_positions(listed: list, values: list[str]) -> dict:
    """Where each logged parameter value (MLflow keeps them as text) sits on a sweep plot's x axis: the number
    itself when every value is one; otherwise each value at 0, 1, ... in the order of the space's list, then
    in order of appearance (a choice of words, e.g. DBC's ``update``: ``float('stage')`` failed the plot and
    with it ``ureid compare`` of any experiment holding such a sweep)."""
    try:
        return {v: float(v) for v in values}
    except ValueError:
        order = list(dict.fromkeys([str(v) for v in listed] + values))
        return {v: i for i, v in enumerate(order) if v in values}


def sweep_plot(uri: str, parent_run_id: str, path: Path) -> Path | None:
    """Each swept parameter against the sweep's objective (one panel a parameter, one point a trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = _client(uri)
    parent = client.get_run(parent_run_id)
    space = json.loads(parent.data.params.get("space", "{}"))
    objective = parent.data.params.get("objective", "").split(" ")[0]
    children = all_runs(client, [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    if not space or not children:
        return None
    fig, axes = plt.subplots(1, len(space), figsize=(4 * len(space), 3.5), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], space):
        kind, args = next(iter(space[key].items()))
        shown = [(c.data.params[key], y, c.data.tags.get("ureid.early_stopped") == "true") for c in children
                 if (y := c.data.metrics.get(f"selected_{objective}")) is not None and key in c.data.params]
        at = _axis_positions(args if kind in ("choice", "grid") else [], [value for value, _, _ in shown])
        for value, y, stopped in shown:
            ax.scatter(at[value], y, marker="x" if stopped else "o", color="tab:red" if stopped else "tab:blue")
        if not all(isinstance(x, float) for x in at.values()):  # words (DBC's update): one tick each
            ax.set_xticks(list(at.values()), list(at))
            ax.set_xlim(-0.5, max(at.values()) + 0.5)
        elif kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"selected {objective}")
    fig.suptitle("sweep: o finished, x stopped by ASHA")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def compare(uri: str, out_dir: str | Path, experiment: str | None = None, run_ids: list[str] | None = None,
            log: bool = True, score: str = DEFAULT_SCORE) -> dict[str, list[Path]]:
    """Write the tables and plots per dataset into ``out_dir``; log them as a comparison run; return the files."""
    records = collect(uri, experiment, run_ids)
    if not records:
        raise FileNotFoundError(f"no finished ureid runs in experiment {experiment or 'ureid'!r} at {uri}"
                                f"{_what_is_there(uri, experiment)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    files: dict[str, list[Path]] = {}
    for dataset in sorted({r.dataset for r in records}):
        subset = sorted((r for r in records if r.dataset == dataset), key=lambda r: (r.method, r.name))
        table = rows(subset, score)
        md = out_dir / f"compare_{dataset}.md"
        md.write_text(markdown(table) + "\n")
        csv_path = out_dir / f"compare_{dataset}.csv"
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        scores = score_rows(subset)
        if scores:
            score_md = out_dir / f"scores_{dataset}.md"
            score_md.write_text(score_markdown(scores) + "\n")
            files.setdefault(f"{dataset} label-free scores", []).append(score_md)
        if any(r.stages.get("mAP") for r in subset):
            per_stage = _plot_stages(subset, "mAP", "mAP (%)", out_dir / f"map_per_stage_{dataset}.png", True)
        else:  # no test labels: the label-free score the table shows, per stage
            per_stage = _plot_stages(subset, score, score, out_dir / f"{score}_per_stage_{dataset}.png", False)
        files[dataset] = [md, csv_path, per_stage,
                          _plot_stages(subset, "num_clusters", "clusters", out_dir / f"clusters_per_stage_{dataset}.png", False)]
    client = _client(uri)
    if experiment is not None or not run_ids:
        exp = client.get_experiment_by_name(experiment or "ureid")
        parents = all_runs(client, [exp.experiment_id], "tags.`ureid.kind` = 'sweep'") if exp else []
        for p in parents:
            # a run name is anything MLflow took (a sweep --name once could hold a '/'): one file in out_dir
            safe = re.sub(r"[^\w.-]", "_", p.info.run_name or p.info.run_id)
            plot = sweep_plot(uri, p.info.run_id, out_dir / f"sweep_{safe}.png")
            if plot:
                files.setdefault("sweeps", []).append(plot)
    if log:
        run_id = start_run(uri, experiment or "ureid", "comparison", {"runs": len(records)},
                           {"ureid.kind": "comparison"})
        log_artifacts(uri, run_id, {"comparison": out_dir})
        finish_run(uri, run_id)
    return files
