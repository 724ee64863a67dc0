"""ureid.engine: datasets/transforms, deterministic loaders, feature extraction, one training epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ureid.data.records import Record
from ureid.engine import (ReidImageDataset, ReidVideoDataset, build_optimizer, build_transforms,
                          extract_features, forward_batch, make_loader, step_lr, train_epoch)
from ureid.engine.datasets import epoch_order
from ureid.models.losses import ClassifierHead, MemoryTable

torch.set_num_threads(1)
H, W = 64, 32


def write_images(folder, n: int, seed: int = 0, num_labels: int = 4) -> list[str]:
    """Tiny JPEGs: a per-label colour plus noise, so that a model can tell the labels apart."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (num_labels, 3))
    paths = []
    for i in range(n):
        arr = np.clip(colours[i % num_labels] + rng.normal(0, 40, (H, W, 3)), 0, 255).astype(np.uint8)
        p = folder / f"{i:04d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    paths = write_images(tmp_path_factory.mktemp("img"), 8)
    return [Record((p,), pid=i % 4, camid=i % 2) for i, p in enumerate(paths)]


@pytest.fixture(scope="module")
def tracklets(tmp_path_factory):
    paths = write_images(tmp_path_factory.mktemp("vid"), 12, seed=1)
    # 3, 5 and 4 frames.
    return [Record(tuple(paths[:3]), 0, 0), Record(tuple(paths[3:8]), 1, 1), Record(tuple(paths[8:]), 2, 0)]


@pytest.fixture(scope="module")
def net():
    from ureid.models.backbone import ReidNet

    torch.manual_seed(0)
    return ReidNet("resnet18", weights="none", embedding_dim=32, num_stripes=2)


def batches(loader):
    return [[t.clone() if isinstance(t, torch.Tensor) else t for t in b] for b in loader]


# -- datasets and transforms ----------------------------------------------------------------------------

def test_image_dataset_items_and_labels(images):
    ds = ReidImageDataset(images, build_transforms(H, W, train=False), labels=[3, 2, 1, 0, 3, 2, 1, 0])
    img, label, index, camid = ds[5]
    assert img.shape == (3, H, W) and img.dtype == torch.float32
    assert (label, index, camid) == (2, 5, 1)
    assert ReidImageDataset(images, build_transforms(H, W, False))[5][1] == images[5].pid
    with pytest.raises(ValueError, match="one entry per record"):
        ReidImageDataset(images, None, labels=[0, 1])


def test_train_transform_is_random_but_seeded_per_sample(images):
    ds = ReidImageDataset(images, build_transforms(H, W, train=True))
    ds.set_epoch(0, 0)
    a = ds[0][0]
    rng_before = torch.get_rng_state()
    assert torch.equal(a, ds[0][0])  # same (seed, epoch, index) -> same crop and flip
    assert torch.equal(rng_before, torch.get_rng_state())  # the global RNG is left alone
    views = set()
    for epoch in range(6):
        ds.set_epoch(0, epoch)
        views.add(ds[0][0].numpy().tobytes())
    assert len(views) > 1


def test_video_dataset_train_and_test_frames(tracklets):
    tf = build_transforms(H, W, train=False)
    train = ReidVideoDataset(tracklets, tf, seq_len=8, mode="train")
    frames, label, index, camid = train[0]
    assert frames.shape == (8, 3, H, W) and (label, index, camid) == (0, 0, 0)
    short = train.frame_indices(0)  # 3 frames -> drawn with replacement, in temporal order
    assert len(short) == 8 and set(short.tolist()) <= {0, 1, 2} and np.all(np.diff(short) >= 0)
    long = ReidVideoDataset(tracklets, tf, seq_len=4, mode="train").frame_indices(1)  # 5 frames
    assert len(set(long.tolist())) == 4 and np.all(np.diff(long) > 0)
    train.set_epoch(0, 1)
    assert torch.equal(train[0][0], train[0][0])
    test = ReidVideoDataset(tracklets, tf, mode="test", max_frames=4)
    assert test[0][0].shape[0] == 3 and test[1][0].shape[0] == 4
    assert test.frame_indices(1).tolist() == [0, 1, 3, 4]  # evenly spaced over 5 frames, ends kept
    # The frames themselves are the right files, in order.
    direct = torch.stack([tf(Image.open(p).convert("RGB")) for p in tracklets[2].paths])
    assert torch.equal(test[2][0], direct)


# -- loaders ------------------------------------------------------------------------------------------

