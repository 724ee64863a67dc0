#!/usr/bin/env python
"""Cluster Contrast (Dai et al., 2021). No arguments: the CPU preset on the synthetic default; see --help."""
import os
import sys

# Run as a script, this folder is first on sys.path, and its ssl.py would shadow the stdlib ssl.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
from ureid.cli import run_entry_point  # noqa: E402

sys.exit(run_entry_point("cluster_contrast"))
