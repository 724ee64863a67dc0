"""ureid.models: backbone shapes/weights/freezing, memory-table losses (incl. DDP consistency)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Only the light losses module at import time: the DDP test's spawned workers re-import this file, and
# torchvision's import (torch._dynamo) costs seconds per process. Backbone tests get it from a fixture.
from ureid.models.losses import ClassifierHead, MemoryTable, SoftenedMemoryLoss, memory_logits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ReidNet():  # noqa: N802 - reads as the class in the tests
    from ureid.models.backbone import ReidNet

    return ReidNet


@pytest.fixture(scope="module")
def torchvision():
    import torchvision

    return torchvision


def naive_update(memory: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference rule, written out: each sample in batch order, V[y] <- normalise((V[y] + x) / 2)."""
    v = memory.clone()
    for i in range(x.shape[0]):
        row = (v[int(y[i])] + x[i]) / 2
        v[int(y[i])] = row / row.norm().clamp_min(1e-12)
    return v


# -- backbone -----------------------------------------------------------------------------------------

def test_resnet18_shapes_and_embedding_is_unit_norm_in_eval(ReidNet):
    net = ReidNet("resnet18", weights="none", embedding_dim=64, num_stripes=2).eval()
    out = net(torch.randn(3, 3, 64, 32))
    assert out["pooled"].shape == (3, 512)
    assert out["embedding"].shape == (3, 64)
    assert out["parts"].shape == (3, 2, 512)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    # The stripes partition the feature map, so their mean is the global pool.
    torch.testing.assert_close(out["parts"].mean(1), out["pooled"], rtol=1e-5, atol=1e-6)


def test_resnet50_shapes(ReidNet):
    out = ReidNet("resnet50", weights="none").eval()(torch.randn(1, 3, 64, 32))
    assert out["pooled"].shape == (1, 2048) and out["embedding"].shape == (1, 2048) and out["parts"] is None


def test_no_embedding_head_and_bad_args(ReidNet):
    net = ReidNet("resnet18", weights="none", embedding_dim=0)
    assert not hasattr(net, "feat") and net(torch.randn(2, 3, 32, 16))["embedding"] is None
    with pytest.raises(ValueError, match="arch='vgg16'"):
        ReidNet("vgg16", weights="none")
    with pytest.raises(ValueError, match="frozen_stages"):
        ReidNet("resnet18", weights="none", frozen_stages="layer9")
    with pytest.raises(ValueError, match="num_stripes=8 exceeds"):
        ReidNet("resnet18", weights="none", num_stripes=8)(torch.randn(2, 3, 64, 32))


def test_frozen_stages_stay_frozen_with_bn_in_eval(ReidNet):
    torch.manual_seed(0)
    net = ReidNet("resnet18", weights="none", embedding_dim=32, frozen_stages="layer2").train()
    frozen = [net.base.conv1, net.base.bn1, net.base.layer1, net.base.layer2]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not sub.training for sub in m.modules())
    assert net.base.layer3.training and net.feat_bn.training
    assert all(p.requires_grad for p in net.base.layer3.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(torch.randn(4, 3, 64, 32))["embedding"].sum().backward()
    opt.step()
    after = net.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if k.startswith(("base.conv1", "base.bn1", "base.layer1", "base.layer2")):
            assert not changed, f"{k} changed although frozen (BN running stats included)"
    assert not torch.equal(before["base.layer3.0.conv1.weight"], after["base.layer3.0.conv1.weight"])
    assert not torch.equal(before["base.layer3.0.bn1.running_mean"], after["base.layer3.0.bn1.running_mean"])


def test_imagenet_weights_absent_gives_clear_error(tmp_path, monkeypatch, ReidNet, torchvision):
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("UREID_IMAGENET_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        ReidNet("resnet18", weights="imagenet")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / os.path.basename(url)) in msg
    assert url in msg
    assert "UREID_IMAGENET_WEIGHTS" in msg and "weights: none" in msg


def test_imagenet_weights_from_hub_cache_and_env(tmp_path, monkeypatch, ReidNet, torchvision):
    fname = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)  # resnet18-<hash>.pth
    ref = torchvision.models.resnet18(weights=None)
    ckpt = tmp_path / "hub" / "checkpoints" / fname
    ckpt.parent.mkdir(parents=True)
    # Like torchvision's real files: no BatchNorm num_batches_tracked entries.
    torch.save({k: v for k, v in ref.state_dict().items() if "num_batches_tracked" not in k}, ckpt)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("UREID_IMAGENET_WEIGHTS", raising=False)
    net = ReidNet("resnet18", weights="imagenet", embedding_dim=16)
    torch.testing.assert_close(net.base.layer4[1].conv2.weight, ref.layer4[1].conv2.weight, rtol=0, atol=0)
    # The env var wins over the cache and may name a folder holding torchvision's file name.
    other = torchvision.models.resnet18(weights=None)
    (tmp_path / "mine").mkdir()
    torch.save(other.state_dict(), tmp_path / "mine" / fname)
    monkeypatch.setenv("UREID_IMAGENET_WEIGHTS", str(tmp_path / "mine"))
    net = ReidNet("resnet18", weights="imagenet", embedding_dim=16)
    assert torch.equal(net.base.conv1.weight, other.conv1.weight)


def test_checkpoint_path_restores_identical_outputs(tmp_path, ReidNet):
    torch.manual_seed(1)
    net = ReidNet("resnet18", weights="none", embedding_dim=32).train()
    net(torch.randn(4, 3, 64, 32))  # move BN running stats away from their init
    net.eval()
    x = torch.randn(2, 3, 64, 32)
    ref = net(x)
    path = tmp_path / "ckpt.pt"
    # DDP-style "module." keys next to extra checkpoint entries must load too.
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}, "stage": 3}, path)
    loaded = ReidNet("resnet18", weights=str(path), embedding_dim=32).eval()
    out = loaded(x)
    assert torch.equal(out["pooled"], ref["pooled"]) and torch.equal(out["embedding"], ref["embedding"])


