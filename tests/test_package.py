"""Packaging: the stdlib `platform` module is never shadowed, and the `ureid` command is installed."""

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_platform_folder_does_not_shadow_stdlib():
    assert not (REPO / "platform" / "__init__.py").exists()
    code = "import platform, ureid; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    system, where = out.stdout.split()
    assert system and not where.startswith(str(REPO)), where


def test_console_script_and_entry_point_help():
    exe = shutil.which("ureid", path=str(Path(sys.executable).parent))
    assert exe, "pip install -e . must provide the `ureid` command"
    out = subprocess.run([exe, "run", "buc", "--print-config", "--set", "seed=7"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "method: buc" in out.stdout and "seed: 7" in out.stdout
    # experiments/ssl.py must not shadow the stdlib ssl module that Ray and MLflow import.
    out = subprocess.run([sys.executable, "experiments/ssl.py", "--print-config"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "method: ssl" in out.stdout


@pytest.mark.parametrize("argv, said", [
    (["export", "RUN", "--output", "m.pt2"], "ureid export: error: unrecognized arguments: --output m.pt2"),
    (["data", "info", "--root", "D", "--bogus"], "ureid data info: error: unrecognized arguments: --bogus"),
    (["camstyle", "train", "--nope"],
     "ureid camstyle train: error: unrecognized arguments: --nope"),
    (["compare", "--nope"], "ureid compare: error: unrecognized arguments: --nope"),
])
def test_an_unknown_option_is_reported_with_its_commands_usage(argv, said, capsys):
    """`ureid export RUN --output X` showed the top level's usage (the command list), which does not name the
    option meant (--out); the error now comes with the usage of the command it was given to."""
    from ureid.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.startswith(f"usage: {said.split(':')[0]} [-h]"), err
    assert err.rstrip().endswith(said), err


@pytest.mark.parametrize("argv, said", [
    (["run", "buc", "--set", "clustering.merge_percent=1.5"], "invalid configuration ("),
    (["tune", "buc", "--set", "clustering.merge_percent=1.5"], "invalid configuration ("),
    (["camstyle", "train", "--set", "nope=1"], "invalid StarGAN configuration ("),
    (["compare", "--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri http://127.0.0.1:9: no MLflow server"),
    # MLflow's own refusal (a traceback): a folder is its file store, and a SQLite file's folder it cannot make
    (["run", "buc", "--set", "tracking.tracking_uri=/nonexistent/mlruns"],
     "tracking.tracking_uri=/nonexistent/mlruns: a folder, MLflow's file store, which mlflow 3."),
    (["tune", "buc", "--set", "tracking.tracking_uri=sqlite:////proc/x/m.db"],
     "tracking.tracking_uri=sqlite:////proc/x/m.db: cannot make the folder /proc/x (No such file or directory)"),
])
def test_every_entry_point_says_a_users_error_alike(argv, said, capsys):
    """One prefix, one line of cause, exit status 2: a bad config said `error:` where a bad layout or a locked
    run said `ureid: error:` (experiments/<method>.py and sweep.py reach the same handlers without main())."""
    from ureid.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ureid: error: {said}"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, usage", [
    (["run", "--help"], "usage: ureid run [-h]"),
    (["run", "-h"], "usage: ureid run [-h]"),
    (["run", "ssl", "--help"], "usage: ureid run ssl [-h]"),
    (["tune", "--help"], "usage: ureid tune [-h]"),
    (["tune", "dbc", "-h"], "usage: ureid tune [-h]"),
])
def test_help_of_the_commands_that_pass_their_options_on(argv, usage, capsys):
    """`ureid run --help` and `ureid tune --help` print the options they pass on (before: an error about a
    missing method, and "unrecognized arguments: --help")."""
    from ureid.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    out = capsys.readouterr()
    assert done.value.code == 0, out.err
    assert out.out.startswith(usage) and "--set KEY=VALUE" in out.out
    assert "cluster_contrast" in out.out or argv[1:2] == ["ssl"]  # the method list, where the method is open


def test_a_missing_method_names_only_the_method(capsys):
    from ureid.cli import main

    with pytest.raises(SystemExit) as done:
        main(["run"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.rstrip().endswith("the following arguments are required: method"), err


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-aws.yaml"])
def test_cluster_yamls_are_valid_launcher_configs(name):
    import json

    import jsonschema
    import ray
    import yaml

    from ureid.runtime.tasks import SLOT

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / name).read_text())
    jsonschema.validate(cfg, schema)  # raises on an unknown key or a wrong type
    assert any("scripts/bootstrap.sh" in c for c in cfg["setup_commands"]), "every node must install the project"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and not any("ray stop" in c for c in starts), "never `ray stop` a machine's other clusters"
    assert all("RAY_AUTH_MODE=token" in c for c in starts), "every node must start with token auth"
    assert all("--dashboard-host=127.0.0.1" in c for c in starts if "--head" in c), "dashboard on the private address"
    assert not any("0.0.0.0" in c for c in starts), "the dashboard must not listen on every interface"
    # The launcher runs commands after `export OMP_NUM_THREADS=1`, which a plain `nproc` obeys (1 slot a node).
    assert not any("$(nproc)" in c for c in starts), "count cores with `env -u OMP_NUM_THREADS nproc`"
    # rsync matches an unanchored pattern against every folder: a bare "data" also drops platform/ureid/data.
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    parts = {part for f in tracked for part in Path(f).parts}
    for pattern in cfg.get("rsync_exclude", []):
        if not pattern.startswith("/"):
            assert not fnmatch.filter(parts, pattern.split("/")[-1]), f"rsync_exclude {pattern!r} drops tracked files"
    if cfg["provider"]["type"] == "local":
        assert all(f'\\"{SLOT}\\"' in c for c in starts), "every node must declare clustering slots"
    else:  # the autoscaler starts each node type with its declared resources
        assert cfg["provider"]["type"] == "aws"
        assert all(t["resources"].get(SLOT, 0) > 0 for t in cfg["available_node_types"].values())
        images = [cfg["docker"]["head_image"], cfg["docker"]["worker_image"]]
        assert all(i.startswith("rayproject/ray:2.60.0-") and "ray-ml" not in i for i in images)
        assert images[1].endswith("-gpu")
        assert any("InstanceType" in t["node_config"] and t["node_config"]["InstanceType"].startswith(("g", "p"))
                   for t in cfg["available_node_types"].values()), "a GPU worker node type"

    cfg["setup_comands"] = cfg.pop("setup_commands")  # a misspelt key is rejected with the schema's message
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed .*setup_comands"):
        jsonschema.validate(cfg, schema)


def _prints_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter (what a spawned worker imports); it must print ok."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_light_modules_do_not_import_torchvision():
    # Spawned DDP/Ray workers import the losses and the training step; torchvision costs seconds there.
    code = ("import sys, ureid.models.losses, ureid.engine.train, ureid.engine, ureid.models; "
            "assert 'torchvision' not in sys.modules; "
            "assert ureid.engine.step_lr is ureid.engine.train.step_lr; "
            "assert ureid.models.ClassifierHead is ureid.models.losses.ClassifierHead; "
            "assert 'torchvision' not in sys.modules; ureid.models.ReidNet; "
            "assert 'torchvision' in sys.modules; print('ok')")
    _prints_ok(code)


def test_the_cli_and_the_method_registry_do_not_import_torch():
    # `ureid --help` and `ureid run --help` (which lists the registered methods) took 4 s on two cores,
    # 2 of them importing torch through ureid.clustering; the clustering exports now load on first use.
    code = "\n".join([
        "import sys, contextlib, io, ureid.methods, ureid.clustering",
        "from ureid.cli import main",
        "out = io.StringIO()",
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):",
        "    main(['run', '--help'])",
        "assert '{buc,camstyle,cluster_contrast,dbc,pul,ssl}' in out.getvalue(), out.getvalue()",
        "assert 'torch' not in sys.modules and 'faiss' not in sys.modules, 'eager'",
        "assert ureid.clustering.bottom_up_merge.__module__ == 'ureid.clustering.buc'",
        "from ureid.clustering import kmeans, dbscan",
        "assert 'torch' in sys.modules",
        "print('ok')"])
    _prints_ok(code)


def test_the_store_and_clustering_tasks_do_not_import_ray_train():
    # The feature store and every clustering task's worker import ureid.runtime; StarGAN's job module (Ray
    # Train, pandas, Ray Data: ~85 MB and half a second a process) is imported when the job first runs.
    code = ("import sys, ureid.runtime.feature_store, ureid.runtime.tasks, ureid.methods; "
            "from ureid import jobs; "
            "assert 'ray.train' not in sys.modules and 'ureid.runtime.stargan' not in sys.modules, 'eager'; "
            "assert 'stargan_fakes' in jobs.RUNNERS; "
            "import ureid.runtime.stargan; print('ok')")
    _prints_ok(code)


def test_a_local_start_makes_rays_token_the_users_alone(tmp_path, monkeypatch, capsys):
    """Ray 2.60's local start generates ~/.ray/auth_token readable by every local user (mode 644, umask 022):
    ``private_local_token`` makes it first, mode 600 in a 700 folder, and Ray's own loader reads that token;
    an existing readable one is named with its fix and left alone; nothing when auth is off or given."""
    import os
    import stat

    from ureid.runtime.job import private_local_token

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    token = home / ".ray" / "auth_token"
    assert private_local_token() == token
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    value = token.read_text()
    assert len(value) == 64 and int(value, 16) >= 0
    code = ("from ray._raylet import AuthenticationTokenLoader as L; "
            "print(L.instance().get_raw_token() if L.instance().has_token(ignore_auth_mode=True) else 'none')")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_AUTH_MODE": "token"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == value, out.stderr[-2000:]

    assert private_local_token() == token and token.read_text() == value  # kept, not replaced
    assert capsys.readouterr().out == ""
    token.chmod(0o644)
    private_local_token()
    assert f"{token} may be read by other users (mode 644)" in capsys.readouterr().out
    assert stat.S_IMODE(token.stat().st_mode) == 0o644 and token.read_text() == value  # the user's file

    token.unlink()
    for var, val in (("RAY_AUTH_MODE", "disabled"), ("RAY_AUTH_TOKEN", "x" * 64), ("RAY_AUTH_TOKEN_PATH", "/t")):
        with monkeypatch.context() as m:
            m.setenv(var, val)
            assert private_local_token() is None and not token.exists()
    monkeypatch.setenv("RAY_AUTH_MODE", "TOKEN")
    assert private_local_token() == token and token.exists()


def test_rays_opt_out_advice_is_dropped_and_its_auth_off_warning_kept():
    """Ray 2.60 logs "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out" at every local
    start; the filter a local start of ensure_ray puts on Ray's logger drops that line and no other."""
    import logging

    from ray._private.authentication import authentication_token_setup as ray_auth

    from ureid.runtime import job

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(job.RAY_AUTH_LOGGER)
    assert ray_auth.logger is logger
    logger.addHandler(handler)
    try:
        ray_auth._warn_token_auth_enabled()
        assert len(seen) == 1 and "to opt out" in seen[0]  # what every local run printed
        seen.clear()
        logger.addFilter(job._NO_OPT_OUT_ADVICE)
        ray_auth._warn_token_auth_enabled()
        ray_auth._warn_token_auth_disabled()
        assert len(seen) == 1 and seen[0].startswith("Token authentication is disabled"), seen
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(job._NO_OPT_OUT_ADVICE)


def test_an_output_dir_that_cannot_be_made_names_the_key(tmp_path, capsys):
    """`--set output_dir=/proc/x` said only "[Errno 2] No such file or directory: '/proc/x'"."""
    from ureid.cli import main

    afile = tmp_path / "afile"
    afile.write_text("")
    for value, why in ((afile, "a file of that name is there"), (afile / "sub", "Not a directory")):
        for command in (["run", "buc"], ["tune", "buc"]):
            assert main([*command, "--set", f"output_dir={value}"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"ureid: error: output_dir={value}: cannot make the folder {value} ({why})"), err


def test_a_run_stopped_with_ctrl_c_exits_130(monkeypatch, capsys):
    """After Ctrl-C, Ray Train aborts the run and its driver ends in SystemExit(1): `ureid run` exited 1, as a
    failure, where a stopped sweep exits 130. The run itself says it stopped and how to continue
    (Job.failing_loudly; seen with a real Ctrl-C by hand); here the entry point's status for what it raises."""
    import ureid.runtime.experiment as experiment
    from ureid.cli import main

    for raised in (SystemExit(1), KeyboardInterrupt()):
        def stopped(*args, raised=raised, **kwargs):
            raise raised
        monkeypatch.setattr(experiment, "run_experiment", stopped)
        assert main(["run", "buc"]) == 130
    assert "Traceback" not in capsys.readouterr().err
