"""Packaging: the stdlib `platform` module is never shadowed, and the `ureid` command is installed."""

import shutil
import subprocess
import sys
from pathlib import Path

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


def test_cluster_yaml_is_a_valid_local_launcher_config():
    import json

    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)  # raises on an unknown key or a wrong type
    assert cfg["provider"]["type"] == "local"
    assert any("scripts/bootstrap.sh" in c for c in cfg["setup_commands"]), "every node must install the project"
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c), "every node must start with token auth"
    assert not any("0.0.0.0" in c for c in starts), "the dashboard must not listen on every interface"
    from ureid.runtime.tasks import SLOT

    assert all(f'\\"{SLOT}\\"' in c for c in starts if "ray start" in c), "every node must declare clustering slots"


def test_light_modules_do_not_import_torchvision():
    # Spawned DDP/Ray workers import the losses and the training step; torchvision costs seconds there.
    code = ("import sys, ureid.models.losses, ureid.engine.train, ureid.engine, ureid.models; "
            "assert 'torchvision' not in sys.modules; "
            "assert ureid.engine.step_lr is ureid.engine.train.step_lr; "
            "assert ureid.models.ClassifierHead is ureid.models.losses.ClassifierHead; "
            "assert 'torchvision' not in sys.modules; ureid.models.ReidNet; "
            "assert 'torchvision' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
