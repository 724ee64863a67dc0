#!/usr/bin/env python
"""Compare methods from MLflow (tables and plots per dataset): python experiments/compare.py --experiment ureid."""
import os
import sys

# Run as a script, this folder is first on sys.path, and its ssl.py would shadow the stdlib ssl.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
from ureid.cli import main  # noqa: E402

sys.exit(main(["compare", *sys.argv[1:]]))
