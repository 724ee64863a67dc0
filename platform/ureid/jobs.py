"""Jobs a method may ask the runtime for, without importing it: a plain dict of runners.

Methods never import :mod:`ureid.runtime` (the runtime calls them, not the reverse). A method that needs
more than its stage loop - camstyle needs a trained StarGAN and its fakes before its data can be read - asks
for a job by name from its ``prepare`` hook, which runs in the driver; the runtime registers its runners here
when it is imported (it always is before ``prepare`` runs)::

    from ureid import jobs
    folder = jobs.run("stargan_fakes", gan_config, records)
"""

from __future__ import annotations

from typing import Any, Callable

RUNNERS: dict[str, Callable[..., Any]] = {}


def register(name: str, runner: Callable[..., Any]) -> Callable[..., Any]:
    RUNNERS[name] = runner
    return runner


def run(name: str, *args, **kwargs):
    if name not in RUNNERS:
        raise RuntimeError(f"no runner for the job {name!r} (registered: {', '.join(sorted(RUNNERS)) or 'none'}); "
                           f"jobs run inside ureid.runtime (run_experiment, run_sweep, the ureid command)")
    return RUNNERS[name](*args, **kwargs)
