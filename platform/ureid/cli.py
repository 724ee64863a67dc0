"""The ``ureid`` command.

Subcommands are argparse sub-parsers; each ``add_*_commands(subparsers)`` function registers a
group and sets ``func`` on its leaves, so further groups (``ureid run ...``) plug in the same way::

    ureid data synth --out data/synthetic [--seed 0] [--num-train-ids 80] [--video]
    ureid data info --format market1501 --root /datasets/Market-1501-v15.09.15
    ureid data camstyle --root data/synthetic
    ureid camstyle train --config stargan_cpu.yaml
    ureid camstyle generate --checkpoint runs/stargan-.../stargan.pt --data data/synthetic
    ureid run buc --set clustering.size_penalty=0.003
    ureid tune buc --num-samples 8
    ureid compare --experiment ureid

``experiments/<method>.py`` call :func:`run_entry_point`, the same command as ``ureid run <method>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _cmd_synth(args: argparse.Namespace) -> int:
    from ureid.data.synthetic import OtherParameters, generate, read_manifest

    kw = {k: getattr(args, k) for k in ("seed", "num_train_ids", "num_test_ids", "num_cameras", "num_distractors",
                                        "num_junk", "height", "width", "video", "camera_strength", "overwrite")}
    t0 = time.perf_counter()
    before = read_manifest(args.out)
    try:
        out = generate(args.out, **kw)
    except OtherParameters as exc:
        raise SystemExit(f"ureid data synth: {exc.out} holds a synthetic dataset with other parameters "
                         f"{exc.diff or '(generator version)'} (old, new); pass --overwrite to replace it") from None
    secs = time.perf_counter() - t0
    manifest = read_manifest(out)
    counts = manifest["counts"]
    reused = before is not None and before == manifest
    unit = "tracklets" if args.video else "images"
    print(f"{'reused' if reused else 'wrote'} synthetic {manifest['layout']} dataset in {out} ({secs:.1f} s)")
    print(f"  train    {counts['train']:>6} {unit}, {args.num_train_ids} identities")
    print(f"  query    {counts['query']:>6} {unit}")
    print(f"  gallery  {counts['gallery']:>6} {unit} ({args.num_test_ids} identities, "
          f"{counts['distractors']} distractors pid 0, {counts['junk']} junk pid -1)")
    if args.video:
        print(f"  frames   {counts['frames']:>6}")
    return 0


# The formats the camera-style commands read: `ureid data camstyle` (the colour stand-in) and `ureid camstyle
# generate` (StarGAN's fakes), whose fakes go beside the training images of these layouts.
CAMSTYLE_FORMATS = ["dukemtmc", "folder", "market1501"]
STARGAN_FORMATS = ["dukemtmc", "market1501", "msmt17"]


def _guessed_format(root: str, command: str, allowed=None) -> str:
    """The format of the dataset at ``root`` for a command given no ``--format`` (one of ``allowed``, default
    any), said on stdout."""
    from ureid.data.formats import DATASETS, guess_format

    allowed = sorted(allowed or DATASETS)
    guess = guess_format(root)
    if guess is None or guess[0] not in allowed:
        what = ("is not a folder" if not Path(root).expanduser().is_dir() else "holds no image") if guess is None \
            else f"looks like {guess[0]} ({guess[1]})"
        raise SystemExit(f"ureid {command}: {root} {what}; --format is one of {', '.join(allowed)}")
    print(f"format {guess[0]}, guessed from {guess[1]} (--format to read it as another)", flush=True)
    return guess[0]


def _cmd_info(args: argparse.Namespace) -> int:
    from ureid.data.formats import load_dataset

    t0 = time.perf_counter()
    if args.folder is None and args.root is None:
        args._parser.error("the dataset folder is required: ureid data info DIR (or --root DIR)")
    if args.folder is not None and args.root is not None and Path(args.folder).resolve() != Path(args.root).resolve():
        args._parser.error(f"two dataset folders, {args.folder} and --root {args.root}: give one")
    args.root = args.root if args.root is not None else args.folder
    if args.format is None:
        args.format = _guessed_format(args.root, "data info")
    ds = load_dataset(args.format, args.root, pattern=args.pattern, cuhk03_protocol=args.cuhk03_protocol,
                      bad_images=args.bad_images, verify=False if args.no_verify else None)
    kind = "video (records are tracklets)" if ds.is_video else "image"
    print(f"{ds.name} {kind} dataset at {ds.root} (read in {time.perf_counter() - t0:.1f} s)")
    print(ds.summary())
    # records per camera: what shows at a glance whether a --pattern read the cameras as meant
    from collections import Counter

    for split in ("train", "query", "gallery"):
        cams = Counter(r.camid for r in getattr(ds, split))
        if cams:
            print(f"  {split:<8}per camera: " + ", ".join(f"{ds.camera_name(c)}: {cams[c]}" for c in sorted(cams)))
    return 0


def _cmd_camstyle(args: argparse.Namespace) -> int:
    from ureid.data.camstyle import default_fake_folder, write_fakes
    from ureid.data.formats import load_dataset

    t0 = time.perf_counter()
    if args.format is None:
        args.format = _guessed_format(args.root, "data camstyle", CAMSTYLE_FORMATS)
    ds = load_dataset(args.format, args.root, pattern=args.pattern, verify=False)
    out = args.out or default_fake_folder(ds.root)
    n = write_fakes(ds.train, out)
    print(f"wrote {n} camera-style fakes (colour-statistics stand-in) for {len(ds.train)} training images "
          f"to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _method_names() -> list[str]:
    from ureid.methods import METHODS

    return sorted(METHODS)


def build_run_parser(method: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    from ureid.config import CONFIG_DIR

    p = argparse.ArgumentParser(
        prog=prog or (f"experiments/{method}.py" if method else "ureid run"),
        description="Run an unsupervised re-ID method on Ray Train, tracked in MLflow. "
        + (f"Without arguments: the CPU preset {method}_cpu.yaml on the synthetic default." if method else ""),
    )
    p.add_argument("--config", help=f"YAML config; a bare name (buc_cpu or buc_cpu.yaml) is looked up in "
                                    f"{CONFIG_DIR} (default: <method>_cpu.yaml from there)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable, e.g. --set clustering.size_penalty=0.003")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last stage checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--verbose", action="store_true",
                   help="the workers' own log lines and Ray Train's INFO output instead of the progress bar")
    if method is None:
        p.add_argument("method", choices=_method_names())
    return p


def _refuse_config_on_resume(args: argparse.Namespace, what: str) -> None:
    """A resume reads the folder's own config.yaml: a --config beside it would be ignored, so it is refused."""
    if args.config:
        from ureid.config import ConfigError

        raise ConfigError(f"--config {args.config} with --resume: a resumed {what} keeps its own "
                          f"{Path(args.resume) / 'config.yaml'}; change one of its keys with --set KEY=VALUE")


