"""Ray Tune sweeps: every trial is one stage-loop run (a :class:`~.job.Job` with ``TuneReportCallback``), so
ASHA can stop a trial after any stage; MLflow holds one parent run per sweep and one child per trial.

Layout of a sweep folder ``<output_dir>/sweep-<method>-<time>-<id>/``::

    sweep.json      what --resume needs: the base config, the space, searcher, scheduler, parent run
    tune/           Ray Tune's experiment state
    trials/<name>/  each trial's run folder (config.yaml, history.jsonl, checkpoints, summary.json)
    trials.csv      one row per trial: status, parameters, stages, selected stage and its scores
    best.yaml       the best trial's config: ``ureid run --config best.yaml`` reproduces its stages

The objective is the sweep's selection criterion (``schedule.select``; a label-free score by default,
never the test-set mAP unless ``oracle_map`` is asked for by name): ASHA compares trials on it after every
stage, and the best trial is the one whose selected stage scores best on it.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import secrets
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from ..config import ConfigError, apply_overrides, close_key, read_yaml, refuse_other_method, validate
from .. import tracking

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


# ----------------------------------------------------------------------------- spaces


def load_space(method, path: str | os.PathLike | None = None) -> tuple[dict, str]:
    """The search space ``{dotted key: {kind: args}}`` of a YAML file (``space:`` block), else the method's own."""
    if path is None:
        return copy.deepcopy(method.search_space), f"the default space of {method.name}"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep space {path}: file not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("space"), dict):
        raise ConfigError(f"sweep space {path}: expected a mapping with a 'space:' block of dotted config keys")
    return data["space"], str(path)


def _set(data: dict, key: str, value) -> dict:
    out = copy.deepcopy(data)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _probe_values(kind: str, args) -> list:
    if kind in ("uniform", "loguniform", "randint"):
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
                and args[0] < args[1]):
            raise ValueError(f"{kind} needs [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {args!r}")
        return [args[0], args[1] - 1] if kind == "randint" else list(args)
    if not (isinstance(args, list) and args):
        raise ValueError(f"{kind} needs a non-empty list of values, got {args!r}")
    return list(args)


def check_space(base: dict, space: dict, source: str) -> None:
    """Reject a space naming a key the method's config does not have, or a value the schema refuses
    (both ends of every range, every listed value), before any trial starts."""
    lines = []
    known = validate(copy.deepcopy(base), source=source).to_dict()
    for key, spec in space.items():
        node = known
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                close = close_key(part, node) if isinstance(node, dict) else None
                hint = f"; did you mean {'.'.join([*parts[:depth], close])}?" if close else ""
                lines.append(f"  {key}: not a key of the {base.get('method')} config{hint}")
                break
            node = node[part]
        else:
            if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
                lines.append(f"  {key}: expected one of {{{', '.join(KINDS)}}}: [...], got {spec!r}")
                continue
            kind, args = next(iter(spec.items()))
            try:
                values = _probe_values(kind, args)
            except ValueError as exc:
                lines.append(f"  {key}: {exc}")
                continue
            for value in values:
                try:
                    validate(_set(base, key, value), source=source)
                except ConfigError as exc:
                    why = "; ".join(line.strip() for line in str(exc).splitlines()[1:])
                    lines.append(f"  {key}: {kind} {args!r} reaches {value!r}, which the schema refuses ({why})")
                    break
    if lines:
        raise ConfigError("\n".join([f"invalid sweep space ({source}):", *lines]))


def tune_domains(space: dict) -> dict:
    make = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](args) for key, spec in space.items() for kind, args in spec.items()}


# ----------------------------------------------------------------------------- the trial


def trial_name(sweep_id: str, trial) -> str:
    """Deterministic within a sweep (the trial's creation index), unique across sweeps (the sweep id). The
    index is the leading counter of Tune's experiment tag, which every search generator sets (and keeps in
    its saved state); Tune's trial ids are indices for the random/grid generator but random hex for
    searchers such as Optuna's."""
    return f"{sweep_id}-{int(trial.experiment_tag.split('_', 1)[0]):05d}"