def test_epoch_order_seeded_and_sharded():
    assert epoch_order(10, True, seed=3, epoch=1) == epoch_order(10, True, seed=3, epoch=1)
    assert epoch_order(10, True, seed=3, epoch=1) != epoch_order(10, True, seed=3, epoch=2)
    assert epoch_order(10, True, seed=3, epoch=1) != epoch_order(10, True, seed=4, epoch=1)
    assert epoch_order(5, False, 0, 0) == [0, 1, 2, 3, 4]
    shards = [epoch_order(11, True, 0, 0, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded so every rank runs the same number of steps
    assert set(sum(shards, [])) == set(range(11))
    with pytest.raises(ValueError, match="rank"):
        epoch_order(5, True, 0, 0, rank=2, world_size=2)


def test_loader_identical_for_same_seed_epoch_and_worker_count(images):
    ds = ReidImageDataset(images, build_transforms(H, W, train=True))
    a = batches(make_loader(ds, 3, shuffle=True, seed=7, epoch=2))
    b = batches(make_loader(ds, 3, shuffle=True, seed=7, epoch=2, num_workers=2))
    c = batches(make_loader(ds, 3, shuffle=True, seed=7, epoch=3))
    assert [len(x[0]) for x in a] == [3, 3, 2]
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2])
    assert torch.cat([x[2] for x in a]).tolist() != torch.cat([x[2] for x in c]).tolist()
    assert sorted(torch.cat([x[2] for x in a]).tolist()) == list(range(8))


# -- extraction ---------------------------------------------------------------------------------------

def test_extract_shapes_determinism_and_mode_restored(images, net):
    net.train()
    kw = dict(height=H, width=W, batch_size=3)
    f0 = extract_features(net, images, parts=True, **kw)
    assert net.training  # restored
    assert f0["pooled"].shape == (8, 512) and f0["pooled"].dtype == np.float32
    assert f0["parts"].shape == (8, 2, 512)
    seen = []
    f1 = extract_features(net, images, parts=True, progress=lambda done, total: seen.append((done, total)), **kw)
    assert seen == [(3, 8), (6, 8), (8, 8)]  # after each batch of 3
    f2 = extract_features(net, images, parts=True, num_workers=2, **kw)
    for f in (f1, f2):
        assert np.array_equal(f0["pooled"], f["pooled"]) and np.array_equal(f0["parts"], f["parts"])
    # Unnormalised, and what the eval-mode model gives for the test transform.
    net.eval()
    x = torch.stack([build_transforms(H, W, False)(Image.open(r.path).convert("RGB")) for r in images[:3]])
    with torch.no_grad():
        np.testing.assert_allclose(f0["pooled"][:3], net(x)["pooled"].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.linalg.norm(f0["pooled"], axis=1), 1.0)
    assert not extract_features(net, images[:2], **kw)["parts"]
    with pytest.raises(ValueError, match="num_stripes"):
        from ureid.models.backbone import ReidNet

        extract_features(ReidNet("resnet18", weights="none", embedding_dim=0), images, parts=True, **kw)


def test_extract_video_is_mean_of_frame_features(tracklets, net):
    kw = dict(height=H, width=W, batch_size=4)
    vid = extract_features(net, tracklets, video=True, parts=True, **kw)
    frames = [Record((p,), 0, 0) for t in tracklets for p in t.paths]
    per_frame = extract_features(net, frames, parts=True, **kw)
    starts = np.cumsum([0] + [len(t.paths) for t in tracklets])
    for i in range(len(tracklets)):
        seg = slice(starts[i], starts[i + 1])
        np.testing.assert_allclose(vid["pooled"][i], per_frame["pooled"][seg].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vid["parts"][i], per_frame["parts"][seg].mean(0), rtol=1e-5, atol=1e-6)
    capped = extract_features(net, tracklets, video=True, max_frames=2, **kw)  # first and last frame
    np.testing.assert_allclose(capped["pooled"][1], per_frame["pooled"][[3, 7]].mean(0), rtol=1e-5, atol=1e-6)


# -- training -----------------------------------------------------------------------------------------

def test_forward_batch_averages_tracklet_frames(net):
    net.eval()
    x = torch.randn(2, 3, 3, H, W)
    with torch.no_grad():
        out = forward_batch(net, x)
        flat = net(x.flatten(0, 1))
    assert out["pooled"].shape == (2, 512) and out["parts"].shape == (2, 2, 512)
    torch.testing.assert_close(out["embedding"], flat["embedding"].view(2, 3, -1).mean(1))
    with pytest.raises(ValueError, match="B, T, C, H, W"):
        forward_batch(net, torch.randn(3, H, W))