def _error(message) -> int:
    """A user's error (a bad config, layout or argument, a missing file, a run another process drives): one line
    on stderr, no traceback, and argparse's exit status for a usage error. Every entry point says it alike:
    ``experiments/<method>.py`` and ``experiments/sweep.py`` come to theirs without :func:`main`."""
    print(f"ureid: error: {message}", file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input or situation raises (a bad layout or argument, a missing file, a run another process
    drives): one clear line, no traceback. Evaluated when an error is matched, so the import costs nothing."""
    from mlflow.exceptions import MlflowException

    from ureid.runtime.job import RunInUse

    return ValueError, OSError, RunInUse, MlflowException  # MLflow's: a server that refuses the user, say


def run_entry_point(method: str | None = None, argv: list[str] | None = None, prog: str | None = None) -> int:
    """``experiments/<method>.py`` and ``ureid run <method>``: load the config, then run or resume."""
    from ureid.config import CONFIG_DIR, ConfigError, load_config

    args = build_run_parser(method, prog).parse_args(argv)
    method = method or args.method
    try:
        if args.resume:
            from ureid.runtime.experiment import load_run_config

            _refuse_config_on_resume(args, "run")
            cfg = load_run_config(args.resume, args.overrides)
        else:
            cfg = load_config(args.config or CONFIG_DIR / f"{method}_cpu.yaml", args.overrides, method=method)
        if cfg.method != method:
            raise ConfigError(f"config method is {cfg.method!r} but this entry point runs {method!r}")
    except ConfigError as exc:
        return _error(exc)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from ureid.runtime.experiment import run_experiment

    try:
        run_experiment(cfg, resume=args.resume, verbose=args.verbose)
    except _user_errors() as exc:
        return _error(exc)
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train aborts the run and its driver ends in SystemExit(1) (a traceback-free exit 1 before);
        # the run has said it stopped and how to go on (Job.failing_loudly): the status of an interrupted command
        return 130
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return run_entry_point(args.method, args.rest, prog=f"ureid run {args.method}")


def build_tune_parser(prog: str = "ureid tune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Sweep a method's knobs with Ray Tune (ASHA after every "
                                "stage); one MLflow parent run per sweep, one child per trial.")
    p.add_argument("method", choices=_method_names())
    p.add_argument("--config", help="base config of every trial (default: <method>_cpu.yaml from the package)")
    p.add_argument("--space", help="YAML file with a 'space:' block of dotted keys (default: the method's own)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="trials a random or optuna search draws (default 4); a grid runs each point once")
    p.add_argument("--search", choices=["random", "grid", "optuna"], default="random",
                   help="random draws from the space, grid runs every combination of its lists, optuna (TPE) "
                        "starts from the config's own values (default: random)")
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                   help="asha stops the worse half of the trials at each rung of stages; none runs every trial "
                        "to its end (default: asha)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="default: as many trials as the cluster's CPUs hold (workers x cpus_per_worker each)")
    p.add_argument("--name", help="sweep folder name (default: sweep-<method>-<time>-<id>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to every trial")
    p.add_argument("--resume", metavar="SWEEP_DIR", help="continue a sweep whose driver died")
    return p


def tune_entry_point(argv: list[str] | None = None, prog: str = "ureid tune") -> int:
    """``ureid tune`` and ``experiments/sweep.py``."""
    from ureid.config import CONFIG_DIR, ConfigError

    args = build_tune_parser(prog).parse_args(argv)
    from ureid.runtime.tune import run_sweep

    try:
        ignored = [flag for flag, value in (("--config", args.config), ("--space", args.space),
                                            ("--set", args.overrides), ("--name", args.name)) if value]
        if args.resume and ignored:
            raise ConfigError(f"{', '.join(ignored)} with --resume: a resumed sweep keeps the settings of its "
                              f"{Path(args.resume) / 'sweep.json'}")
        run_sweep(args.config or CONFIG_DIR / f"{args.method}_cpu.yaml", args.method, args.overrides,
                  space_file=args.space, num_samples=args.num_samples, search=args.search,
                  scheduler=args.scheduler, max_concurrent=args.max_concurrent, name=args.name, resume=args.resume)
    except _user_errors() as exc:  # a ConfigError is a ValueError
        return _error(exc)
    except KeyboardInterrupt as exc:  # a stopped sweep's (with words) said what was saved and how to go on
        if not exc.args:
            print("ureid: stopped (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    return tune_entry_point(args.rest)


def _cmd_compare(args: argparse.Namespace) -> int:
    from ureid.config import ConfigError
    from ureid.tracking import resolve_tracking_uri
    from ureid.tracking.compare import compare

    try:
        uri = resolve_tracking_uri(args.tracking_uri, "runs", create=False)  # a server that does not answer: seconds, not minutes
    except ConfigError as exc:
        return _error(str(exc).replace('tracking.tracking_uri=', '--tracking-uri ', 1))
    files = compare(uri, args.out, experiment=args.experiment, run_ids=args.runs or None, score=args.score)
    for dataset, paths in files.items():
        for path in paths:
            if path.suffix == ".md":
                print(f"## {dataset}\n\n{path.read_text()}")
        print(f"{dataset}: " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from ureid.embed import embed_to_file

    from ureid.progress import ItemsBar

    with ItemsBar("embedding") as bar:  # a bar on a terminal, a line every two minutes in a log
        out, n, dim, stage = embed_to_file(args.run_dir, args.images, args.out, stage=args.stage,
                                           device=args.device, batch_size=args.batch_size, progress=bar,
                                           bad_images=args.bad_images)
    print(f"wrote {out}: {n} x {dim} features of stage {stage}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ureid.embed import export_embedding

    out, info = export_embedding(args.run_dir, args.out, stage=args.stage)
    takes = "frames (one tracklet a call)" if info["video"] else "images"
    print(f"wrote {out}: {info['method']} stage {info['stage']} ({info['arch']}), {info['feature_dim']}-d unit "
          f"features of {info['height']}x{info['width']} RGB {takes} in [0, 1]; load with torch.export.load (see "
          f"its ureid.json)")
    return 0


class _Bars:
    """The bars of a command that embeds images and may re-rank: images embedded, then (re-ranking Market-1501's
    3,368 x 19,732 test images took 27 s on two cores) the rows of the re-ranking's passes in place of the finished
    embedding bar. Bars on a terminal, a line every two minutes of a long one in a log (``ItemsBar``)."""

    def __enter__(self) -> "_Bars":
        from ureid.progress import ItemsBar

        self.embedding, self._rerank = ItemsBar("embedding"), ItemsBar("re-ranking", unit="row")
        return self

    def rerank(self, done: int, total: int) -> None:
        self.embedding.close()
        self._rerank(done, total)

    def __exit__(self, *exc) -> None:
        self.embedding.close()
        self._rerank.close()


def _rerank_settings(args: argparse.Namespace) -> dict | None:
    """``--rerank`` and its settings as ``re_ranking_features``' keywords (None without ``--rerank``)."""
    if not args.rerank:
        return None
    return {"k1": args.rerank_k1, "k2": args.rerank_k2, "lambda_value": args.rerank_lambda}


def _add_rerank_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--rerank", action="store_true", help=what)
    p.add_argument("--rerank-k1", type=_positive_int, default=20, help="re-ranking's k1 (default: %(default)s)")
    p.add_argument("--rerank-k2", type=_positive_int, default=6, help="re-ranking's k2 (default: %(default)s)")
    p.add_argument("--rerank-lambda", type=_unit_interval, default=0.3,
                   help="re-ranking's lambda, the original distance's weight (default: %(default)s)")


def _cmd_search(args: argparse.Namespace) -> int:
    from ureid.embed import search

    rerank = _rerank_settings(args)
    with _Bars() as bars:
        r = search(args.run_dir, args.queries, args.gallery, top=args.top, stage=args.stage, device=args.device,
                   batch_size=args.batch_size, progress=bars.embedding, rerank=rerank, rerank_progress=bars.rerank,
                   bad_images=args.bad_images)
    how = "squared distance of unit features, 0 to 4" if rerank is None else \
        f"k-reciprocal re-ranked distance, k1 {args.rerank_k1}, k2 {args.rerank_k2}, lambda {args.rerank_lambda:g}"
    nq, top = len(r["queries"]), r["indices"].shape[1]
    each = "for the query" if nq == 1 else f"for each of {nq} queries"
    print(f"{r['method']}, stage {r['stage']}: the {top} nearest of {len(r['gallery'])} gallery items {each} ({how})"
          + (f"; --top {args.top} asked for more than the gallery holds" if args.top > top else ""))
    for query, row, dist in zip(r["queries"], r["indices"], r["distances"]):
        print(query)
        for rank, (g, d) in enumerate(zip(row, dist), 1):
            if g >= 0:
                print(f"  {rank:>3}  {d:.4f}  {r['gallery'][g]}")
    if args.picture:
        from ureid.visualize import search_results

        drawn = search_results(r["queries"], r["gallery"], r["indices"], args.picture, distances=r["distances"])
        print(f"wrote {drawn['path']}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ureid.embed import evaluate_run

    if args.root is not None and args.format is None:
        args.format = _guessed_format(args.root, "evaluate")
    extra = {"pattern": args.pattern, "cuhk03_protocol": args.cuhk03_protocol, "bad_images": args.bad_images} \
        if args.format else {}
    rerank = _rerank_settings(args)
    with _Bars() as bars:
        r = evaluate_run(args.run_dir, stage=args.stage, data_format=args.format, root=args.root,
                         device=args.device, batch_size=args.batch_size, rerank=rerank, progress=bars.embedding,
                         rerank_progress=bars.rerank, **extra)

    def scores(p: str = "") -> str:
        return (f"mAP {100 * r[p + 'mAP']:.2f}%, rank-1 {100 * r[p + 'rank1']:.2f}%, "
                f"rank-5 {100 * r[p + 'rank5']:.2f}%, rank-10 {100 * r[p + 'rank10']:.2f}%")

    print(f"{r['method']}, stage {r['stage']}, on {r['dataset']} at {r['root']} ({r['num_query']} queries, "
          f"{r['num_gallery']} gallery): {scores()}")
    if rerank is not None:
        print(f"  with k-reciprocal re-ranking (k1 {args.rerank_k1}, k2 {args.rerank_k2}, lambda "
              f"{args.rerank_lambda:g}): {scores('rerank_')}")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from ureid.run_pictures import visualize_run

    for path in visualize_run(args.run_dir, num_queries=args.num_queries, seed=args.seed, stage=args.stage,
                              root=args.root):
        print(f"wrote {path}")
    return 0


class _HelpOf(argparse.Action):
    """``-h``/``--help`` of a subcommand whose options pass through to a parser of its own (``run``, ``tune``):
    that parser's help, rather than an error about missing arguments or an unrecognised ``--help``."""

    def __init__(self, option_strings, dest, build=None, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show this help message and exit")
        self.build = build

    def __call__(self, parser, namespace, values, option_string=None):
        self.build().print_help()
        parser.exit()


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    from ureid.config import DEFAULT_SCORE, LABEL_FREE_SCORES

    r = sub.add_parser("run", help="run a method (same options as experiments/<method>.py)", add_help=False)
    r.add_argument("-h", "--help", action=_HelpOf, build=build_run_parser)
    r.add_argument("method", choices=_method_names())
    rest = r.add_argument("rest", nargs=argparse.REMAINDER, metavar="OPTIONS",
                          help="--config, --set KEY=VALUE, --resume RUN_DIR, --help")
    rest.required = False  # argparse counts a REMAINDER as required; `ureid run buc` has none
    r.set_defaults(func=_cmd_run)
    t = sub.add_parser("tune", help="sweep a method with Ray Tune (see ureid tune METHOD --help)", add_help=False)
    t.add_argument("-h", "--help", action=_HelpOf, build=build_tune_parser)
    t.add_argument("rest", nargs=argparse.REMAINDER, metavar="METHOD [OPTIONS]")
    t.set_defaults(func=_cmd_tune)
    cmp = sub.add_parser("compare", help="compare methods from MLflow: Markdown + CSV tables and plots per dataset")
    cmp.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    cmp.add_argument("--experiment", default=None, help="MLflow experiment (default: ureid)")
    cmp.add_argument("--runs", nargs="*", default=[], help="run ids instead of a whole experiment")
    cmp.add_argument("--out", default="runs/comparison", help="folder for the tables and plots")
    cmp.add_argument("--score", default=DEFAULT_SCORE, choices=sorted(LABEL_FREE_SCORES), help="label-free score whose stage pick every row shows")
    cmp.set_defaults(func=_cmd_compare)
    vis = sub.add_parser("visualize", help="ranked lists (pseudo-identities without a query set) and a t-SNE "
                                           "feature map of a finished run")
    vis.add_argument("run_dir")
    vis.add_argument("--num-queries", type=int, default=8,
                     help="rows: queries (or pseudo-identities, or images) drawn (default: %(default)s)")
    vis.add_argument("--seed", type=int, default=0, help="which rows are drawn, and the t-SNE's start "
                     "(default: %(default)s)")
    vis.add_argument("--stage", type=int, default=None,
                     help="draw another stage than the selected one (or a stage of a run that has not "
                          "finished), into pictures/stage<N>/")
    vis.add_argument("--root", default=None,
                     help="the run's dataset at another folder (moved, or copied to this machine); default: "
                          "the data.root of the run's config.yaml")
    vis.set_defaults(func=_cmd_visualize)
    emb = sub.add_parser("embed", help="a finished run's embedding of new images: features to a .npz",
                         description="Embed images (files, or folders read recursively) with a run's trained model: "
                         "L2-normalised features, compared by Euclidean distance as in the run's evaluation. "
                         "A video run embeds tracklets: a folder of frames, or a MARS tracklet name, is one.")
    emb.add_argument("run_dir")
    emb.add_argument("images", nargs="+", help="image files and folders")
    emb.add_argument("--out", default="features.npz", help="output .npz: features (N, D), paths, stage, method "
                     "(default: %(default)s)")
    _add_model_options(emb)
    _add_bad_images(emb)
    emb.set_defaults(func=_cmd_embed)
    exp = sub.add_parser("export", help="a finished run's embedding as one torch.export file (.pt2) that runs "
                         "with torch alone",
                         description="Write a run's model (the stage it selected, or --stage) as a torch.export "
                         "program: RGB images resized to the run's input size, as floats in [0, 1], in; the unit "
                         "features `ureid embed` gives, out. It needs torch alone to run (no ureid); the file's "
                         "ureid.json says what it takes and gives.")
    exp.add_argument("run_dir")
    exp.add_argument("--out", default="embedding.pt2", help="output .pt2 (default: %(default)s)")
    exp.add_argument("--stage", type=int, default=None, help="a stage checkpoint (default: the stage the run selected)")
    exp.set_defaults(func=_cmd_export)
    sea = sub.add_parser("search", help="a finished run's nearest gallery images for query images",
                         description="Rank gallery images (files, or folders read recursively) for each query image "
                         "by a run's embedding and distance, as its evaluation does; print them, and draw them with "
                         "--picture. A query's own file in the gallery is skipped. A video run ranks tracklets.")
    sea.add_argument("run_dir")
    sea.add_argument("queries", nargs="+", help="query images or folders")
    sea.add_argument("--gallery", nargs="+", required=True,
                     help="gallery images or folders, or a .npz `ureid embed` wrote with the same run and stage")
    sea.add_argument("--top", type=int, default=10, help="how many per query (default: %(default)s)")
    sea.add_argument("--picture", default=None, help="write the ranked lists as a PNG here")
    _add_rerank_options(sea, "rank by the distances after k-reciprocal re-ranking (Zhong et al., CVPR 2017), over "
                        "the queries and the whole gallery: its time grows with (Q + G)^2 (Market-1501's "
                        "3,368 + 19,732: 27 s on two cores)")
    _add_model_options(sea)
    _add_bad_images(sea)
    sea.set_defaults(func=_cmd_search)
    from ureid.data.formats import DATASETS

    ev = sub.add_parser("evaluate", help="mAP and CMC of a finished run on its own or another labeled dataset",
                        description="Score a run's model (the stage it selected, or --stage) on a query/gallery "
                        "split with the run's evaluation protocol: its own dataset, or another one at --root (its format "
                        "guessed from its layout, or --format; e.g. trained on Market-1501, tested on DukeMTMC-reID).")
    ev.add_argument("run_dir")
    ev.add_argument("--format", choices=sorted(DATASETS), help="another dataset's format (default with --root: guessed from its layout)")
    ev.add_argument("--root", help="another dataset's folder")
    _add_rerank_options(ev, "also the scores after k-reciprocal re-ranking (Zhong et al., CVPR 2017), as papers "
                        "report them beside the plain ones")
    _add_dataset_options(ev)
    _add_model_options(ev)
    ev.set_defaults(func=_cmd_evaluate)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Which of a run's models, and where it runs (``ureid embed``, ``ureid search``, ``ureid evaluate``)."""
    p.add_argument("--stage", type=int, default=None, help="a stage checkpoint (default: the stage the run selected)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's train.eval_batch_size")


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    """How a dataset folder is read beyond its format and root (``ureid data info``, ``ureid evaluate``)."""
    from ureid.data.formats import CUHK03_PROTOCOLS

    p.add_argument("--pattern", default=None, help="folder format: filename regex with groups (?P<pid>..) and/or "
                   "(?P<camid>..) (with a '/': searched in the path below the folder, e.g. '(?P<pid>\\d+)/' for a "
                   "folder per identity), none: unlabeled images; tracklets format: regex with a (?P<camid>..) group "
                   "searched in each tracklet's first frame's path below the root, none: one camera")
    p.add_argument("--cuhk03-protocol", default="labeled", choices=CUHK03_PROTOCOLS,
                   help="CUHK03's hand-drawn (labeled) or detector (detected) boxes (default: %(default)s)")
    _add_bad_images(p)


def _add_bad_images(p: argparse.ArgumentParser) -> None:
    from ureid.data.formats import BAD_IMAGE_POLICIES

    p.add_argument("--bad-images", default="fail", choices=BAD_IMAGE_POLICIES,
                   help="an image that does not open: fail names it before anything is computed, skip leaves it "
                        "out and names it in a warning (default: %(default)s)")


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    from ureid.data.formats import DATASETS

    data = sub.add_parser("data", help="datasets: generate synthetic data, inspect a dataset folder")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="{synth,info,camstyle}")

    s = dsub.add_parser("synth", help="write a synthetic re-ID dataset (Market-1501 layout, or MARS with --video)")
    s.add_argument("--out", required=True, help="output folder (reused if it holds the same parameters)")
    s.add_argument("--seed", type=int, default=0, help="fixes every identity and image (default: %(default)s)")
    s.add_argument("--num-train-ids", type=int, default=80,
                   help="identities of the training split (default: %(default)s)")
    s.add_argument("--num-test-ids", type=int, default=80,
                   help="identities of query and gallery, none shared with training (default: %(default)s)")
    s.add_argument("--num-cameras", type=int, default=6, help="cameras, each its own colour response and "
                   "optics (default: %(default)s)")
    s.add_argument("--num-distractors", type=int, default=None, help="pid-0 images (tracklets with --video); default 250 (30)")
    s.add_argument("--num-junk", type=int, default=None, help="pid -1 images (tracklets with --video); default 100 (12)")
    s.add_argument("--height", type=int, default=128, help="image height in pixels (default: %(default)s)")
    s.add_argument("--width", type=int, default=64, help="image width in pixels (default: %(default)s)")
    s.add_argument("--video", action="store_true", help="write tracklets in the MARS layout")
    s.add_argument("--camera-strength", type=float, default=1.0,
                   help="0..1: how far each camera's colour response and optics move from neutral (default 1)")
    s.add_argument("--overwrite", action="store_true", help="replace a synthetic dataset made with other parameters")
    s.set_defaults(func=_cmd_synth)

    i = dsub.add_parser("info", help="read a dataset folder and print its split summary")
    i.add_argument("--format", default=None, choices=sorted(DATASETS),
                   help="default: guessed from the folder's layout (the guess is printed)")
    i.add_argument("folder", nargs="?", default=None, help="the dataset folder (or --root)")
    i.add_argument("--root", default=None, help="the dataset folder, as the positional argument")
    _add_dataset_options(i)
    i.add_argument("--no-verify", action="store_true", help="do not open every image to check it is readable")
    i.set_defaults(func=_cmd_info)

    c = dsub.add_parser("camstyle", help="write camera-style fakes with the colour-statistics stand-in for StarGAN")
    c.add_argument("--root", required=True, help="dataset folder (Market-1501 or DukeMTMC-reID layout, or a folder)")
    c.add_argument("--format", default=None, choices=CAMSTYLE_FORMATS, help="default: guessed from the folder's layout")
    c.add_argument("--pattern", default=None, help="folder format: filename regex whose (?P<camid>..) group names "
                   "each image's camera")
    c.add_argument("--out", default=None, help="default: <root>/bounding_box_train_camstyle")
    c.set_defaults(func=_cmd_camstyle)


def _cmd_gan_train(args: argparse.Namespace) -> int:
    from ureid.config import CONFIG_DIR, ConfigError, load_gan_config
    from ureid.runtime.stargan import train_stargan

    try:
        if args.resume:
            _refuse_config_on_resume(args, "StarGAN run")
            gcfg = load_gan_config(Path(args.resume) / "config.yaml", args.overrides)
        else:
            gcfg = load_gan_config(args.config or CONFIG_DIR / "stargan_cpu.yaml", args.overrides)
    except ConfigError as exc:
        return _error(exc)
    train_stargan(gcfg, resume=args.resume, verbose=args.verbose)
    return 0


def _cmd_gan_generate(args: argparse.Namespace) -> int:
    from ureid.config import RayConfig
    from ureid.data.camstyle import stargan_fake_folder
    from ureid.data.formats import load_dataset
    from ureid.runtime.stargan import generate_fakes, resolve_checkpoint

    if args.format is None:
        args.format = _guessed_format(args.data, "camstyle generate", STARGAN_FORMATS)
    ds = load_dataset(args.format, args.data, verify=False)
    out = args.out
    if out is None:
        import hashlib

        ckpt = resolve_checkpoint(args.checkpoint)
        out = str(stargan_fake_folder(ds.root, hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]))
    generate_fakes(args.checkpoint, [r for r in ds.train if not r.is_fake], out,
                   RayConfig(address=args.address, use_gpu=args.gpu), threads=args.threads)
    print(f"use them with: experiments/camstyle.py --set clustering.fake_root={out}")
    return 0


def add_camstyle_commands(sub: argparse._SubParsersAction) -> None:
    cam = sub.add_parser("camstyle", help="camera-style transfer: train a StarGAN over the cameras, generate fakes")
    csub = cam.add_subparsers(dest="camstyle_command", required=True, metavar="{train,generate}")
    t = csub.add_parser("train", help="train a StarGAN over the training set's cameras as a Ray Train job")
    t.add_argument("--config", help="StarGAN YAML; a bare name is looked up in the packaged configs "
                                    "(default: stargan_cpu.yaml; stargan.yaml is the paper's setting)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable, e.g. --set gan.iterations=1000")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a StarGAN run from its last checkpoint")
    t.add_argument("--verbose", action="store_true", help="Ray Train's INFO output")
    t.set_defaults(func=_cmd_gan_train)
    g = csub.add_parser("generate", help="write one fake per other camera for every training image (Ray tasks)")
    g.add_argument("--checkpoint", required=True, help="stargan.pt, a checkpoint folder, or a StarGAN run folder")
    g.add_argument("--data", required=True, help="dataset folder (Market-1501 layout)")
    g.add_argument("--format", default=None, choices=STARGAN_FORMATS, help="default: guessed from the folder's layout")
    g.add_argument("--out", default=None, help="default: <data>/camstyle_stargan/<checkpoint hash>/fakes")
    g.add_argument("--threads", type=int, default=None, help="torch threads per task (default: the GAN config's)")
    g.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    g.add_argument("--gpu", action="store_true", help="one GPU per generation task")
    g.set_defaults(func=_cmd_gan_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ureid", description="Unsupervised person re-identification at cluster scale")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{data,run,tune,compare,visualize,embed,export,search,evaluate,camstyle}")
    add_data_commands(sub)
    add_camstyle_commands(sub)
    add_run_commands(sub)
    _name_each_parser(parser)
    return parser


def _name_each_parser(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser as the ``_parser`` default of its own arguments: the deepest one used wins, so
    an unknown option is reported with that command's usage (``ureid export RUN --output X`` showed the top
    level's usage, which does not name export's options)."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _name_each_parser(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader went away (`ureid run buc --print-config | head`): no error line, and none at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except _user_errors() as e:
        return _error(e)


if __name__ == "__main__":
    sys.exit(main())
