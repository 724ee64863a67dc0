"""Shared fixtures: a real local Ray cluster and a tiny synthetic dataset.

Ray 2.60 turns token auth on for clusters it starts; every process of the test session runs with
``RAY_AUTH_MODE=disabled`` (set here, before Ray is imported, so workers inherit it).
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402

TINY_SYNTH = {"seed": 3, "num_train_ids": 6, "num_test_ids": 4, "num_distractors": 6, "num_junk": 3,
              "min_images": 3, "max_images": 5, "mean_images": 4, "height": 32, "width": 16}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance with exactly 2 CPUs: two train workers hold every CPU slot, so the
    feature-store actor must not need one (the deadlock the design warns about). With its dashboard:
    Ray Train's PlacementGroupCleaner needs the State API to free the placement group of a trial that
    ASHA stopped; without it the group leaks and the next trial waits forever for its CPU."""
    import ray

    from ureid.runtime.tasks import SLOT

    ray.init(num_cpus=2, resources={SLOT: 2}, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    from ureid.data.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "tiny"
    generate(root, **TINY_SYNTH)
    return root