def test_checkpoint_with_unknown_keys_or_wrong_arch_is_rejected(tmp_path, ReidNet, torchvision):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["foo.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"foo\.weight"):
        ReidNet("resnet18", weights=str(tmp_path / "bad.pth"))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="resnet50"):
        ReidNet("resnet50", weights=str(tmp_path / "r18.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReidNet("resnet18", weights=str(tmp_path / "missing.pth"))


# -- memory table -------------------------------------------------------------------------------------

def test_memory_update_matches_naive_loop_with_repeated_labels():
    torch.manual_seed(0)
    mem = MemoryTable(8, num_classes=5)
    ref = torch.zeros(5, 8)
    for _ in range(4):
        x = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        y = torch.tensor([1, 3, 1, 1, 0, 3])  # label 1 three times, 3 twice
        mem({"embedding": x}, y).backward()
        ref = naive_update(ref, x.detach(), y)
        assert torch.equal(mem.memory, ref)
    assert mem.memory[[0, 1, 3]].norm(dim=1).sub(1).abs().max() < 1e-6
    assert torch.equal(mem.memory[[2, 4]], torch.zeros(2, 8))  # never seen
    mem.reset(7)
    assert mem.memory.shape == (7, 8) and not mem.memory.any()


def test_memory_gradient_matches_plain_formula_and_gradcheck():
    torch.manual_seed(0)
    mem = MemoryTable(8, num_classes=4, temperature=0.1)
    mem.memory.copy_(F.normalize(torch.randn(4, 8), dim=1))
    v0 = mem.memory.clone()
    x = torch.randn(5, 8, requires_grad=True)
    y = torch.tensor([0, 2, 2, 3, 1])
    loss = mem({"embedding": x}, y)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(x2 @ v0.t() / 0.1, y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x2.grad)  # gradient uses V before the update
    assert not torch.equal(mem.memory, v0)

    v64 = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    # gradcheck runs several backward passes over one graph; the in-place update would (rightly) trip the
    # version check, so the formula is checked with the update off (the comparison above has it on).
    torch.autograd.gradcheck(lambda t: memory_logits(t, v64, y, 0.1, update=False),
                             (torch.randn(5, 8, dtype=torch.float64, requires_grad=True),))


def test_memory_modified_between_forward_and_backward_is_detected():
    mem = MemoryTable(4, num_classes=3)
    x = torch.randn(2, 4, requires_grad=True)
    loss = mem({"embedding": x}, torch.tensor([0, 1]))
    mem.memory.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_memory_state_dict_roundtrip_resizes():
    mem = MemoryTable(4, num_classes=6)
    mem.memory.normal_()
    other = MemoryTable(4, num_classes=2)
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.memory, mem.memory)
    with pytest.raises(ValueError, match="reset"):
        MemoryTable(4)({"embedding": torch.randn(2, 4)}, torch.tensor([0, 0]))


def test_softened_loss_targets_and_hard_stage():
    torch.manual_seed(0)
    n, d = 6, 8
    loss_fn = SoftenedMemoryLoss(d, n, soft_weight=0.6)
    loss_fn.memory.copy_(F.normalize(torch.randn(n, d), dim=1))
    v0 = loss_fn.memory.clone()
    x = torch.randn(3, d, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    # Stage 0: no neighbours -> plain instance cross-entropy.
    hard = loss_fn({"embedding": x}, None, idx)
    torch.testing.assert_close(hard, F.cross_entropy(x.detach() @ v0.t() / 0.1, idx))

    nb = torch.tensor([[1, 2], [0, 3], [0, 1], [4, 5], [5, 0], [4, 3]])
    loss_fn.set_neighbors(nb)
    t = loss_fn.soft_targets(idx)
    torch.testing.assert_close(t.sum(1), torch.ones(3))
    assert t[0, 4] == pytest.approx(0.6) and t[0, 5] == pytest.approx(0.2) and t[0, 0] == pytest.approx(0.2)
    v1 = loss_fn.memory.clone()
    soft = loss_fn({"embedding": x}, None, idx)
    logp = F.log_softmax(x.detach() @ v1.t() / 0.1, dim=1)
    expected = -(0.6 * logp[torch.arange(3), idx] + 0.2 * logp.gather(1, nb[idx]).sum(1)).mean()
    torch.testing.assert_close(soft, expected)
    # Checkpoint with neighbours, restore into a fresh module; stage-0 state drops them again.
    fresh = SoftenedMemoryLoss(d, n)
    fresh.load_state_dict(loss_fn.state_dict())
    assert torch.equal(fresh.neighbors, nb) and torch.equal(fresh.memory, loss_fn.memory)
    fresh.load_state_dict(SoftenedMemoryLoss(d, n).state_dict())
    assert fresh.neighbors is None
    with pytest.raises(ValueError, match="itself"):
        loss_fn.set_neighbors(torch.tensor([[0], [0], [0], [0], [0], [0]]))
    with pytest.raises(ValueError, match="shape"):
        loss_fn.set_neighbors(torch.zeros(3, 2, dtype=torch.long))


def test_classifier_head_loss_and_gradient():
    head = ClassifierHead(16, 3, dropout=0.0)
    pooled = torch.randn(4, 16)
    y = torch.tensor([0, 1, 2, 1])
    loss = head({"pooled": pooled, "embedding": None}, y, None)
    torch.testing.assert_close(loss, F.cross_entropy(pooled @ head.fc.weight.t() + head.fc.bias, y))
    loss.backward()
    assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0


# -- DDP: replicas stay bit-identical -----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return {"pooled": self.fc(x.flatten(1)), "embedding": None, "parts": None}


def _ddp_worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        net = nn.Linear(8, 6)
        model = nn.parallel.DistributedDataParallel(net)
        mem = MemoryTable(6, num_classes=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        batches = []
        for step in range(4):
            bs = 3 if (step == 3 and rank == 1) else 5  # an uneven last batch
            inp = torch.randn(bs, 8, generator=g)
            y = torch.randint(0, 4, (bs,), generator=g)
            y[1] = y[0]  # a label repeated within the batch ...
            y[2] = step % 4  # ... and the same label on both ranks
            emb = F.normalize(model(inp), dim=1)
            loss = mem({"embedding": emb}, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            batches.append((emb.detach().clone(), y.clone()))

        # A loss module with its own parameters (PUL's classifier) sits outside DDP: train_epoch must
        # average its gradients, or the replicas' heads drift apart. (Same spawn, to pay worker start-up once.)
        from ureid.engine.train import build_optimizer, train_epoch

        model = nn.parallel.DistributedDataParallel(_Tiny())
        head = ClassifierHead(6, 3, dropout=0.0)
        head_init = head.fc.weight.detach().clone()
        loader = [(torch.randn(4, 3, 2, 2, generator=g), torch.randint(0, 3, (4,), generator=g),
                   torch.arange(4), torch.zeros(4)) for _ in range(3)]
        train_epoch(model, head, loader, build_optimizer(model, head, lr=0.5))
        torch.save({"memory": mem.memory.clone(), "batches": batches, "head_init": head_init,
                    "head": head.state_dict(), "tiny": model.module.state_dict()},
                   os.path.join(outdir, f"rank{rank}.pt"))
        # Both ranks past their last collective before either leaves.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # ... and then they leave without gloo's teardown: one CI run (of about ten) saw rank 0 abort in it ("terminate
    # called without an active exception") after saving, and a later one rank 1, even after the barrier. What the
    # test checks is saved by then; a rank that fails before that still fails the test (no file, or an error).
    os._exit(0)


def test_ddp_replicas_memory_tables_and_classifier_stay_identical(tmp_path):
    world = 2
    torch.multiprocessing.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert torch.equal(res[0]["memory"], res[1]["memory"])
    ref = torch.zeros(4, 6)
    for step in range(4):
        for r in range(world):  # rank order
            x, y = res[r]["batches"][step]
            ref = naive_update(ref, x, y)
    assert torch.equal(res[0]["memory"], ref)
    assert ref.abs().sum() > 0
    assert not torch.equal(res[0]["head"]["fc.weight"], res[0]["head_init"])  # it did train
    for part in ("head", "tiny"):
        for k in res[0][part]:
            assert torch.equal(res[0][part][k], res[1][part][k]), f"{part}.{k} differs across ranks"
