"""StarGAN over the cameras (issue: camera-style transfer): networks, losses, the file contract, training as a
Ray Train job with resume, generation in Ray tasks, and camstyle end to end on StarGAN fakes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_SYNTH
from ureid.config import CONFIG_DIR, ConfigError, load_config, load_gan_config
from ureid.data.camstyle import fake_filename, load_fakes, missing_fakes, parse_fake_filename
from ureid.data.records import Record
from ureid.models.stargan import (Discriminator, Generator, discriminator_loss, generator_loss, learning_rate,
                                  one_hot)


# ----------------------------------------------------------------------------- networks and losses


@pytest.mark.parametrize("h,w,conv,reps,d_reps", [(64, 32, 16, 2, 4), (256, 128, 8, 1, 6)])
def test_generator_and_discriminator_shapes_on_non_square_images(h, w, conv, reps, d_reps):
    g, d = Generator(5, conv, reps), Discriminator(5, h, w, conv, d_reps)
    x = torch.rand(2, 3, h, w) * 2 - 1
    y = g(x, one_hot(torch.tensor([0, 4]), 5))
    assert y.shape == x.shape and y.abs().max() <= 1
    src, cls = d(y)
    assert src.shape == (2, 1, h // 2 ** d_reps, w // 2 ** d_reps)  # the PatchGAN map keeps the aspect
    assert cls.shape == (2, 5)
    # InstanceNorm has no running statistics: eval() gives the same fake as train()
    assert torch.allclose(g.eval()(x, one_hot(torch.tensor([0, 4]), 5)), y, atol=1e-6)


def test_sizes_the_discriminator_cannot_halve_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        Discriminator(3, 72, 32, 8, 4)
    with pytest.raises(ConfigError, match=r"gan.height and gan.width must be multiples of 4 .* got 72x32"):
        load_gan_config("stargan_cpu.yaml", ["gan.height=72"])
    with pytest.raises(ConfigError, match=r"gan: gan.decay_iterations \(1750\) must be at most gan.iterations "
                                          r"\(500\); StarGAN decays over the last half: --set gan.decay_iterations=250") as err:
        load_gan_config("stargan_cpu.yaml", ["gan.iterations=500"])
    assert "{" not in str(err.value)  # the message, not the section's values dumped after it
    with pytest.raises(ConfigError, match=r"gan.n_critc: unknown key \(value 3\); did you mean gan.n_critic\?"):
        load_gan_config("stargan_cpu.yaml", ["gan.n_critc=3"])


def test_configs_follow_the_reference_setting():
    ref = load_gan_config("stargan.yaml").gan
    assert (ref.height, ref.width, ref.repeat_num, ref.conv_dim, ref.batch_size) == (256, 128, 6, 64, 16)
    assert (ref.lambda_cls, ref.lambda_rec, ref.lambda_gp, ref.n_critic) == (1, 10, 10, 5)
    assert (ref.g_lr, ref.beta1, ref.beta2, ref.iterations, ref.decay_iterations) == (1e-4, 0.5, 0.999, 200000, 100000)
    cpu = load_gan_config("stargan_cpu.yaml").gan
    assert (cpu.height, cpu.width) == (64, 32) and cpu.iterations < 10000


def test_learning_rate_is_constant_then_linear_to_zero():
    lr = [learning_rate(1.0, t, 10, 4) for t in range(10)]
    assert lr[:6] == [1.0] * 6
    assert lr[6:] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert learning_rate(1.0, 9, 10, 0) == 1.0


def _fixed_batch(seed=0, n=8, c_dim=3, h=32, w=16):
    gen = torch.Generator().manual_seed(seed)
    # each camera a colour cast over shared content, so the classifier and the generator have something to learn
    content = torch.rand(n, 3, h, w, generator=gen) * 1.2 - 0.6
    cams = torch.arange(n) % c_dim
    casts = torch.tensor([[0.3, -0.2, -0.2], [-0.2, 0.3, -0.2], [-0.2, -0.2, 0.3]])[:c_dim]
    x = (content + casts[cams].view(n, 3, 1, 1)).clamp(-1, 1)
    return x, cams, cams[torch.randperm(n, generator=gen)], torch.rand(n, generator=gen)


def test_one_step_lowers_each_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    g, d = Generator(3, 8, 1), Discriminator(3, 32, 16, 8, 2)
    x, src, trg, alpha = _fixed_batch()
    d_opt = torch.optim.Adam(d.parameters(), 1e-3, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(g.parameters(), 1e-3, betas=(0.5, 0.999))
    with torch.no_grad():
        fake = g(x, one_hot(trg, 3))
    before = discriminator_loss(d, x, fake, src, alpha, 1.0, 10.0)
    d_opt.zero_grad()
    before["total"].backward()
    d_opt.step()
    after = discriminator_loss(d, x, fake, src, alpha, 1.0, 10.0)
    assert after["total"] < before["total"]
    assert after["d_cls"] < before["d_cls"]
    g_before = generator_loss(g, d, x, src, trg, 1.0, 10.0, 3)
    g_opt.zero_grad()
    g_before["total"].backward()
    g_opt.step()
    g_after = generator_loss(g, d, x, src, trg, 1.0, 10.0, 3)
    assert g_after["total"] < g_before["total"]
    assert g_after["g_rec"] < g_before["g_rec"]


def test_cycle_to_the_source_camera_is_close_to_identity_after_a_few_steps():
    """G(G(x, c), c) with the target equal to the source camera: L1 to x far below the untrained network's."""
    torch.manual_seed(1)
    g, d = Generator(3, 16, 1), Discriminator(3, 32, 16, 8, 2)
    x, src, _, alpha = _fixed_batch(seed=1)
    d_opt = torch.optim.Adam(d.parameters(), 1e-3, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(g.parameters(), 1e-3, betas=(0.5, 0.999))

    def self_cycle():
        with torch.no_grad():
            c = one_hot(src, 3)
            return float((g(g(x, c), c) - x).abs().mean())

    untrained = self_cycle()
    for step in range(200):
        trg = src[torch.randperm(len(src))]
        with torch.no_grad():
            fake = g(x, one_hot(trg, 3))
        loss = discriminator_loss(d, x, fake, src, alpha, 1.0, 10.0)["total"]
        d_opt.zero_grad()
        loss.backward()
        d_opt.step()
        loss = generator_loss(g, d, x, src, trg, 1.0, 10.0, 3)["total"]  # n_critic 1: a short test
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
    trained = self_cycle()
    assert untrained > 0.3
    assert trained < 0.15 and trained < untrained / 3


# ----------------------------------------------------------------------------- the file contract


@pytest.mark.parametrize("stem", ["0001_c1s1_001051_00", "a_fake_c2", "-1_c6s2_000001_03"])
@pytest.mark.parametrize("cam", [0, 5, 14])
def test_fake_names_round_trip(stem, cam):
    name = fake_filename(f"/data/bounding_box_train/{stem}.jpg", cam)
    assert parse_fake_filename(name) == (stem, cam)
    assert parse_fake_filename(f"{stem}.jpg") is None or stem.endswith("_fake_c2")


def test_load_fakes_reads_back_source_and_target_camera(tmp_path):
    train = [Record((str(tmp_path / f"{i:04d}_c{c + 1}s1_000001_00.jpg"),), pid=i, camid=c)
             for i, c in [(1, 0), (2, 2)]]
    out = tmp_path / "fakes"
    out.mkdir()
    for rec in train:
        assert missing_fakes(rec.path, [0, 1, 2], rec.camid, out) == [c for c in (0, 1, 2) if c != rec.camid]
        for cam in missing_fakes(rec.path, [0, 1, 2], rec.camid, out):
            (out / fake_filename(rec.path, cam)).write_bytes(b"x")
        assert missing_fakes(rec.path, [0, 1, 2], rec.camid, out) == []
    (out / "notes.txt").write_text("not a fake")
    got = sorted((src, r.camid, r.pid, r.is_fake) for src, r in load_fakes(out, train))
    assert got == [(0, 1, 1, True), (0, 2, 1, True), (1, 0, 2, True), (1, 1, 2, True)]


def test_a_single_camera_dataset_is_refused():
    from ureid.data.camstyle import camera_domains

    recs = [Record((f"/d/{i}.jpg",), pid=i, camid=3) for i in range(4)]
    with pytest.raises(ValueError, match=r"1 camera\(s\) \[3\]; a StarGAN over cameras needs at least 2"):
        camera_domains(recs, "data.root /d")
    cams, domains = camera_domains(recs + [Record(("/d/x.jpg",), pid=9, camid=7)], "data.root /d")
    assert cams == [3, 7] and domains.tolist() == [0, 0, 0, 0, 1]


# ----------------------------------------------------------------------------- camstyle's keys


def _camstyle_cfg(*extra):
    return load_config(CONFIG_DIR / "camstyle_cpu.yaml", list(extra), check_paths=False)


def test_camstyle_eq8_lambda_on_distance_is_buc_with_inverse_penalty():
    """``lambda D + R`` orders pairs as ``D + R / lambda``: the update equals a dense brute force of eq. 8 read
    that way, and differs from lambda on the diversity term."""
    from test_clustering_buc import reference_buc, unit_features

    from ureid.methods import get_method
    from ureid.methods.base import Targets, UpdateContext

    rng = np.random.default_rng(0)
    x = unit_features(rng, 120, 8)
    labels = np.concatenate([np.arange(60) // 4, 15 + np.arange(60)])  # clusters of 4 and singletons
    method = get_method("camstyle")
    ctx = UpdateContext(num_real=120, cameras=np.zeros(120, dtype=np.int64), is_fake=None,
                        known_labels=np.full(120, -1), stage=0, seed=0)
    out = {}
    for on in ("distance", "diversity"):
        cfg = _camstyle_cfg("clustering.size_penalty=0.05", f"clustering.lambda_on={on}", "clustering.merge_percent=0.3")
        out[on] = method.update(cfg, x, Targets(labels=labels), ctx).labels
    assert np.array_equal(out["distance"], reference_buc(x, labels, 36, 1 / 0.05))
    assert np.array_equal(out["diversity"], reference_buc(x, labels, 36, 0.05))
    assert not np.array_equal(out["distance"], out["diversity"])
    with pytest.raises(ConfigError, match="lambda_on: distance scales the distance by size_penalty"):
        _camstyle_cfg("clustering.size_penalty=0", "clustering.lambda_on=distance")


def test_camstyle_fake_fake_distances_ignored_or_used():
    from test_clustering_buc import reference_buc, unit_features

    from ureid.methods import get_method
    from ureid.methods.base import Targets, UpdateContext

    rng = np.random.default_rng(1)
    x = unit_features(rng, 90, 6)
    fake = np.arange(90) >= 30
    labels = np.arange(90)
    ctx = UpdateContext(num_real=30, cameras=np.zeros(90, dtype=np.int64), is_fake=fake,
                        known_labels=np.full(90, -1), stage=0, seed=0)
    method = get_method("camstyle")
    for mode, mask in (("ignore", fake), ("use", None)):
        cfg = _camstyle_cfg(f"clustering.fake_fake={mode}", "clustering.merge_percent=0.5")
        got = method.update(cfg, x, Targets(labels=labels), ctx).labels
        assert np.array_equal(got, reference_buc(x, labels, 15, cfg.clustering.size_penalty, is_fake=mask))


# ----------------------------------------------------------------------------- on Ray: train, resume, generate


def _gan_overrides(root, out):
    return [f"data.root={root}", "gan.height=32", "gan.width=16", "gan.conv_dim=8", "gan.repeat_num=1",
            "gan.d_conv_dim=8", "gan.d_repeat_num=2", "gan.iterations=10", "gan.decay_iterations=5",
            "gan.batch_size=4", "gan.log_every=2", "gan.checkpoint_every=5", "gan.sample_every=5",
            "gan.sample_images=4", "gan.generate_chunk=50", "ray.num_workers=2", "ray.cpus_per_worker=1",
            f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "tracking.experiment=test-stargan",
            *[f"data.synthetic.{k}={v}" for k, v in TINY_SYNTH.items()]]


def _train_records(root):
    from ureid.data.formats import load_dataset

    return load_dataset("market1501", root).train


@pytest.fixture(scope="module")
def stargan(ray_cluster, tiny_root, tmp_path_factory):
    """A tiny StarGAN trained on 2 workers and its fakes, through camstyle's cache (as camstyle makes them)."""
    from ureid.runtime.stargan import ensure_stargan_fakes

    out = tmp_path_factory.mktemp("stargan")
    gcfg = load_gan_config("stargan_cpu.yaml", _gan_overrides(tiny_root, out))
    folder = ensure_stargan_fakes(gcfg, _train_records(tiny_root), quiet=True)
    return {"gcfg": gcfg, "fakes": folder, "cache": folder.parent, "out": out,
            "run": json.loads((folder.parent / "run.json").read_text())}


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def test_training_job_logs_losses_and_sample_grids_and_writes_one_fake_per_other_camera(stargan, tiny_root):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    run = stargan["run"]
    client = MlflowClient(run["tracking_uri"])
    info = client.get_run(run["run_id"])
    assert info.info.status == "FINISHED" and info.data.tags["ureid.kind"] == "stargan"
    for name in ("d_loss", "d_gp", "d_cls", "lr", "iterations_per_s"):
        steps = [m.step for m in client.get_metric_history(run["run_id"], name)]
        assert sorted(steps) == [2, 4, 5, 6, 8, 10], name  # every log_every, and at every checkpoint
    for name in ("g_loss", "g_rec", "g_cls", "g_adv"):  # the generator steps every n_critic = 5 iterations
        assert sorted(m.step for m in client.get_metric_history(run["run_id"], name)) == [5, 10], name
    samples = sorted(a.path for a in client.list_artifacts(run["run_id"], "samples"))
    assert samples == ["samples/iter_0000005.png", "samples/iter_0000010.png"]
    grid = Image.open(Path(run["run_dir"]) / "samples.png")
    assert grid.size == (4 * 16, (1 + 6) * 32)  # 4 real images, then one row per target camera of the 6

    train = _train_records(tiny_root)
    files = sorted(p.name for p in stargan["fakes"].iterdir())
    assert len(files) == len(train) * 5
    for rec in train:
        cams = sorted(cam for name in files if (parsed := parse_fake_filename(name)) and parsed[0] == Path(rec.path).stem
                      for cam in [parsed[1]])
        assert cams == [c for c in range(6) if c != rec.camid]  # never the image's own camera
    assert len(load_fakes(stargan["fakes"], train)) == len(files)


def test_generation_skips_what_exists_and_gives_the_same_bytes(stargan, tiny_root, tmp_path):
    from ureid.runtime.stargan import generate_fakes

    folder, model, train = stargan["fakes"], stargan["cache"] / "stargan.pt", _train_records(tiny_root)
    before = _files(folder)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = generate_fakes(model, train, folder, stargan["gcfg"].ray, quiet=True)
    assert again["written"] == 0 and again["skipped_sources"] == len(train)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    gone = sorted(before)[::7]
    for name in gone:
        (folder / name).unlink()
    redo = generate_fakes(model, train, folder, stargan["gcfg"].ray, quiet=True)
    assert redo["written"] == len(gone)
    assert _files(folder) == before  # the same checkpoint gives the same bytes
    other = generate_fakes(model, train, tmp_path / "elsewhere", stargan["gcfg"].ray, chunk=4, quiet=True)
    assert other["tasks"] == -(-len(train) // 4) and _files(tmp_path / "elsewhere") == before


def test_resume_continues_at_the_saved_iteration_with_the_uninterrupted_weights(stargan, tmp_path, capfd):
    """A run that lost everything after its iteration-5 checkpoint, resumed: it restarts at 5 (3 more reports)
    and ends with the generator of the run that never stopped. Not quiet: its workers' lines come through the
    driver's progress display, not as a line per log step prefixed with a worker's pid."""
    from ureid.runtime.stargan import LOSSES_FILE, train_stargan

    copy = tmp_path / "interrupted"
    shutil.copytree(stargan["run"]["run_dir"], copy)
    for ckpt in copy.glob("ray/*/iter_0000010"):
        shutil.rmtree(ckpt)
    lines = (copy / LOSSES_FILE).read_text().splitlines()
    (copy / LOSSES_FILE).write_text("".join(f"{line}\n" for line in lines if json.loads(line)["iteration"] <= 5))
    (copy / "stargan.pt").unlink()
    capfd.readouterr()
    summary = train_stargan(stargan["gcfg"], resume=copy)
    assert summary["iterations"] == 10
    said = "".join(capfd.readouterr())
    assert "\n[ureid] StarGAN resumed at iteration 5\n" in f"\n{said}", said  # relayed, no worker's prefix
    assert "StarGAN iteration" not in said and "RayTrainWorker" not in said and "progress display" not in said, said
    assert "[ureid] StarGAN over 6 cameras" in said
    assert [json.loads(line)["iteration"] for line in (copy / LOSSES_FILE).read_text().splitlines()] == [2, 4, 5, 6, 8, 10]
    resumed = torch.load(copy / "stargan.pt", weights_only=False)["G"]
    full = torch.load(stargan["cache"] / "stargan.pt", weights_only=False)["G"]
    assert resumed.keys() == full.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


def test_camstyle_end_to_end_on_stargan_fakes(stargan, tiny_root, tmp_path):
    """camstyle with style_transfer stargan and the same GAN config reuses the cached GAN and its fakes (no
    second training), trains on support sets of the real image and its L-1 fakes, and evaluates on real images."""
    from test_pipeline import tiny_cfg

    from ureid.methods import get_method
    from ureid.runtime.experiment import load_run_data, run_experiment

    gan_keys = [o for o in _gan_overrides(tiny_root, "x") if o.startswith("gan.")]
    cfg = tiny_cfg("camstyle", tiny_root, tmp_path, "clustering.style_transfer=stargan",
                   f"clustering.stargan_set=[{', '.join(gan_keys)}]", "tracking.pictures=false")
    data = load_run_data(cfg.with_absolute_paths(), get_method("camstyle"))
    n = data.num_real
    assert len(data.train) == 6 * n and data.is_fake.sum() == 5 * n
    assert all(Path(r.path).parent == stargan["fakes"] for r in data.train[n:])
    support = data.extra["support"]
    for i in range(n):
        cams = sorted(data.train[j].camid for j in support[i])
        assert support[i][0] == i and cams == list(range(6))  # the real image, then one fake per other camera
    runs_before = len(list(Path(stargan["out"]).glob("stargan-*")))
    summary = run_experiment(cfg, quiet=True)
    assert len(list(Path(stargan["out"]).glob("stargan-*"))) == runs_before  # reused, not retrained
    assert [h["stage"] for h in summary["history"]] == [0, 1]
    assert summary["history"][-1]["num_clusters"] < n  # clusters count real images; fakes are augmentation
    assert 0 <= summary["selected"]["mAP"] <= 1


def test_cli_generate_and_train_errors(stargan, tiny_root, tmp_path, capsys):
    from ureid.cli import main

    out = tmp_path / "cli_fakes"
    assert main(["camstyle", "generate", "--checkpoint", str(stargan["run"]["run_dir"]), "--data", str(tiny_root),
                 "--out", str(out)]) == 0
    assert _files(out) == _files(stargan["fakes"])  # a run folder resolves to its generator: the same bytes
    assert f"clustering.fake_root={out}" in capsys.readouterr().out
    assert main(["camstyle", "generate", "--checkpoint", str(tmp_path), "--data", str(tiny_root)]) == 2
    assert "no StarGAN generator there" in capsys.readouterr().err
    assert main(["camstyle", "train", "--set", "gan.lambda_gpp=1"]) == 2
    assert "gan.lambda_gpp: unknown key" in capsys.readouterr().err
