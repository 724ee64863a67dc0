#!/usr/bin/env python
"""Reference points of a dataset for a backbone and budget: the floor (the backbone from random
initialisation, no training), the start (the configured weights, e.g. ImageNet, no training; the same as
the floor when ``model.weights`` is ``none``) and the ceiling (the configured start trained *with* identity
labels, softmax classifier, for the given epochs). Unsupervised results sit between start and ceiling.

    python experiments/reference_points.py                     # CPU preset, synthetic default
    python experiments/reference_points.py --config experiments/configs/buc.yaml --epochs 60
"""

import argparse
import json
import os
import sys
import time

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ureid.config import CONFIG_DIR, load_config  # noqa: E402
from ureid.data.run_data import load_split_dataset  # noqa: E402
from ureid.engine.datasets import make_loader  # noqa: E402
from ureid.engine.evaluate import evaluate_model  # noqa: E402
from ureid.engine.seeding import seed_everything  # noqa: E402
from ureid.engine.train import build_optimizer, forward_batch, step_lr, train_epoch  # noqa: E402
from ureid.models.backbone import ReidNet  # noqa: E402
from ureid.methods import labeled_dataset  # noqa: E402
from ureid.models.losses import ClassifierHead  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG_DIR / "buc_cpu.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--epochs", type=int, default=15,
                   help="supervised epochs for the ceiling; 0: only the features of the configured weights")
    p.add_argument("--lr", type=float, default=None, help="default: the config's train.lr")
    p.add_argument("--color-jitter", type=float, default=None, help="default: the config's data.color_jitter")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads; on a shared machine 1 can be several times faster than oversubscribing")
    p.add_argument("--json", help="write the two reference points here")
    args = p.parse_args(argv)
    if args.epochs < 0:
        p.error(f"--epochs must be >= 0, got {args.epochs}")
    cfg = load_config(args.config, args.overrides)
    lr = cfg.train.lr if args.lr is None else args.lr
    if args.color_jitter is not None:
        cfg.data.color_jitter = args.color_jitter
    torch.set_num_threads(args.threads)
    ds = load_split_dataset(cfg.data)
    t0 = time.perf_counter()
    if cfg.model.weights != "none":
        seed_everything(cfg.seed)
        random_init = ReidNet.from_config(cfg.model.model_copy(update={"weights": "none"}), embedding_dim=0)
        floor = evaluate_model(random_init, ds.query, ds.gallery, "cpu", **cfg.extract_options())
        del random_init
        print(f"floor   (untrained {cfg.model.arch}, random initialisation): mAP {floor['mAP']:.1%} "
              f"rank-1 {floor['rank1']:.1%}", flush=True)
    seed_everything(cfg.seed)
    model = ReidNet.from_config(cfg.model, embedding_dim=0)
    start = evaluate_model(model, ds.query, ds.gallery, "cpu", **cfg.extract_options())
    if cfg.model.weights == "none":
        floor = start
        print(f"floor   (untrained {cfg.model.arch}, random initialisation): mAP {floor['mAP']:.1%} "
              f"rank-1 {floor['rank1']:.1%}", flush=True)
    else:
        print(f"start   ({cfg.model.arch}, weights={cfg.model.weights}, no training): mAP {start['mAP']:.1%} "
              f"rank-1 {start['rank1']:.1%}", flush=True)

    def dump(ceiling):
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"floor": floor, "start": start, "ceiling": ceiling, "epochs": args.epochs,
                           "arch": cfg.model.arch, "weights": cfg.model.weights,
                           "size": [cfg.data.height, cfg.data.width], "config": args.config,
                           "overrides": args.overrides}, f, indent=1)

    if args.epochs == 0:  # nothing trained: floor and start are the references
        dump(None)
        return 0

    train = [r for r in ds.train if r.pid >= 0]
    _, labels = np.unique([r.pid for r in train], return_inverse=True)

    # A tracklet is one sample: seq_len ordered frames per draw, as in training.
    data = labeled_dataset(cfg, train, labels, train=True)
    head = ClassifierHead(model.feature_dim, int(labels.max()) + 1, dropout=cfg.model.dropout)
    opt = build_optimizer(model, head, lr, cfg.train.backbone_lr_mult, cfg.train.momentum,
                          cfg.train.weight_decay, cfg.train.nesterov)
    for epoch in range(args.epochs):
        step_lr(opt, epoch, lr, max(1, int(args.epochs * 0.75)))
        loader = make_loader(data, cfg.train.batch_size, True, cfg.seed, epoch, cfg.data.num_workers, drop_last=True)
        out = train_epoch(model, head, loader, opt, epoch=epoch)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            ceil = evaluate_model(model, ds.query, ds.gallery, "cpu", **cfg.extract_options())
            print(f"  supervised epoch {epoch + 1}: loss {out['loss']:.3f} mAP {ceil['mAP']:.1%} "
                  f"rank-1 {ceil['rank1']:.1%}", flush=True)
    # Train-set accuracy (test transform, eval mode): tells under-fitting from a failure to transfer.
    plain = labeled_dataset(cfg, train, labels, train=False)
    model.eval()
    head.eval()
    with torch.no_grad():
        hits = sum(int((head.logits(forward_batch(model, x)).argmax(1) == y).sum()) for x, y, *_ in make_loader(plain, 128, False))
    print(f"train accuracy {hits / len(plain):.1%} (last epoch loss {out['loss']:.3f})")
    print(f"ceiling (supervised, {args.epochs} epochs): mAP {ceil['mAP']:.1%} rank-1 {ceil['rank1']:.1%} "
          f"({time.perf_counter() - t0:.0f} s)")
    dump(ceil)
    return 0


if __name__ == "__main__":
    sys.exit(main())
