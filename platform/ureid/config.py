"""Run configuration: YAML files with inheritance, dotted overrides, validated by pydantic.

A config file may name a parent with ``base: other.yaml``, or several (``base: [a.yaml, b.yaml]``,
later ones win), as paths relative to the file; the child is deep-merged over them. Command-line overrides use dotted keys (``--set clustering.size_penalty=0.003``),
their values parsed as YAML scalars. Validation rejects unknown keys, wrong types and out-of-range
values before anything starts, with a message naming the key, the value and what is allowed.

Every pseudo-label setting of a method lives in its one ``clustering`` block, whose schema is the
method's own ``Settings`` (:mod:`ureid.methods`, the OpenUnReID convention). Validation never touches the
file system: the driver checks paths once with :meth:`Config.check_paths` (on a cluster, the nodes that
validate a config need not see the dataset).

Configs named by a bare file name (``buc_cpu.yaml``, or ``buc_cpu``) are found in :data:`CONFIG_DIR`, the
configs shipped inside the package (``platform/ureid/configs/``, also reachable as ``experiments/configs/`` in a
checkout).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

DATASET_NAMES = ("synthetic", "market1501", "dukemtmc", "msmt17", "cuhk03", "mars", "dukevideo", "folder",
                 "tracklets")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

Fraction = Annotated[float, Field(gt=0, lt=1)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]


def _not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("empty; give a value (`--set key=$VAR` with VAR unset gives an empty one)")
    return value


# A path, URI or name: an empty one would mean the current folder (data.root '' read the working directory as
# the dataset) or a default the user did not choose.
Text = Annotated[str, AfterValidator(_not_empty)]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and what is allowed."""


class DatasetMissing(ConfigError):
    """A dataset folder a config names (``key``.root: data, schedule.validation, clustering.source) is not there."""

    def __init__(self, message: str, key: str = "data"):
        super().__init__(message)
        self.key = key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class DataConfig(_Strict):
    name: Literal[DATASET_NAMES] = "synthetic"
    root: Text = "data/synthetic"
    pattern: str | None = None
    cuhk03_protocol: Literal["labeled", "detected"] = "labeled"
    height: PosInt = 256
    width: PosInt = 128
    num_workers: Annotated[int, Field(ge=0)] = 2
    bad_images: Literal["fail", "skip"] = "fail"
    color_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.0
    seq_len: PosInt = 16
    max_test_frames: PosInt = 200
    synthetic: dict[str, Any] = Field(default_factory=dict)

    @field_validator("synthetic")
    @classmethod
    def _synthetic_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        """The generator's own check (names, types, ranges), so a bad block is refused when the config is read."""
        if value:
            from .data.synthetic import make_params  # here: the data package imports NumPy

            make_params(**value)
        return value

    @model_validator(mode="after")
    def _pattern_for_folder(self):
        if self.pattern:
            from .data.formats import PATTERN_FORMATS  # here: the data package imports NumPy

            if self.name not in PATTERN_FORMATS:
                raise ValueError(f"data.pattern applies only to data.name={' or '.join(map(repr, PATTERN_FORMATS))}, "
                                 f"not {self.name!r}")
        return self

    def check_paths(self, key: str = "data") -> None:
        """The synthetic default is generated on first use; every real dataset must already be there."""
        root = Path(self.root).expanduser()
        if self.name != "synthetic" and not root.is_dir():
            if root.is_file():  # the downloaded archive, most often
                raise ConfigError(f"{key}.root: {self.root!r} is a file, not a dataset folder ({key}.name={self.name!r})"
                                  + ("; extract the archive and give the folder it makes"
                                     if root.suffix.lower() in (".zip", ".tar", ".gz", ".tgz", ".rar", ".7z") else ""))
            raise DatasetMissing(f"{key}.root: dataset folder {self.root!r} does not exist ({key}.name={self.name!r})",
                                 key)

    @property
    def is_video(self) -> bool:
        return self.name in ("mars", "dukevideo", "tracklets") or bool(self.synthetic.get("video", False))


