"""Render docs/synthetic_grid.png: synthetic identities (rows) across cameras and within one camera.

Run: ``.venv/bin/python docs/make_grid.py [--seed 0] [--out docs/synthetic_grid.png]``.
It generates a small dataset with :func:`ureid.data.synthetic.generate` (default nuisances and camera
looks), reads it back with the Market-1501 loader (so the picture shows exactly what training sees) and
lays out, for six identities seen by several cameras, one row: on the left one image per camera
(up to four cameras: the cross-camera change), on the right several images from the identity's busiest camera
(the within-camera change: other walks, framing, posture, occluders, blur).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from ureid.data import load_dataset
from ureid.data.synthetic import generate

ROWS, ACROSS, WITHIN, LABEL_H, PAD, GAP = 6, 4, 6, 12, 2, 14


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("synthetic_grid.png")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synth", seed=args.seed, num_train_ids=40, num_test_ids=2, num_distractors=0, num_junk=0)
        ds = load_dataset("market1501", root)
        by_pid = defaultdict(lambda: defaultdict(list))
        for r in sorted(ds.train, key=lambda r: r.path):
            by_pid[r.pid][r.camid].append(r)

        def busiest(pid):
            return max(by_pid[pid].values(), key=len)

        # several cameras and a busy camera first, so both halves of a row have something to show
        pids = sorted(by_pid, key=lambda p: (-min(len(by_pid[p]), ACROSS), -min(len(busiest(p)), WITHIN), p))[:ROWS]
        w, h = Image.open(ds.train[0].path).size
        cols = ACROSS + WITHIN
        grid = Image.new("RGB", (cols * (w + PAD) + PAD + GAP, LABEL_H + ROWS * (h + LABEL_H + PAD) + PAD), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        draw.text((PAD + 2, 1), "across cameras", fill=(0, 0, 0))
        draw.text((PAD + GAP + ACROSS * (w + PAD) + 2, 1), "within one camera (walks, frames)", fill=(0, 0, 0))
        for row, pid in enumerate(pids):
            y = LABEL_H + PAD + row * (h + LABEL_H + PAD)
            across = [recs[len(recs) // 2] for cam, recs in sorted(by_pid[pid].items())][:ACROSS]
            within = busiest(pid)[:WITHIN]
            for col, r in enumerate(across):
                x = PAD + col * (w + PAD)
                grid.paste(Image.open(r.path).convert("RGB"), (x, y + LABEL_H))
                draw.text((x + 2, y), f"id{pid} c{r.camid + 1}", fill=(0, 0, 0))
            for col, r in enumerate(within):
                x = PAD + GAP + (ACROSS + col) * (w + PAD)
                grid.paste(Image.open(r.path).convert("RGB"), (x, y + LABEL_H))
                draw.text((x + 2, y), f"id{pid} c{r.camid + 1}", fill=(0, 0, 0))
        # a 256-colour palette keeps the PNG small (the JPEG noise makes full-colour PNGs large)
        grid.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
