#!/usr/bin/env python
"""Calibration of the synthetic default against real re-ID reference points: one table, old beside new.

    python experiments/calibrate_synthetic.py                 # the current generator, default parameters
    python experiments/calibrate_synthetic.py --old           # ... and the version-1 generator beside it
    python experiments/calibrate_synthetic.py --root DIR      # an existing Market-1501-layout folder
    python experiments/calibrate_synthetic.py --set seed=3 --set camera_strength=0.5

Rows (features and definitions in :mod:`ureid.data.calibration`):

* training split, nearest neighbour of each image among the images of *other* cameras (and, for
  reference, of its own camera): share that is the same person, for the 6-stripe HSV histogram and
  for raw pixels (32x16, mean removed). Real pedestrian data (80 identities of a two-camera set):
  HSV 11% / pixels 3% across cameras (targets: HSV >= 10%, pixels <= 8%);
* test split under the Market-1501 protocol: mAP / rank-1 of the global HSV histogram (the baseline of
  ``experiments/handcrafted_baselines.py``), the 6-stripe variant and pixels (target for the colour
  features: roughly 8-25% mAP; BOW on Market-1501: 14.8%).

``--old`` generates with the generator as of ``--old-rev`` (the last version-1 commit), read from git
into a temporary module, into a temporary folder: nothing under ``data/`` is touched.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

from ureid.data import load_dataset  # noqa: E402
from ureid.data import synthetic  # noqa: E402
from ureid.data.calibration import calibrate  # noqa: E402

OLD_REV = "3e652b6"  # last commit with GENERATOR_VERSION 1
REPO = Path(_here).parent


def _old_module(rev: str):
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:platform/ureid/data/synthetic.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="ureid-synth-old-")) / "synthetic_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("ureid_synthetic_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def measure(gen, kw: dict, tmp: Path, label: str) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    root = gen.generate(tmp / label, **kw)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = calibrate(load_dataset("market1501", root))
    out["version"] = gen.GENERATOR_VERSION
    out["seconds"], out["cpu_seconds"] = secs, cpu
    return out


def table(columns: dict[str, dict]) -> str:
    names = list(columns)
    rows = [("generator version", [str(c.get("version", "-")) for c in columns.values()]),
            ("generation time: wall (CPU of this process)", [f"{c['seconds']:.1f} s ({c['cpu_seconds']:.1f} s)" if "seconds" in c else "-" for c in columns.values()])]
    for feat, label in (("hsv6", "HSV 6-stripe histogram"), ("pixels", "raw pixels 32x16, mean-removed")):
        rows.append((f"train, other-camera NN same id: {label}", [f"{c['train'][feat][1]:.1%}" for c in columns.values()]))
    for feat, label in (("hsv6", "HSV 6-stripe histogram"), ("pixels", "raw pixels 32x16, mean-removed")):
        rows.append((f"train, same-camera NN same id: {label}", [f"{c['train'][feat][0]:.1%}" for c in columns.values()]))
    for feat, label in (("hsv", "HSV histogram (baseline)"), ("hsv6", "HSV 6-stripe histogram"), ("pixels", "raw pixels 32x16")):
        rows.append((f"test (Market protocol) mAP / rank-1: {label}",
                     [f"{c['test'][feat]['mAP']:.1%} / {c['test'][feat]['rank1']:.1%}" for c in columns.values()]))
    head = "| figure | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    lines += [f"| {r} | " + " | ".join(v) + " |" for r, v in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", action="store_true", help="also measure the version-1 generator (from git) beside the current one")
    p.add_argument("--old-rev", default=OLD_REV, help="git revision of the old generator (default %(default)s)")
    p.add_argument("--root", action="append", default=[], help="measure this existing Market-1501-layout folder (repeatable)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="generator keyword for the current generator, KEY=VALUE")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    kw = {k: _value(v) for k, v in (s.split("=", 1) for s in args.sets)}
    columns: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.old:
            columns[f"old default (v1, {args.old_rev})"] = measure(_old_module(args.old_rev), {}, tmp, "old")
        for i, root in enumerate(args.root):
            columns[root] = calibrate(load_dataset("market1501", root))
        if not args.root or args.sets:
            label = "new default" if not kw else "new, " + ", ".join(args.sets)
            columns[f"{label} (v{synthetic.GENERATOR_VERSION})"] = measure(synthetic, kw, tmp, "new")
    print(table(columns))
    if args.json:
        Path(args.json).write_text(json.dumps(columns, indent=1, default=lambda x: x.tolist() if hasattr(x, "tolist") else float(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
