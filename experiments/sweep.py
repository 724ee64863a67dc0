#!/usr/bin/env python
"""Sweep a method with Ray Tune (for `ray submit` / `ray job submit`): python experiments/sweep.py buc --num-samples 8."""
import os
import sys

# Run as a script, this folder is first on sys.path, and its ssl.py would shadow the stdlib ssl.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
from ureid.cli import tune_entry_point  # noqa: E402

sys.exit(tune_entry_point(prog="experiments/sweep.py"))