def test_build_optimizer_groups_and_step_lr():
    from ureid.models.backbone import ReidNet

    model = ReidNet("resnet18", weights="none", embedding_dim=16, frozen_stages="layer1")
    head = ClassifierHead(512, 5)
    opt = build_optimizer(model, head, lr=0.1)
    backbone, heads = opt.param_groups
    assert backbone["lr"] == pytest.approx(0.01) and heads["lr"] == pytest.approx(0.1)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.base.layer1[0].conv1.weight) not in ids  # frozen
    assert id(model.base.layer4[0].conv1.weight) in ids and id(head.fc.weight) in ids
    assert heads["nesterov"] and heads["momentum"] == 0.9 and heads["weight_decay"] == 5e-4
    assert step_lr(opt, 15, 0.1, step_epoch=16) == pytest.approx(0.1)
    assert step_lr(opt, 16, 0.1, step_epoch=16) == pytest.approx(0.01)
    assert backbone["lr"] == pytest.approx(0.001) and heads["lr"] == pytest.approx(0.01)
    assert step_lr(opt, 1, 0.01, step_epoch=None) == pytest.approx(0.01)


@pytest.mark.parametrize("loss_name", ["classifier", "memory"])
def test_train_epoch_overfits_tiny_problem(images, loss_name):
    from ureid.models.backbone import ReidNet

    torch.manual_seed(0)
    # One batch of all 8 images: with batches of 4, train-mode BatchNorm statistics change with the batch
    # composition and swamp the trend on a problem this small.
    if loss_name == "classifier":
        model = ReidNet("resnet18", weights="none", embedding_dim=0)
        loss_fn, lr = ClassifierHead(512, 4, dropout=0.0), 0.01
    else:
        model = ReidNet("resnet18", weights="none", embedding_dim=32, dropout=0.0)
        loss_fn, lr = MemoryTable(32, num_classes=4), 0.003
    # 32x16 inputs (a 1x1 final feature map) keep this quick on CPU.
    ds = ReidImageDataset(images, build_transforms(32, 16, train=False), labels=[r.pid for r in images])
    opt = build_optimizer(model, loss_fn, lr=lr, backbone_lr_mult=1.0)
    seen, losses = [], []
    for epoch in range(10):
        res = train_epoch(model, loss_fn, make_loader(ds, 8, shuffle=True, seed=0, epoch=epoch), opt,
                          epoch=epoch, log_every=1, progress=seen.append)
        assert res["batches"] == 1 and res["time_s"] > 0
        losses.append(res["loss"])
    assert losses[0] == pytest.approx(np.log(4), abs=0.05)  # chance level (an all-zero memory gives exactly it)
    assert losses[-1] < 0.05, losses
    if loss_name == "classifier":  # the memory loss drops at once when the table fills after epoch 0
        assert max(losses[-3:]) < min(losses[:3]), losses
    assert len(seen) == 10 and seen[-1]["epoch"] == 9 and seen[-1]["loss"] == pytest.approx(losses[-1])
    res = train_epoch(model, loss_fn, make_loader(ds, 2, shuffle=True, seed=0, epoch=0), opt, max_batches=1)
    assert res["batches"] == 1 and res["samples"] == 2  # what the stage loop's train_samples_per_s counts


def test_train_epoch_on_tracklets(tracklets):
    from ureid.models.backbone import ReidNet

    model = ReidNet("resnet18", weights="none", embedding_dim=16, frozen_stages="layer2")
    before = model.base.layer1[0].bn1.running_mean.clone()
    loss_fn = MemoryTable(16, num_classes=3)
    ds = ReidVideoDataset(tracklets, build_transforms(H, W, train=True), seq_len=4, labels=[0, 1, 2])
    res = train_epoch(model, loss_fn, make_loader(ds, 3, shuffle=True, seed=0, epoch=0),
                      build_optimizer(model, None, lr=0.01))
    assert res["batches"] == 1 and np.isfinite(res["loss"])
    assert torch.equal(model.base.layer1[0].bn1.running_mean, before)  # frozen BN untouched
    assert loss_fn.memory.abs().sum() > 0


def test_color_jitter_option_is_seeded_and_validated():
    img = Image.fromarray((np.random.default_rng(0).random((32, 16, 3)) * 255).astype(np.uint8))
    plain, jitter = build_transforms(32, 16, True), build_transforms(32, 16, True, color_jitter=0.4)
    torch.manual_seed(1)
    a = jitter(img)
    torch.manual_seed(1)
    b = jitter(img)
    torch.manual_seed(1)
    c = plain(img)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="color_jitter"):
        build_transforms(32, 16, True, color_jitter=1.5)