class ModelConfig(_Strict):
    arch: Literal["resnet18", "resnet34", "resnet50", "mobilenet_v2"] = "resnet50"
    weights: Text = "imagenet"
    embedding_dim: PosInt = 2048
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5
    num_stripes: Annotated[int, Field(ge=0)] = 0
    frozen_stages: Literal["layer2"] | None = None
    pooling: Literal["avg", "gem"] = "avg"
    neck: Literal["none", "bn"] = "none"
    last_stride: Literal[1, 2] = 2


class TrainConfig(_Strict):
    batch_size: PosInt = 16              # per train worker: the global batch is this times ray.num_workers
    lr: Annotated[float, Field(gt=0)] = 0.1
    backbone_lr_mult: NonNegFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 5e-4
    nesterov: bool = True
    first_stage_epochs: PosInt = 20
    first_stage_lr_step: PosInt = 16
    stage_epochs: PosInt = 2
    stage_lr: Annotated[float, Field(gt=0)] = 0.01
    max_batches_per_epoch: PosInt | None = None
    eval_batch_size: PosInt = 64
    # Each stage's scores after k-reciprocal re-ranking too (rerank_mAP, rerank_rank1, ...; Zhong et al., CVPR
    # 2017, k1 20, k2 6, lambda 0.3, as `ureid evaluate --rerank`): the "+RR" numbers papers report. Logged
    # beside mAP, never a selection criterion. Off by default: the re-ranking costs about as much as the
    # query and gallery's pairwise products twice more.
    eval_rerank: bool = False
    # BatchNorm statistics over the global batch instead of each worker's share (torch's SyncBatchNorm on
    # GPUs, ureid.models.invariance.GlobalBatchNorm elsewhere). With per_sample_dropout too, N workers at
    # batch_size B train as one worker at N*B up to float summation order (README, "Train workers at equal
    # global batch"). Off by default: two all-reduces per BatchNorm layer and step.
    sync_batchnorm: bool = False
    # Dropout masks drawn per sample from (stage seed, epoch, step, sample index) instead of each rank's
    # generator: the mask a sample gets no longer depends on which worker processed it.
    per_sample_dropout: bool = False

    @field_validator("batch_size")
    @classmethod
    def _batchnorm_needs_two(cls, value: int) -> int:
        if value < 2:  # else every stage's first step failed in the workers, deep in torch
            raise ValueError(f"must be at least 2: it is each train worker's batch, and a BatchNorm "
                             f"layer in training needs more than one sample")
        return value


class LossConfig(_Strict):
    temperature: Annotated[float, Field(gt=0)] = 0.1


class MethodSettings(_Strict):
    """Base of every method's ``clustering`` block (``ureid.methods.Settings``)."""

    # Names of string fields holding paths (made absolute in the driver: Ray workers run elsewhere).
    path_fields: ClassVar[tuple[str, ...]] = ()


#: Label-free stage scores (logged as ``lf_*`` by every update) and whether higher is better.
#: Runs keep their last stage by default: on the calibrated synthetic default no score picked better stages
#: than that (README, "which label-free score to trust"); a sweep still needs a score to compare trials on,
#: ``schedule.objective``, the silhouette by default (the best pooled ranking of stages across runs).
DEFAULT_SELECT = "last"
DEFAULT_OBJECTIVE = "label_free:lf_silhouette"
DEFAULT_SCORE = DEFAULT_OBJECTIVE.split(":", 1)[1]
LABEL_FREE_SCORES = {"lf_silhouette": True, "lf_davies_bouldin": False, "lf_snd": True,
                     "lf_nmi_previous": True, "lf_ari_previous": True}


