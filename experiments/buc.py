#!/usr/bin/env python
"""BUC: bottom-up clustering (Lin et al., AAAI 2019).

No arguments: the CPU preset on the synthetic default. --config / --set key=value select
anything else; --resume RUN_DIR continues a run. See --help.
"""
import os
import sys

# This folder holds ssl.py, which would shadow the standard library's ssl for every import below.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

try:
    from ureid.experiment import main
except ImportError:  # `ray submit` runs this file with the node's own Python: use the project's venv
    venv = os.path.join(os.path.expanduser(os.environ.get("UREID_HOME", "~/ureid")), ".venv", "bin", "python")
    if os.path.exists(venv) and os.path.realpath(sys.executable) != os.path.realpath(venv):
        os.execv(venv, [venv, *sys.argv])
    raise

if __name__ == "__main__":
    sys.exit(main("buc"))
