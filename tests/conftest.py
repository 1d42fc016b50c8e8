import sys

import pytest

from helpers import ROOT, run_script

sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture
def run_here():
    """run_script (tests/helpers.py) as (exit status, stdout, stderr), for command lines refused
    while the flags are checked."""
    def run(script, *args):
        r = run_script(script, *args)
        return r.returncode, r.stdout, r.stderr
    return run