def _tried(params: dict) -> str:
    """A trial's values, each swept key by its last part: ``merge_percent=0.15  size_penalty=0.0042``."""
    return "  ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float) else
                     f"{key.rsplit('.', 1)[-1]}={value}" for key, value in params.items())


class SweepProgress(tune.Callback):
    """Prints a line as each trial starts, finishes a stage, ends or fails: a sweep's own account of its
    trials, which run quietly (their workers' epoch and stage lines, each prefixed by Ray with the worker's
    pid, came through interleaved across trials). A module-level class holding plain values only: Tune keeps
    its callbacks in the sweep's saved state, which --resume unpickles."""

    def __init__(self, objective: str, num_stages: int, sweep_dir: str | None = None):
        self.objective, self.num_stages, self.sweep_dir = objective, num_stages, sweep_dir

    @staticmethod
    def _say(text: str) -> None:
        print(f"[ureid] {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(f"trial {trial} started: {_tried(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "stages_done" in result:
            score = result.get(self.objective)
            said = f", {self.objective} {score:.4f}" if isinstance(score, (int, float)) else ""
            self._say(f"trial {trial}: stage {result['stages_done'] - 1} ({result['stages_done']}/{self.num_stages}) "
                      f"done{said}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("stages_done", 0)
        # The trial's own folder knows best: a trial resumed after its last stage (the sweep's driver stopped
        # between the stage's end and its report to Tune) finishes without reporting again.
        run = _latest_run(Path(self.sweep_dir) / "trials" / str(trial)) if getattr(self, "sweep_dir", None) else None
        finished = done >= self.num_stages or (run is not None and (run / "summary.json").is_file())
        how = "finished" if finished else f"stopped after {done} of {self.num_stages} stages (ASHA)"
        self._say(f"trial {trial} {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"trial {trial} failed (its error: in the table at the end, trials.csv and its MLflow run)")


# Set while a sweep's driver stops on Ctrl-C (see _NotesCtrlC).
_STOPPED = threading.Event()


class _NotesCtrlC(tune.Callback):
    """Notes a Ctrl-C of the sweep's driver. Tune turns it into a graceful stop (its state saved, the running
    trials left RUNNING there, so that --resume continues them) and returns from ``fit()`` as from a finished
    sweep, every trial TERMINATED in its results: without this note the sweep wrote its summary, best.yaml and
    a FINISHED parent run for what had not run. Tune installs its SIGINT handler when ``fit()`` starts and
    sets its callbacks up after that; ``setup`` wraps that handler. Holds nothing: Tune pickles its callbacks
    into the state --resume restores."""

    def setup(self, **info):
        _STOPPED.clear()
        tune_handler = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or not callable(tune_handler):
            return

        def noted(sig, frame):
            _STOPPED.set()
            print("[ureid] Ctrl-C: the sweep stops once Tune has saved its state (Ctrl-C again skips that)",
                  flush=True)
            tune_handler(sig, frame)  # Tune's: stop, and put the handler from before fit() back

        signal.signal(signal.SIGINT, noted)


class _NoTuneRestoreHint(logging.Filter):
    """Tune's own lines on a Ctrl-C ("Stop signal received ...", "Resume experiment with: Tuner.restore(...)")
    name its Python API; the sweep says how to continue with ``ureid tune --resume`` instead. After the stop,
    its "Failed to fetch metrics" lines name the trials that never started."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Stop signal received") or "Tuner.restore(" in text
                    or (_STOPPED.is_set() and text.startswith("Failed to fetch metrics")))


# Tune's own output while a sweep runs, which SweepProgress and the final table replace: the legacy output
# engine prints nothing at verbose=0 (Ray 2.60's new one printed a configuration box and "View detailed results
# here" / TensorBoard lines anyway), and no TensorBoard logger is added beside the JSON and CSV ones that the
# sweep's trial folders keep (it warned "NaN or Inf found in input tensor" for a label-free score a stage could
# not compute; the metrics are in MLflow).
_QUIET_TUNE = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


@contextlib.contextmanager
def _tune_output_off():
    """:data:`_QUIET_TUNE` in the driver's environment and Tune's INFO log lines off ("Wrote the latest version
    of all result files ..."), while Tune runs; as before afterwards."""
    saved = {key: os.environ.get(key) for key in _QUIET_TUNE}
    log = logging.getLogger("ray.tune")
    level = log.level
    hint = _NoTuneRestoreHint()
    filtered = [logging.getLogger(name) for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")]
    os.environ.update(_QUIET_TUNE)
    log.setLevel(logging.WARNING)
    for logger in filtered:
        logger.addFilter(hint)
    try:
        yield
    finally:
        for logger in filtered:
            logger.removeFilter(hint)
        log.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _trial(params: dict, *, base: dict, sweep_dir: str, parent_run_id: str) -> None:
    """One trial's run. It never writes its own failure status (``leave_status``): the sweep's :func:`_finish`
    does, from Tune's verdict (KILLED for a trial the scheduler stopped, FAILED with Tune's error for one that
    failed). A stopped trial dies inside ``run_experiment`` as Tune ends its actor, and what it dies of is not
    always recognisable as a stop: Tune's graceful exit is SystemExit(0) after the session's stop flag was
    cleared, but its Train controller and store can die first and raise other errors (a CI run on 6 December
    marked an early-stopped trial FAILED: its store's ActorDiedError). Its dying process can still run after
    Ray reports the actor dead, so a FAILED it wrote after :func:`_finish`'s KILLED won. With one writer the
    order no longer matters."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from .experiment import run_experiment

    import ray

    name = tune.get_context().get_trial_name()
    reserved = ray.util.get_current_placement_group()  # the trial's bundle, holding its clustering slots
    data = copy.deepcopy(base)
    for key, value in params.items():
        data = _set(data, key, value.item() if hasattr(value, "item") else value)
    data = _set(data, "output_dir", str(Path(sweep_dir) / "trials" / name))
    data = _set(data, "tracking.run_name", name)
    cfg = validate(data, source=f"sweep trial {name}")
    earlier = _latest_run(Path(sweep_dir) / "trials" / name)
    if earlier is None:
        run_experiment(cfg, quiet=True, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()],
                       cluster_placement_group=reserved, leave_status=True)
    elif (earlier / "summary.json").is_file():
        # It finished before the sweep's driver died, after Tune last saved its state: report, do not re-train.
        from .callbacks import read_history

        for row in read_history(earlier / "history.jsonl"):
            tune.report(row)
    else:  # a driver died mid-trial: continue its run (same folder and MLflow child) after its last stage
        run_experiment(cfg, resume=earlier, quiet=True, callbacks=[TuneReportCallback()],
                       cluster_placement_group=reserved, leave_status=True)


def _latest_run(trial_dir: Path) -> Path | None:
    runs = sorted(trial_dir.glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else None


# ----------------------------------------------------------------------------- the sweep


def _objective(select: str) -> tuple[str, str]:
    from ..config import LABEL_FREE_SCORES

    if select == "oracle_map":
        return "mAP", "max"
    if select == "validation":
        return "val_mAP", "max"
    score = select.split(":", 1)[1]
    return score, "max" if LABEL_FREE_SCORES[score] else "min"


def _max_concurrent(ray_cfg) -> int:
    """As many trials as the cluster holds: CPUs for their workers, clustering slots for their reservations (or,
    with ``ray.store_gpus``, GPUs for their stores' shares and their workers' GPUs)."""
    import ray

    from .tasks import SLOT

    have = ray.cluster_resources()
    fits = int(have.get("CPU", 1) // (ray_cfg.num_workers * ray_cfg.cpus_per_worker))
    if ray_cfg.store_gpus > 0:
        per_trial = ray_cfg.store_gpus + (ray_cfg.num_workers if ray_cfg.use_gpu else 0)
        fits = min(fits, int(have.get("GPU", 0) / per_trial + 1e-9))
    elif ray_cfg.clustering_tasks:
        fits = min(fits, int(have.get(SLOT, 0) // ray_cfg.cluster_slots_per_trial))
    return max(1, fits)


def check_state_api(address: str | None = None) -> None:
    """Refuse a sweep whose trials ASHA may stop on a cluster that does not serve Ray's State API.

    A stopped trial's actor is killed, and with it its Ray Train controller; the placement group holding the
    trial's train workers is then removed by Train's ``PlacementGroupCleaner``, which learns that the
    controller died only from the State API (the dashboard's HTTP server). Without it the cleaner logs
    "Failed to query Ray Train Controller actor state" over and over, the group keeps its CPUs, and the next
    trial waits for them forever (measured: a 3-trial grid on 2 CPUs with ``include_dashboard: false`` hung
    after ASHA stopped the second trial). Only a server that is not there is refused; any other State API
    error (a timeout on a busy head, say) is a warning, and the sweep goes on.
    ``address``: the State API's address; by default the one the job's processes use
    (:func:`~.job.state_api_address`)."""
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException, ServerUnavailable

    from .job import state_api_address

    address = address or state_api_address()
    try:
        if address == "":
            raise ServerUnavailable("ray.init reported no dashboard")
        list_nodes(address=address, limit=1, timeout=30, raise_on_missing_output=False)
    except ServerUnavailable as exc:
        first = str(exc).split(". ")[0]
        raise ConfigError(
            "the Ray cluster serves no State API (its dashboard), and Ray Train needs it to free the workers "
            "of a trial that ASHA stops: without it the next trial waits for their CPUs forever. Set "
            "ray.include_dashboard: true (a local start), start the cluster's head with --include-dashboard=true "
            f"(cluster.yaml does), or sweep with --scheduler none. ({first})") from None
    except RayStateApiException as exc:
        print(f"[ureid] warning: Ray's State API at {address or 'the default address'} did not answer as expected "
              f"({str(exc)[:200]}); Ray Train frees the workers of a trial that ASHA stops through it", flush=True)


def _trial_resources(ray_cfg):
    """What a trial reserves for its children, never for itself. Tune gives the first bundle of a trial's
    placement group to the trial function's actor, which holds it for its whole life: a first bundle of the
    trial's clustering slots left none for its block tasks, which then waited forever (measured: any update that
    fanned out, i.e. more than one k-NN block, hung the sweep), and a first bundle of 0.01 CPU kept a trainer sized
    to every CPU of the cluster from starting. An empty first bundle is Tune's way to reserve for children only:
    the placement group then holds just the bundles after it, the first of them at index 0, where the clustering
    tasks run (:class:`.tasks.RayBlockMap`) and, with ``ray.store_gpus``, the store holding its GPU share
    (``feature_store.STORE_BUNDLE``). Without clustering tasks or a GPU share, Tune still needs one non-empty
    bundle: one byte of memory."""
    from .tasks import SLOT

    if ray_cfg.store_gpus > 0:
        return tune.PlacementGroupFactory([{}, {"GPU": float(ray_cfg.store_gpus)}])
    if ray_cfg.clustering_tasks:
        return tune.PlacementGroupFactory([{}, {SLOT: float(ray_cfg.cluster_slots_per_trial)}])
    return tune.PlacementGroupFactory([{}, {"memory": 1.0}])


def _check_name(name: str | None, output_dir: Path) -> None:
    """``--name``: one new folder in ``output_dir`` (checked before Ray starts; it failed after, with
    FileExistsError, for a name already used, and a name with a '/' made nested folders)."""
    if name is None:
        return
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"--name {name!r}: the sweep's folder name in output_dir, without '/'")
    if (output_dir / name).exists():
        how = (f"--resume {output_dir / name} continues it" if (output_dir / name / "sweep.json").is_file()
               else "it is not a sweep")
        raise ConfigError(f"--name {name!r}: {output_dir / name} exists ({how}); choose another --name")


def run_sweep(config: str | os.PathLike, method_name: str, overrides: list[str] | None = None, *,
              space_file: str | None = None, num_samples: int | None = None, search: str = "random",
              scheduler: str = "asha", max_concurrent: int | None = None, name: str | None = None,
              resume: str | None = None, quiet: bool = False) -> dict:
    """Run (or resume) a sweep; returns its summary (also in sweep.json). ``num_samples``: trials drawn by a
    random or Optuna search (default 4); a grid runs each of its points once and takes no count."""
    import ray

    from ..methods import get_method
    from .job import check_worker_group, ensure_ray, hold_folder
    from .tasks import check_cluster_slots

    t0 = time.perf_counter()
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent < 1):
        raise ConfigError(f"--max-concurrent {max_concurrent!r}: at least 1 trial at a time (leave it out for as "
                          "many as the cluster's CPUs hold)")
    if resume:
        sweep_dir = Path(resume).expanduser().resolve()
        if not (sweep_dir / "sweep.json").is_file():
            raise FileNotFoundError(f"--resume {sweep_dir}: not a ureid sweep folder (no sweep.json)")
        if (probe := hold_folder(sweep_dir)) is not None:  # a sweep still running: refused before Ray starts
            probe.close()
        info = json.loads((sweep_dir / "sweep.json").read_text())
        base, space = info["base"], info["space"]
    else:
        if scheduler not in ("asha", "none"):
            raise ConfigError(f"--scheduler {scheduler!r}: allowed: asha, none")
        if search == "grid" and num_samples is not None:
            # Tune would run the grid num_samples times over; with one seed the copies repeat each other
            raise ConfigError(f"--num-samples {num_samples!r} with --search grid: a grid runs each of its points "
                              "once (as many trials as points); leave --num-samples out")
        if num_samples is None:
            num_samples = 4
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"--num-samples {num_samples!r}: a sweep needs at least one trial")
        base = apply_overrides(read_yaml(config), overrides)
        refuse_other_method(base, method_name, config, "the sweep is over")
        cfg = validate(copy.deepcopy(base), source=str(config))
        if cfg.schedule.select == "last":  # a sweep needs a score to compare trials on
            base = _set(base, "schedule.select", cfg.schedule.objective)
            cfg = validate(copy.deepcopy(base), source=str(config))
        cfg.check_paths()
        method = get_method(method_name)
        space, source = load_space(method, space_file)
        check_space(base, space, source)  # before Ray starts
        _check_search(search, space)
        if search == "grid":  # the trial count, as MLflow's params and sweep.json record it
            num_samples = math.prod(len(spec["grid"]) for spec in _as_grid(space).values())
        cfg = cfg.with_absolute_paths()
        _check_name(name, Path(cfg.output_dir))
        base = _set(cfg.to_dict(), "tracking.tracking_uri",
                    tracking.resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir))

    # Ray first: a cluster that cannot run the sweep is refused before a folder or an MLflow run is made.
    cfg = validate(copy.deepcopy(base), source="sweep")
    method_name = cfg.method
    ensure_ray(cfg.ray, cfg.tracking.tracking_uri)
    check_cluster_slots(cfg.ray, cfg.ray.cluster_slots_per_trial)
    check_worker_group(cfg.ray)
    num_stages = get_method(method_name).num_stages(cfg, _n0_for_stage_count(cfg))
    if cfg.schedule.max_stages:
        num_stages = min(num_stages, cfg.schedule.max_stages)
    stops_trials = (info["scheduler"] if resume else scheduler) == "asha" and num_stages >= 2
    if stops_trials:
        check_state_api()

    # One driver per sweep folder (see job.hold_folder): a second --resume beside a running sweep restored the same
    # Tune state and ran its trials again; taken before anything is touched, let go when the sweep ends.
    lock = hold_folder(sweep_dir) if resume else None
    try:
        if resume:
            tracking.reopen_run(info["tracking_uri"], info["parent_run_id"])
        else:
            sweep_id = secrets.token_hex(3)
            label = name or f"sweep-{method_name}-{time.strftime('%Y%m%d-%H%M%S')}-{sweep_id}"
            sweep_dir = Path(cfg.output_dir) / label
            tracking.make_folder(sweep_dir, "output_dir", cfg.output_dir, exist_ok=False)
            lock = hold_folder(sweep_dir)
            uri = cfg.tracking.tracking_uri
            objective, mode = _objective(cfg.schedule.select)
            params = {"space": json.dumps(space), "search": search, "scheduler": scheduler, "num_samples": num_samples,
                      "objective": f"{objective} ({mode})", "config": str(config)}
            parent = tracking.start_run(uri, cfg.tracking.experiment, label, params,
                                        {"ureid.sweep_id": sweep_id, "method": method_name, "dataset": cfg.data.name,
                                         "ureid.kind": "sweep"})
            info = {"base": base, "space": space, "search": search, "scheduler": scheduler, "num_samples": num_samples,
                    "sweep_id": sweep_id, "name": label, "parent_run_id": parent, "tracking_uri": uri,
                    "objective": objective, "mode": mode, "method": method_name}
            (sweep_dir / "sweep.json").write_text(json.dumps(info, indent=1))
        print(f"[ureid] sweep folder {sweep_dir}\n[ureid] MLflow parent run {info['parent_run_id']} at "
              f"{info['tracking_uri']}", flush=True)

        get_method(info["method"]).prepare(cfg)  # once, here: what every trial needs (camstyle's StarGAN and fakes)
        trainable = tune.with_resources(
            partial(_trial, base=info["base"], sweep_dir=str(sweep_dir), parent_run_id=info["parent_run_id"]),
            _trial_resources(cfg.ray))
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        try:
            if resume:
                tuner = tune.Tuner.restore(str(sweep_dir / "tune" / "sweep"), trainable=trainable,
                                           resume_unfinished=True, resume_errored=True)
            else:
                sched = None
                if stops_trials:
                    from ray.tune.schedulers import ASHAScheduler

                    # time_attr counts finished stages. No rung sits on the last stage (max_t = stages - 1, and
                    # stop_last_trials=False past it): a trial that gets there finishes its run (summary,
                    # artifacts, MLflow status) instead of being killed after its last report.
                    sched = ASHAScheduler(time_attr="stages_done", max_t=num_stages - 1, grace_period=1,
                                          reduction_factor=2, stop_last_trials=False)
                concurrent = max_concurrent or _max_concurrent(cfg.ray)
                tuner = tune.Tuner(
                    trainable,
                    param_space=tune_domains(info["space"]) if search != "grid" else tune_domains(_as_grid(info["space"])),
                    tune_config=tune.TuneConfig(
                        metric=info["objective"], mode=info["mode"], scheduler=sched,
                        search_alg=_searcher(search, cfg.seed, concurrent, paper_point(info["base"], info["space"])),
                        num_samples=num_samples if search != "grid" else 1,  # a grid: each point once
                        max_concurrent_trials=concurrent if search == "optuna" else None,
                        trial_name_creator=partial(trial_name, info["sweep_id"]),
                        trial_dirname_creator=partial(trial_name, info["sweep_id"]),
                    ),
                    run_config=tune.RunConfig(name="sweep", storage_path=str(sweep_dir / "tune"), verbose=0,
                                              callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), _NotesCtrlC()]
                                              + ([] if quiet else [SweepProgress(info["objective"], num_stages,
                                                                                 str(sweep_dir))])),
                )
            with _tune_output_off():
                grid = tuner.fit()
            if _STOPPED.is_set():
                runs = _trial_runs(sweep_dir)
                # the trials stopped with the sweep: FAILED until --resume reopens them (KILLED is a scheduler's
                # stop, which compare reads as a trial's end; _finish sets every status when the sweep ends)
                for run in runs.values():
                    if not (run / "summary.json").is_file():
                        tracking.finish_run(info["tracking_uri"], _run_id(run),
                                            error=KeyboardInterrupt(f"stopped with its sweep (Ctrl-C); ureid tune "
                                                                    f"{info['method']} --resume {sweep_dir} continues it"))
                started = f"{len(runs)} of {info['num_samples']} trials started"
                print(f"[ureid] sweep stopped (Ctrl-C) with {started}; Tune saved its state. Continue it with: "
                      f"ureid tune {info['method']} --resume {sweep_dir}", flush=True)
                raise KeyboardInterrupt(f"Ctrl-C in the sweep's driver, {started}")
        except BaseException as exc:
            tracking.finish_run(info["tracking_uri"], info["parent_run_id"], error=exc)
            raise
        summary = _finish(sweep_dir, info, grid, num_stages, time.perf_counter() - t0)
        if not quiet:
            print(_table(summary))
        return summary
    finally:
        if lock is not None:
            lock.close()


def _n0_for_stage_count(cfg):
    """The schedule's length may depend on the data (BUC: on mp only); read the dataset once for it."""
    from ..data.run_data import ensure_synthetic
    from ..methods import get_method
    from .experiment import load_run_data

    ensure_synthetic(cfg.data)
    return load_run_data(cfg, get_method(cfg.method))


def _as_grid(space: dict) -> dict:
    grid = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind not in ("choice", "grid"):
            raise ConfigError(f"--search grid: {key} is a {kind} range; a grid needs choice or grid lists")
        grid[key] = {"grid": args}
    return grid


def paper_point(base: dict, space: dict) -> dict:
    """The first trial a model-based searcher runs: the base config's value of every swept key (the papers'
    defaults in the shipped configs), moved into the space where it lies outside (a range: its nearest end;
    a list: its nearest value, or the first for non-numbers), since the searcher needs a value for every key."""
    point = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        value = base
        for part in key.split("."):
            value = value[part]
        if kind in ("choice", "grid"):
            numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in [*args, value])
            point[key] = value if value in args else min(args, key=lambda a: abs(a - value)) if numeric else args[0]
        else:
            high = args[1] - 1 if kind == "randint" else args[1]
            point[key] = min(max(value, args[0]), high)
    return point


SEARCHES = ("random", "grid", "optuna")


def _check_search(search: str, space: dict) -> None:
    """The searcher fits the space, and Optuna is installed when asked for: checked before Ray starts and
    before the sweep folder and its MLflow parent run are made (a grid over a range once failed after both)."""
    if search not in SEARCHES:
        raise ConfigError(f"--search {search!r}: allowed: {', '.join(SEARCHES)}")
    if search == "grid":
        _as_grid(space)
    if search == "optuna":
        grids = [key for key, spec in space.items() if next(iter(spec)) == "grid"]
        if grids:
            raise ConfigError(f"--search optuna: {', '.join(grids)} is a grid; Optuna samples, use choice: [...]")
        _optuna()


def _optuna():
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna
    except ImportError:
        raise ConfigError("--search optuna needs the optional extra: pip install 'ureid[optuna]' (optuna)") from None
    return OptunaSearch, optuna


def _searcher(search: str, seed: int, concurrent: int, first: dict | None = None):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if search in ("random", "grid"):  # Tune ignores max_concurrent_trials for this one: it takes its own
        return BasicVariantGenerator(max_concurrent=concurrent, random_state=seed)
    if search == "optuna":
        OptunaSearch, optuna = _optuna()
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3),
                            points_to_evaluate=[first] if first else None)
    raise ConfigError(f"--search {search!r}: allowed: {', '.join(SEARCHES)}")


def _run_id(run_dir: Path) -> str:
    """The MLflow run of a trial's run folder."""
    return json.loads((run_dir / "run.json").read_text())["run_id"]


def _trial_runs(sweep_dir: Path) -> dict[str, Path]:
    """Trial name -> its run folder."""
    return {d.name: run for d in sorted((sweep_dir / "trials").glob("*/")) if (run := _latest_run(d))}


def _finish(sweep_dir: Path, info: dict, grid, num_stages: int, wall_time: float) -> dict:
    """Honest statuses for every child run, trials.csv, best.yaml, the parent's summary metrics."""
    from .callbacks import read_history

    uri, objective, mode = info["tracking_uri"], info["objective"], info["mode"]
    runs = _trial_runs(sweep_dir)
    rows = []
    for result in grid:
        name = Path(result.path).name
        run_dir = runs.get(name)
        history = read_history(run_dir / "history.jsonl") if run_dir else []
        run_id = _run_id(run_dir) if run_dir else None
        finished = run_dir is not None and (run_dir / "summary.json").is_file()
        if result.error is not None:
            status = "failed"
        elif finished:
            status = "finished"
        else:
            status = "early_stopped"
        # The trial's own selection (schedule.select is the objective), as its stage loop reported it.
        by_stage = {h["stage"]: h for h in history}
        chosen = by_stage[history[-1]["selected_stage"]] if history else None
        oracle = by_stage[history[-1]["oracle_stage"]] if history else None
        if run_id:
            summary = {}
            if chosen:
                summary.update({f"selected_{objective}": chosen.get(objective), "selected_at_stage": chosen["stage"],
                                **{f"selected_{k}": chosen[k] for k in ("mAP", "rank1") if k in chosen}})
            if oracle and "mAP" in oracle:  # none without a labeled query/gallery (an unlabeled folder)
                summary.update({"best_mAP": oracle["mAP"], "oracle_at_stage": oracle["stage"]})
            tracking.log_summary(uri, run_id, summary)
            if status == "early_stopped":
                tracking.set_tags(uri, run_id, {"ureid.early_stopped": "true"})
                tracking.finish_run(uri, run_id, status="KILLED")
            elif status == "failed":
                tracking.finish_run(uri, run_id, error=result.error)
        params = {k: v for k, v in (result.config or {}).items()}
        rows.append({"trial": name, "status": status, **params, "stages": len(history),
                     "selected_stage": chosen["stage"] if chosen else "", objective: chosen.get(objective, "") if chosen else "",
                     "selected_mAP": chosen.get("mAP", "") if chosen else "",
                     "oracle_mAP": oracle.get("mAP", "") if oracle else "", "run_dir": str(run_dir or "")})
    rows.sort(key=lambda r: r["trial"])
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(sweep_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    scored_rows = [r for r in rows if r[objective] != ""]
    best = (max if mode == "max" else min)(scored_rows, key=lambda r: r[objective]) if scored_rows else None
    if best:
        cfg_data = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
        cfg_data["output_dir"] = str(sweep_dir.parent)
        cfg_data["tracking"]["run_name"] = None
        (sweep_dir / "best.yaml").write_text(
            f"# best trial {best['trial']} of sweep {info['name']} by {objective} ({mode}): "
            f"ureid run {info['method']} --config best.yaml reproduces its stages\n"
            + yaml.safe_dump(cfg_data, sort_keys=False))
        tracking.log_summary(uri, info["parent_run_id"], {f"best_{objective}": best[objective]})
        tracking.set_tags(uri, info["parent_run_id"], {"ureid.best_trial": best["trial"]})
    # A child left RUNNING belongs to no trial of the grid any more (a driver died before its run folder was
    # written): say so instead of leaving it RUNNING for ever.
    known = {_run_id(r) for r in runs.values()}
    for run_id in tracking.child_runs(uri, info["parent_run_id"], status="RUNNING"):
        if run_id not in known:
            tracking.finish_run(uri, run_id, error=RuntimeError("orphaned: the sweep's driver died during this trial"))
    tracking.log_artifacts(uri, info["parent_run_id"], {"": sweep_dir / "trials.csv",
                                                        "best": sweep_dir / "best.yaml"})
    tracking.finish_run(uri, info["parent_run_id"])
    summary = {"sweep_dir": str(sweep_dir), "parent_run_id": info["parent_run_id"], "tracking_uri": uri,
               "objective": objective, "mode": mode, "trials": rows, "best": best, "wall_time_s": wall_time,
               "num_stages": num_stages, "space_keys": list(info.get("space", {}))}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _table(summary: dict) -> str:
    objective = summary["objective"]
    lines = [f"[ureid] sweep {summary['sweep_dir']}: {len(summary['trials'])} trials in "
             f"{summary['wall_time_s'] / 60:.1f} min, objective {objective} ({summary['mode']})"]
    # what was tried: the swept keys by their last part (merge_percent=0.15), as trials.csv has them whole
    tried = [_tried({key: r[key] for key in summary.get("space_keys", ()) if key in r}) for r in summary["trials"]]
    name_w = max((len(r["trial"]) for r in summary["trials"]), default=0)  # columns as wide as their values
    tried_w = max(map(len, tried), default=0)
    for r, values in zip(summary["trials"], tried):
        score = f"{r[objective]:.4f}" if r[objective] != "" else "-"
        line = f"  {r['trial']:<{name_w}}  {r['status']:<13}  {values:<{tried_w}}  stages {r['stages']}  {objective} {score}"
        if r["selected_mAP"] != "" or r["oracle_mAP"] != "":
            line += (f"  selected mAP {r['selected_mAP'] if r['selected_mAP'] == '' else format(r['selected_mAP'], '.1%')}"
                     f"  (oracle {r['oracle_mAP'] if r['oracle_mAP'] == '' else format(r['oracle_mAP'], '.1%')})")
        lines.append(line)
    if summary["best"]:
        lines.append(f"[ureid] best trial {summary['best']['trial']}: {Path(summary['sweep_dir']) / 'best.yaml'}")
    return "\n".join(lines)

