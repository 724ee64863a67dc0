"""Render docs/synthetic_grid.png: six synthetic identities (rows) seen by the different cameras.

Run: ``.venv/bin/python docs/make_grid.py [--seed 0] [--out docs/synthetic_grid.png]``.
It generates a small dataset with :func:`ureid.data.synthetic.generate`, reads it back with the
Market-1501 loader (so the picture shows exactly what training sees) and lays out, for the six
identities seen by the most cameras, one row of images sorted by camera, labelled ``c1``..``c6``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from ureid.data import load_dataset
from ureid.data.synthetic import generate

ROWS, COLS, LABEL_H, PAD = 6, 10, 12, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("synthetic_grid.png")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synth", seed=args.seed, num_train_ids=24, num_test_ids=2, num_distractors=0, num_junk=0)
        ds = load_dataset("market1501", root)
        by_pid = defaultdict(list)
        for r in ds.train:
            by_pid[r.pid].append(r)
        # identities seen by the most cameras first, so the rows show the cross-camera change
        pids = sorted(by_pid, key=lambda p: (-len({r.camid for r in by_pid[p]}), p))[:ROWS]
        w, h = Image.open(ds.train[0].path).size
        grid = Image.new("RGB", (COLS * (w + PAD) + PAD, ROWS * (h + LABEL_H + PAD) + PAD), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for row, pid in enumerate(pids):
            recs = by_pid[pid]
            # round-robin over cameras so every camera of the identity shows up in the row
            per_cam = defaultdict(list)
            for r in sorted(recs, key=lambda r: r.path):
                per_cam[r.camid].append(r)
            chosen = []
            while len(chosen) < min(COLS, len(recs)):
                for cam in sorted(per_cam):
                    if per_cam[cam] and len(chosen) < COLS:
                        chosen.append(per_cam[cam].pop(0))
            for col, r in enumerate(sorted(chosen, key=lambda r: (r.camid, r.path))):
                x, y = PAD + col * (w + PAD), PAD + row * (h + LABEL_H + PAD)
                grid.paste(Image.open(r.path).convert("RGB"), (x, y + LABEL_H))
                draw.text((x + 2, y), f"id{pid} c{r.camid + 1}", fill=(0, 0, 0))
        # a 256-colour palette keeps the PNG small (the JPEG noise makes full-colour PNGs large)
        grid.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
