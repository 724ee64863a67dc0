"""The method comparison report: one markdown row per run, from the runs' ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path


def load_summaries(paths: list[str | Path]) -> list[dict]:
    """Run folders, or folders holding run folders (e.g. an ``output_dir``), or summary.json files."""
    found = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / "summary.json").is_file():
            found.append(p / "summary.json")
        else:
            found += sorted(p.glob("*/summary.json"))
    if not found:
        raise FileNotFoundError(f"no summary.json under {[str(p) for p in paths]}: is the run finished?")
    return [json.loads(f.read_text()) for f in found]


def comparison_table(summaries: list[dict]) -> str:
    """One row per run: stage 0, the stage kept by the run's label-free criterion, and the oracle (test-set mAP)."""
    head = ("| method | setting | stage-0 mAP | stage-0 rank-1 | selected (how) | selected mAP | selected rank-1 | "
            "oracle-best mAP (stage) | final clusters | wall time |")
    rows = [head, "|" + "---|" * 10]
    for s in summaries:
        first, chosen, oracle = s["first"], s["selected"], s["oracle"]
        rows.append(
            f"| {s['method']} | {s.get('setting', '')} | {first.get('mAP', 0):.1%} | {first.get('rank1', 0):.1%} | "
            f"{s['selected_stage']} of {len(s['history'])} ({s['selection']}) | {chosen.get('mAP', 0):.1%} | "
            f"{chosen.get('rank1', 0):.1%} | {oracle.get('mAP', 0):.1%} ({s['oracle_stage']}) | "
            f"{s['final_num_clusters']} | {s['wall_time_s'] / 60:.1f} min |"
        )
    return "\n".join(rows)