class ScheduleConfig(_Strict):
    max_stages: PosInt | None = None
    patience: PosInt | None = None
    # Which stage a run keeps: ``last``; ``label_free:<score>`` (one of LABEL_FREE_SCORES: features and
    # pseudo-labels only); ``validation`` (mAP on the labeled ``validation`` dataset, another one than the
    # target: the TIP paper's protocol); ``oracle_map`` (test-set mAP: labels an unsupervised user does not
    # have; for analysis, always reported beside the others as ``oracle_stage``).
    select: str = DEFAULT_SELECT
    # What a sweep compares trials on when ``select`` is ``last`` (a label-free score, or validation/oracle_map).
    objective: str = DEFAULT_OBJECTIVE
    validation: DataConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_select_metric(cls, data: Any):
        # Run folders written before schedule.select kept the test-mAP-best stage (select_metric: mAP): read
        # them as what that was, the oracle, so they can still be resumed and visualised.
        if isinstance(data, dict) and "select_metric" in data:
            data = dict(data)
            old = data.pop("select_metric")
            if old != "mAP":
                raise ValueError(f"schedule.select_metric {old!r} is gone: use schedule.select (label_free:<score>, "
                                 f"validation, last or oracle_map)")
            data.setdefault("select", "oracle_map")
        return data

    @model_validator(mode="after")
    def _known_criterion(self):
        allowed = ["last", "validation", "oracle_map", *(f"label_free:{k}" for k in LABEL_FREE_SCORES)]
        if self.select not in allowed:
            raise ValueError(f"schedule.select: {self.select!r} is not a selection criterion; allowed: "
                             f"{', '.join(allowed)}")
        if self.objective not in allowed[1:]:
            raise ValueError(f"schedule.objective: {self.objective!r} cannot compare trials; allowed: "
                             f"{', '.join(allowed[1:])}")
        for key in ("select", "objective"):
            if getattr(self, key) == "validation" and self.validation is None:
                raise ValueError(f"schedule.{key}: 'validation' needs schedule.validation, a labeled dataset "
                                 "other than the target (e.g. {name: dukemtmc, root: /data/DukeMTMC-reID})")
        return self

    def criterion(self) -> tuple[str, bool] | None:
        """(metric, higher is better) that selects the stage; None for ``last``."""
        if self.select == "last":
            return None
        if self.select == "validation":
            return "val_mAP", True
        if self.select == "oracle_map":
            return "mAP", True
        score = self.select.split(":", 1)[1]
        return score, LABEL_FREE_SCORES[score]


def ray_address_form(address: str) -> str | None:
    """What is wrong with the form of a Ray address, or None: a GCS ``host:port``, ``auto``, ``local`` or a
    ``scheme://`` address (Ray Client's ``ray://``). Checked when a config is read, and again for
    ``$RAY_ADDRESS`` where the job starts (``runtime.job.check_address``, which then probes a host:port)."""
    if address in ("auto", "local") or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    if not host.strip("[]") or not port.isdigit():  # [..]: an IPv6 literal
        return ("expected the head's host:port (its GCS port, 6379 unless `ray start --head --port` said "
                "otherwise), 'auto', or ray://host:port")
    return None


