"""The runtime: Ray and MLflow around the pure parts. It never names a method.

``job``            a tracked Ray Train job: run folder, resume, MLflow run (optionally a child of a parent
                   run), Ray started or joined, one ``TorchTrainer`` launched with a list of callbacks.
                   The stage-loop run, a sweep trial and a GAN training job are all jobs.
``experiment``     the stage-loop run of a method: data read once, the feature store, the summary.
``stage_loop``     the per-worker loop inside ``TorchTrainer``; it calls only the method's hooks.
``feature_store``  the actor holding a stage's global features; it runs the method's update.
``tasks``          the ``map_blocks`` executor: an update's row blocks as parallel Ray tasks.
``callbacks``      Ray Train callbacks: per-stage MLflow metrics and the run's history file.
``stargan``        StarGAN jobs: training on Ray Train (its per-worker loop in ``gan_loop``), generation
                   in Ray tasks, the cache; registered in :mod:`ureid.jobs` for methods that ask for them.
"""

from .. import jobs


def _stargan_fakes(*args, **kwargs):
    """The ``stargan_fakes`` job (:func:`.stargan.ensure_stargan_fakes`), its module imported on first use: the
    feature store and every clustering task import this package, and that module brings in Ray Train, pandas
    and Ray Data, which they never use (measured: half a second and 60-85 MB per process)."""
    from .stargan import ensure_stargan_fakes

    return ensure_stargan_fakes(*args, **kwargs)


jobs.register("stargan_fakes", _stargan_fakes)
