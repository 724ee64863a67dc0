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
    head = ("| method | setting | stage-0 mAP | stage-0 rank-1 | best mAP | best rank-1 | best stage | "
            "final clusters | wall time |")
    rows = [head, "|" + "---|" * 9]
    for s in summaries:
        first, best = s["first"], s["best"]
        rows.append(
            f"| {s['method']} | {s.get('setting', '')} | {first.get('mAP', 0):.1%} | "
            f"{first.get('rank1', 0):.1%} | {best.get('mAP', 0):.1%} | {best.get('rank1', 0):.1%} | "
            f"{s['best_stage']} of {len(s['history'])} | {s['final_num_clusters']} | {s['wall_time_s'] / 60:.1f} min |"
        )
    return "\n".join(rows)
