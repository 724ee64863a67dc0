#!/usr/bin/env python
"""How good are the camera-style fakes? Without FID (its Inception weights would be a download):

1. camera: a small CNN trained on the real training images (a held-out fifth of them gives its real-image
   accuracy) assigns each fake to a camera; accuracy towards the fake's *target* camera and the confusion
   matrix (rows: target camera, columns: predicted), beside chance 1/L;
2. identity: re-ID features from the ImageNet MobileNetV2 (no re-ID training, so no feature was fitted to the
   fakes), every image at 64x32: how often a fake is nearer its own source image than every image of other
   identities, and - the synthetic generator knows who is who - how often the nearest real image *in the target
   camera* is the same identity, against the source image itself used as the query (no transfer);
3. cycle: ``|x - G(G(x, c'), c)|`` (L1, pixels 0-255) with c' each other camera, and ``|x - G(x, c)|``.

Compares the StarGAN of a camstyle config with the colour-statistics stand-in when its folder exists:

    python experiments/camstyle_fakes.py                               # camstyle_cpu.yaml's StarGAN
    python experiments/camstyle_fakes.py --json docs/camstyle_fakes.json
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
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ureid.config import CONFIG_DIR, load_config  # noqa: E402
from ureid.data.camstyle import default_fake_folder, load_fakes  # noqa: E402
from ureid.data.run_data import load_split_dataset  # noqa: E402
from ureid.engine.stargan import load_image  # noqa: E402

H, W = 64, 32


def images(paths) -> torch.Tensor:
    return torch.from_numpy(np.stack([load_image(p, H, W) for p in paths]).astype(np.float32) / 127.5 - 1)


class CameraNet(nn.Module):
    """Three conv blocks and a linear camera head: enough for colour casts, illumination and blur."""

    def __init__(self, num_cameras: int):
        super().__init__()
        layers, c = [], 3
        for out in (16, 32, 64):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        self.features, self.head = nn.Sequential(*layers), nn.Linear(c, num_cameras)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def train_camera_classifier(x: torch.Tensor, cams: np.ndarray, num_cameras: int, seed: int, epochs: int = 15):
    torch.manual_seed(seed)
    net = CameraNet(num_cameras)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    y = torch.from_numpy(cams)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        net.train()
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // 32)):
            flip = torch.rand(len(idx)) < 0.5  # clothing layout is not a camera cue
            batch = torch.where(flip.view(-1, 1, 1, 1), x[idx].flip(3), x[idx])
            loss = F.cross_entropy(net(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def predict(net, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([net(x[i:i + 256]).argmax(1).numpy() for i in range(0, len(x), 256)])


@torch.no_grad()
def reid_features(paths) -> np.ndarray:
    from ureid.models.backbone import ReidNet

    net = ReidNet("mobilenet_v2", weights="imagenet", embedding_dim=0, dropout=0).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(paths), 128):
        x = (images(paths[i:i + 128]) + 1) / 2
        out.append(net((x - mean) / std)["pooled"].numpy())
    f = np.concatenate(out)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def identity_scores(real_f, real_pid, real_cam, fake_f, fake_src, fake_cam) -> dict:
    """Nearer own source than every other identity's image; nearest real image in the target camera is the
    same identity, for the fake and for its source image as the query."""
    sim = fake_f @ real_f.T  # cosine similarities, (fakes, real): N_f x N_r, small sets only
    src_sim = sim[np.arange(len(fake_f)), fake_src]
    other = real_pid[None, :] != real_pid[fake_src][:, None]
    beats = src_sim > np.where(other, sim, -np.inf).max(1)
    # the share of other identities' images farther from the fake than its source (0.5: no identity kept)
    auc = ((sim < src_sim[:, None]) & other).sum(1) / other.sum(1)
    in_target = real_cam[None, :] == fake_cam[:, None]
    has_same = (in_target & (real_pid[None, :] == real_pid[fake_src][:, None])).any(1)

    def nearest_same(q):  # q: similarities of each query to all real images
        masked = np.where(in_target, q, -np.inf)
        masked[np.arange(len(q)), fake_src] = -np.inf  # never the source itself
        return real_pid[masked.argmax(1)] == real_pid[fake_src]

    src_query = real_f[fake_src] @ real_f.T
    keep = has_same
    return {"nearer_source_than_other_identities": float(beats.mean()), "source_rank_auc": float(auc.mean()),
            "target_camera_top1_fake": float(nearest_same(sim)[keep].mean()),
            "target_camera_top1_source": float(nearest_same(src_query)[keep].mean()),
            "target_camera_pairs": int(keep.sum())}


@torch.no_grad()
def cycle_errors(checkpoint, paths, cams_of) -> dict:
    from ureid.engine.stargan import load_generator, to_tensor, to_uint8
    from ureid.models.stargan import one_hot

    g, info = load_generator(checkpoint)
    cams, gan = info["cameras"], info["gan"]
    rec, same = [], []
    for path, own in zip(paths, cams_of):
        x = to_tensor(load_image(path, gan.height, gan.width)[None])
        others = [c for c in cams if c != own]
        xs = x.expand(len(others), -1, -1, -1)
        fake = g(xs, one_hot(torch.tensor([cams.index(c) for c in others]), len(cams)))
        back = g(fake, one_hot(torch.full((len(others),), cams.index(own)), len(cams)))
        pix = to_uint8(x).astype(np.float32)
        rec.append(np.abs(to_uint8(back).astype(np.float32) - pix).mean())
        same.append(np.abs(to_uint8(g(x, one_hot(torch.tensor([cams.index(own)]), len(cams)))).astype(np.float32) - pix).mean())
    return {"cycle_l1_pixels": float(np.mean(rec)), "own_camera_l1_pixels": float(np.mean(same)),
            "iterations": int(info["iteration"])}


def measure(name, folder, train, net, real_f, real_pid, real_cam, cameras) -> dict:
    fakes = load_fakes(folder, train)
    src = np.array([s for s, _ in fakes])
    target = np.array([r.camid for _, r in fakes])
    pred = predict(net, images([r.path for _, r in fakes]))
    idx = {c: i for i, c in enumerate(cameras)}
    confusion = np.zeros((len(cameras), len(cameras)), dtype=np.int64)
    for t, p in zip(target, pred):
        confusion[idx[t], p] += 1
    fake_f = reid_features([r.path for _, r in fakes])
    return {"name": name, "folder": str(folder), "num_fakes": len(fakes),
            "target_camera_accuracy": float((np.array(cameras)[pred] == target).mean()),
            "source_camera_rate": float((np.array(cameras)[pred] == real_cam[src]).mean()),
            "confusion": confusion.tolist(),
            **identity_scores(real_f, real_pid, real_cam, fake_f, src, target)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG_DIR / "camstyle_cpu.yaml"), help="camstyle config (its GAN)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg = load_config(args.config, args.overrides).with_absolute_paths()
    from ureid.methods import get_method

    ds = load_split_dataset(cfg.data)
    train = [r for r in ds.train if not r.is_fake]
    cameras = sorted({r.camid for r in train})
    real_pid = np.array([r.pid for r in train])
    real_cam = np.array([r.camid for r in train])
    folders = []
    if cfg.clustering.style_transfer == "stargan" or cfg.clustering.fake_root:
        folders.append(("StarGAN", get_method("camstyle").fake_folder(cfg, train)))
    if default_fake_folder(cfg.data.root).is_dir():
        folders.append(("colour stand-in", str(default_fake_folder(cfg.data.root))))

    x = images([r.path for r in train])
    cam_idx = np.array([cameras.index(c) for c in real_cam])
    held = np.random.default_rng(args.seed).permutation(len(train))
    cut = len(train) // 5
    probe = train_camera_classifier(x[held[cut:]], cam_idx[held[cut:]], len(cameras), args.seed)
    held_out_acc = float((predict(probe, x[held[:cut]]) == cam_idx[held[:cut]]).mean())
    net = train_camera_classifier(x, cam_idx, len(cameras), args.seed)  # the judge: all real training images
    real_f = reid_features([r.path for r in train])
    report = {"dataset": cfg.data.root, "num_real": len(train), "cameras": cameras, "chance": 1 / len(cameras),
              "classifier_real_held_out_accuracy": held_out_acc, "fakes": []}
    for name, folder in folders:
        row = measure(name, folder, train, net, real_f, real_pid, real_cam, cameras)
        if name == "StarGAN":
            from pathlib import Path

            row.update(cycle_errors(Path(folder).parent / "stargan.pt", [r.path for r in train],
                                    [r.camid for r in train]))
        report["fakes"].append(row)
    report["seconds"] = time.perf_counter() - t0

    print(f"{len(train)} real training images, {len(cameras)} cameras (chance {1 / len(cameras):.1%}); the camera "
          f"classifier gets {held_out_acc:.1%} on held-out real images")
    print("| fakes | camera = target | camera = source | nearer own source than any other identity | "
          "other identities farther than the source | "
          "target camera top-1 same identity: fake / source as query | cycle L1 (0-255) | own-camera L1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["fakes"]:
        cyc = f"{r['cycle_l1_pixels']:.1f}" if "cycle_l1_pixels" in r else "-"
        own = f"{r['own_camera_l1_pixels']:.1f}" if "own_camera_l1_pixels" in r else "-"
        print(f"| {r['name']} ({r['num_fakes']}) | {r['target_camera_accuracy']:.1%} | {r['source_camera_rate']:.1%} | "
              f"{r['nearer_source_than_other_identities']:.1%} | {r['source_rank_auc']:.1%} | "
              f"{r['target_camera_top1_fake']:.1%} / "
              f"{r['target_camera_top1_source']:.1%} | {cyc} | {own} |")
    for r in report["fakes"]:
        print(f"\nconfusion of the {r['name']} fakes (rows: target camera, columns: predicted camera, 1-based)")
        print("| target | " + " | ".join(f"c{c + 1}" for c in cameras) + " |")
        print("|---" * (len(cameras) + 1) + "|")
        for c, row in zip(cameras, r["confusion"]):
            print(f"| c{c + 1} | " + " | ".join(str(v) for v in row) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\n({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