class RayConfig(_Strict):
    address: str | None = None
    num_workers: PosInt = 1
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    # A local start (address null) runs Ray's dashboard at 127.0.0.1:8265; Ray Train's state queries
    # go through it (without it Train logs "Failed to query Ray Train Controller actor state" every few s,
    # and an ASHA sweep is refused: a stopped trial's workers would never be freed, see tune.check_state_api).
    include_dashboard: bool = True
    # Run the label update's row blocks as parallel Ray tasks on the cluster's reserved clustering slots
    # (custom resource ureid_cluster_slot, declared on every node); false: inside the feature-store actor.
    clustering_tasks: bool = True
    # Slots a sweep trial reserves for its own clustering tasks (in its placement group).
    cluster_slots_per_trial: PosInt = 2
    # Worker-group restarts Ray Train makes after a train worker (or its node) dies; each restart continues
    # from the last stage checkpoint, so a fault costs at most the stage it hit. 0: a worker fault fails the run.
    max_failures: Annotated[int, Field(ge=0)] = 3
    # Threads of the feature store's own work (faiss and torch inside the actor: the in-process update and
    # what a fanned-out update keeps). null: what Ray gives an actor that asks for no CPU, 1 thread
    # (OMP_NUM_THREADS=1). The train workers wait for the labels meanwhile, so a node's cores are free then.
    store_threads: PosInt | None = None
    # GPU share of the feature-store actor (Ray's num_gpus: 1, or a fraction such as 0.5). Above 0 every label
    # update runs on that GPU through the clustering code's torch path, none as CPU tasks on clustering
    # slots. Reserved like a train worker's GPU, so the workers cannot take it: a fixed cluster without room
    # for the worker group and this share is refused at start-up. In a sweep each trial reserves its share.
    store_gpus: Annotated[float, Field(ge=0, le=1)] = 0.0

    @field_validator("address")
    @classmethod
    def _address_form(cls, value):
        if value is not None and (why := ray_address_form(value)):
            raise ValueError(why)
        return value


class TrackingConfig(_Strict):
    tracking_uri: Text | None = None
    experiment: Text = "ureid"
    run_name: Text | None = None
    # Ranked lists and a t-SNE map of the training features at the end of a run (run folder + MLflow).
    pictures: bool = True


