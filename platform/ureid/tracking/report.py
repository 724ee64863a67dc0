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


def _setting(s: dict, keys: tuple[str, ...]) -> str:
    cfg_path = Path(s["run_dir"]) / "config.yaml"
    if not cfg_path.is_file():
        return ""
    import yaml

    block = yaml.safe_load(cfg_path.read_text()).get("clustering", {})
    return ", ".join(f"{k}={block[k]}" for k in keys if k in block)


SETTINGS = {
    "buc": ("merge_percent", "size_penalty"), "camstyle": ("merge_percent", "size_penalty"),
    "dbc": ("merge_percent", "intra_weight", "update"), "pul": ("num_clusters", "threshold", "match"),
    "ssl": ("num_neighbors", "part_weight", "camera_penalty"),
}


def comparison_table(summaries: list[dict]) -> str:
    head = ("| method | setting | stage-0 mAP | stage-0 rank-1 | best mAP | best rank-1 | best stage | "
            "final clusters | wall time |")
    rows = [head, "|" + "---|" * 9]
    for s in summaries:
        first, best = s["first"], s["best"]
        rows.append(
            f"| {s['method']} | {_setting(s, SETTINGS.get(s['method'], ()))} | {first.get('mAP', 0):.1%} | "
            f"{first.get('rank1', 0):.1%} | {best.get('mAP', 0):.1%} | {best.get('rank1', 0):.1%} | "
            f"{s['best_stage']} of {len(s['history'])} | {s['final_num_clusters']} | {s['wall_time_s'] / 60:.1f} min |"
        )
    return "\n".join(rows)
