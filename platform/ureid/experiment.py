"""Command line of the experiment entry points (``experiments/<method>.py`` and ``ureid run``)."""

from __future__ import annotations

import argparse
import sys

from .config import CONFIG_DIR, ConfigError, load_config


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"experiments/{method}.py" if method else "ureid run",
        description="Run an unsupervised re-ID experiment on Ray Train, tracked in MLflow. "
        + (f"Without arguments: the CPU preset {method}_cpu.yaml on the synthetic default." if method else ""),
    )
    p.add_argument("--config", help=f"YAML config (default: {CONFIG_DIR}/<method>_cpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable, e.g. --set clustering.size_penalty=0.003")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last stage checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if method is None:
        p.add_argument("method", choices=["buc", "dbc", "pul", "ssl", "camstyle"])
    return p


def main(method: str | None = None, argv: list[str] | None = None) -> int:
    args = build_parser(method).parse_args(argv)
    method = method or args.method
    try:
        if args.resume:
            from .distributed.runner import load_run_config

            cfg = load_run_config(args.resume, args.overrides)
        else:
            cfg = load_config(args.config or CONFIG_DIR / f"{method}_cpu.yaml", args.overrides)
        if cfg.method != method:
            raise ConfigError(f"config method is {cfg.method!r} but this entry point runs {method!r}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from .distributed.runner import run_experiment

    run_experiment(cfg, resume=args.resume)
    return 0