class Config(_Strict):
    method: str
    seed: Annotated[int, Field(ge=0)] = 0
    output_dir: Text = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    clustering: SerializeAsAny[MethodSettings]
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _clustering_by_method(cls, data: Any):
        # The clustering block's schema is the method's; validate it against exactly that schema so an
        # unknown key is reported as unknown rather than as a failed union member.
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            schema = _settings_schema(data["method"])
            block = data.get("clustering") or {}
            if isinstance(block, dict):
                data = dict(data)
                data["clustering"] = schema.model_validate(block)
        return data

    @model_validator(mode="after")
    def _clustering_matches_method(self):
        schema = _settings_schema(self.method)
        if not isinstance(self.clustering, schema):
            raise ValueError(f"clustering: expected {schema.__name__} for method {self.method!r}, "
                             f"got {type(self.clustering).__name__}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def check_paths(self) -> None:
        """Every dataset folder the config names exists (run once, in the driver), and no run writes into a
        tree the folder formats read whole."""
        from .data.formats import PATTERN_FORMATS

        self.data.check_paths("data")
        if self.data.name in PATTERN_FORMATS:
            root, out = Path(self.data.root).expanduser().resolve(), Path(self.output_dir).expanduser().resolve()
            if out.is_relative_to(root):
                raise ConfigError(f"output_dir: {self.output_dir!r} is inside data.root {self.data.root!r}, and the "
                                  f"{self.data.name} format reads every image below its root: the next run would "
                                  f"train on this one's pictures (pictures/*.png) as crops. Put output_dir outside "
                                  f"it, e.g. --set output_dir={root.parent / 'ureid-runs'}")
        if self.schedule.validation is not None:
            self.schedule.validation.check_paths("schedule.validation")
        for name, value in self.clustering:
            if isinstance(value, DataConfig):
                value.check_paths(f"clustering.{name}")

    def extract_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ureid.engine.extract.extract_features` for this config's data."""
        d = self.data
        return {"height": d.height, "width": d.width, "batch_size": self.train.eval_batch_size,
                "num_workers": d.num_workers, "video": d.is_video, "max_frames": d.max_test_frames}

    def with_absolute_paths(self) -> "Config":
        """Resolve relative paths against the current folder: Ray workers run in folders of their own."""

        def absolute(p: str | None) -> str | None:
            return None if p is None else str(Path(p).expanduser().resolve())

        cfg = self.model_copy(deep=True)
        cfg.output_dir = absolute(cfg.output_dir)
        cfg.data.root = absolute(cfg.data.root)
        if cfg.schedule.validation is not None:
            cfg.schedule.validation.root = absolute(cfg.schedule.validation.root)
        for name, value in cfg.clustering:
            if isinstance(value, DataConfig):
                value.root = absolute(value.root)
            elif name in cfg.clustering.path_fields and value:
                setattr(cfg.clustering, name, absolute(value))
        if cfg.model.weights not in ("imagenet", "none"):
            cfg.model.weights = absolute(cfg.model.weights)
        return cfg


class StarGANSettings(_Strict):
    """The ``gan`` block of a StarGAN config (:mod:`ureid.models.stargan`; names as in the reference code)."""

    height: PosInt = 256                 # images are resized to crop_scale x this, then randomly cropped to it
    width: PosInt = 128
    crop_scale: Annotated[float, Field(ge=1.0)] = 1.125
    conv_dim: PosInt = 64                # generator channels after the first conv
    repeat_num: Annotated[int, Field(ge=0)] = 6     # generator residual blocks
    d_conv_dim: PosInt = 64
    d_repeat_num: PosInt = 6             # discriminator stride-2 convs: H and W must be multiples of 2^this
    batch_size: PosInt = 16              # global: split over the train workers
    iterations: PosInt = 200000
    decay_iterations: Annotated[int, Field(ge=0)] = 100000   # linear lr decay to 0 over the last ones
    n_critic: PosInt = 5                 # one generator step every n_critic discriminator steps
    g_lr: Annotated[float, Field(gt=0)] = 1e-4
    d_lr: Annotated[float, Field(gt=0)] = 1e-4
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.5
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    lambda_cls: NonNegFloat = 1.0
    lambda_rec: NonNegFloat = 10.0
    lambda_gp: NonNegFloat = 10.0
    log_every: PosInt = 100              # iterations per logged (MLflow) step
    checkpoint_every: PosInt = 5000      # iterations per checkpoint (and at the end)
    sample_every: PosInt = 5000          # iterations per sample grid (and at the end)
    sample_images: PosInt = 8            # columns of the sample grid
    cache_images_mb: NonNegFloat = 2048  # decode the training images once when they fit in this much memory
    generate_threads: PosInt = 1         # torch threads per generation task (fixed: same threads, same bytes)
    generate_chunk: PosInt = 256         # source images per generation task

    @model_validator(mode="after")
    def _sizes(self):
        if self.decay_iterations > self.iterations:
            raise ValueError(f"gan.decay_iterations ({self.decay_iterations}) must be at most gan.iterations "
                             f"({self.iterations}); StarGAN decays over the last half: --set "
                             f"gan.decay_iterations={self.iterations // 2}")
        scale = 2 ** self.d_repeat_num
        if self.height % scale or self.width % scale or self.height % 4 or self.width % 4:
            raise ValueError(f"gan.height and gan.width must be multiples of 4 (the generator's two down-convs) "
                             f"and of 2^gan.d_repeat_num = {scale} (the discriminator's); got "
                             f"{self.height}x{self.width}")
        return self


class GanConfig(_Strict):
    """A StarGAN training job (``ureid camstyle train``): the dataset, the ``gan`` block, Ray and MLflow."""

    seed: Annotated[int, Field(ge=0)] = 0
    output_dir: Text = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    gan: StarGANSettings = Field(default_factory=StarGANSettings)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_absolute_paths(self) -> "GanConfig":
        cfg = self.model_copy(deep=True)
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
        return cfg


def load_gan_config(path: str | os.PathLike, overrides: list[str] | None = None) -> GanConfig:
    """Load, merge and validate a StarGAN config file (``stargan.yaml``) plus dotted overrides."""
    data = apply_overrides(read_yaml(path), overrides)
    try:
        return GanConfig.model_validate(data)
    except ValidationError as exc:
        lines = _error_lines(exc, model=GanConfig)
        raise ConfigError("\n".join([f"invalid StarGAN configuration ({path}):", *lines])) from None


def _settings_schema(method: str) -> type[MethodSettings]:
    from .methods import METHODS

    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not a method; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[method].Settings


# ----------------------------------------------------------------------------- loading


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, resolving ``base:`` inheritance (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        # `ray submit` runs entry points from another folder: fall back to the packaged configs.
        candidates = [CONFIG_DIR / path, CONFIG_DIR / path.name]
        if not path.suffix:  # `--config buc_cpu` names the packaged buc_cpu.yaml, as `ureid run` lists them
            candidates += [CONFIG_DIR / f"{path}.yaml", CONFIG_DIR / f"{path.name}.yaml"]
        found = [c for c in candidates if not path.is_absolute() and c.is_file()]
        if found:
            path = found[0]
        else:
            packaged = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config file {str(path)!r} not found; the packaged configs in {CONFIG_DIR}: "
                              f"{packaged}")
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' inheritance loops back to itself")
    try:
        with path.open() as stream:  # a file object: YAML's error marks name the file, not "<unicode string>"
            data = yaml.safe_load(stream) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    parents = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:  # later parents win
        merged = _deep_merge(merged, read_yaml(_base_file(path, parent), _seen + (path,)))
    return _deep_merge(merged, data)


def _base_file(path: Path, parent) -> Path:
    """A ``base:`` entry of ``path``: a file next to it, else (a user's own file naming ``buc_cpu.yaml`` or
    ``buc_cpu``) the packaged config of that name."""
    if not isinstance(parent, (str, os.PathLike)) or not str(parent):
        raise ConfigError(f"{path}: base: expected file names, got {parent!r}")
    beside = path.parent / parent
    if beside.is_file() or Path(parent).is_absolute():
        return beside
    for name in (str(parent), f"{parent}.yaml"):
        if (CONFIG_DIR / name).is_file() and (CONFIG_DIR / name).resolve() != path:
            return CONFIG_DIR / name
    packaged = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{path}: base {str(parent)!r} is neither next to it ({beside}) nor a packaged config "
                      f"({packaged})")


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (numbers, bools, null, lists)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model a field's annotation holds (itself, or inside Optional/Union/Annotated), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def close_key(key: str, names) -> str | None:
    """The one of ``names`` an unknown ``key`` most likely meant: a typo away, or one word of a longer name
    (``uri`` for ``tracking_uri``); None when none is close."""
    names = list(names)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.75) or [n for n in names if key in n.split("_")]
    return close[0] if close else None


def refuse_other_method(data: dict, method: str, source, runs: str) -> None:
    """A config of another method than the caller's, refused before its settings meet the wrong schema."""
    if data.get("method", method) != method:
        from .methods import METHODS

        if data["method"] not in METHODS:  # a typo, not another method: say so rather than "runs buc"
            close = close_key(str(data["method"]), list(METHODS))
            raise ConfigError(f"config method {data['method']!r} ({source}) is not a method"
                              + (f"; did you mean {close!r}?" if close else f"; allowed: {', '.join(sorted(METHODS))}"))
        raise ConfigError(f"config method is {data['method']!r} ({source}) but {runs} {method!r}")


def _unknown_key_hint(model: type[BaseModel] | None, loc: tuple, prefix: str, label: str | None = None) -> str:
    """For an unknown key: '; did you mean <key>?' when it is one typo (or one word) away from a key its
    section has, else '; <section> has: <its keys>'; '' when the section is not a model's."""
    node = model
    for part in loc[:-1]:
        field = node.model_fields.get(part) if node is not None and isinstance(part, str) else None
        node = _model_in(field.annotation) if field is not None else None
    if node is None:
        return ""
    names = list(node.model_fields)
    close = close_key(str(loc[-1]), names)
    if close:
        return f"; did you mean {prefix}{'.'.join(map(str, (*loc[:-1], close)))}?"
    section = label or (prefix + ".".join(map(str, loc[:-1]))).rstrip(".") or "the top level"
    return f"; {section} has: {', '.join(names)}"


def _error_lines(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None,
                 label: str | None = None) -> list[str]:
    """One line per error; ``model``: the schema validated (for the keys an unknown one is told apart from),
    ``label``: how to name its top section in those hints."""
    lines = []
    for err in exc.errors():
        parts = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.endswith("Settings")))
        loc = prefix + ".".join(map(str, parts))
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            hint = _unknown_key_hint(model, parts, prefix, label if len(parts) == 1 else None) \
                or "; check the spelling against the method's schema"
            lines.append(f"  {loc}: unknown key (value {value!r}){hint}")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "literal_error" and isinstance(value, str):  # data.name=market: one of a list
                close = close_key(value, re.findall(r"'([^']*)'", err["msg"]))  # "Input should be 'a', 'b' or 'c'"
                if close is not None:
                    msg += f"; did you mean {close!r}?"
            # a section's own check (a model validator) gets the whole section as its input: its message names
            # the keys and values, and the section's dump would bury it
            lines.append(f"  {loc}: {msg}" if isinstance(value, dict) else
                         f"  {loc}: {msg} (got {value!r})" if loc else f"  {msg}")
    return lines


def validate(data: dict[str, Any], source: str = "<dict>") -> Config:
    from .methods import METHODS

    if "method" in data and data["method"] not in METHODS:
        raise ConfigError(f"invalid configuration ({source}):\n  method: {data['method']!r} is not a method; "
                          f"allowed: {', '.join(sorted(METHODS))}")
    lines: list[str] = []
    block = data.get("clustering") or {}
    schema = METHODS[data["method"]].Settings if "method" in data else None
    if schema is not None and isinstance(block, dict):
        # Validated on its own first so its errors carry the full dotted key (clustering.<key>);
        # the rest is then still checked, so one run reports every error.
        try:
            schema.model_validate(block)
        except ValidationError as exc:
            lines += _error_lines(exc, "clustering.", schema, label=f"{data['method']}'s clustering")
            data = {**data, "clustering": {}}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        lines += _error_lines(exc, model=Config)
    if not lines:
        return cfg
    raise ConfigError("\n".join([f"invalid configuration ({source}):", *lines]))


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, check_paths: bool = True,
                method: str | None = None) -> Config:
    """Load, merge and validate a config file plus dotted overrides; by default also check that the dataset
    folders it names exist (the driver's one look at the file system). ``method``: the method the caller
    runs; a config of another is refused before its settings are checked against the wrong schema."""
    data = apply_overrides(read_yaml(path), overrides)
    if method is not None:
        refuse_other_method(data, method, path, "this entry point runs")
    try:
        cfg = validate(data, source=str(path))
    except ConfigError as exc:
        if "required key is missing" in str(exc) and "base" not in _own_keys(path):
            # a file meant as a few changes to the preset is taken whole: say how to build on the preset
            preset = f"{method}_cpu.yaml" if method else "<method>_cpu.yaml"
            raise ConfigError(f"{exc}\n  ({path} has no 'base:' key, so it is read as a whole config; to change a "
                              f"few keys of a preset, start it with 'base: {preset}')") from None
        raise
    if check_paths:
        try:
            cfg.check_paths()
        except DatasetMissing as exc:
            raise DatasetMissing(f"invalid configuration ({path}):\n  {exc}", exc.key) from None
        except ConfigError as exc:
            raise ConfigError(f"invalid configuration ({path}):\n  {exc}") from None
    return cfg


def _own_keys(path: str | os.PathLike) -> set:
    """The top-level keys a config file itself writes (before its base's are merged in)."""
    try:
        own = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return set()
    return set(own) if isinstance(own, dict) else set()


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
