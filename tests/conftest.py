import contextlib
import io
import os
import runpy
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def root():
    return ROOT


def run_script(script, *args):
    """`python script args` from the project folder, run inside this process: most of a tiny CLI
    run's time in a new interpreter is importing torch. Returns a subprocess.CompletedProcess with
    the exit status, stdout and stderr. The script runs as __main__, so its own error handling
    turns a UserError or a refused flag into a message and exit status 2; any other exception (a
    traceback in a real run) is raised into the test and fails it. pytest keeps warnings from
    stderr, so the user and runtime warnings the command raises are added to stderr, where a
    real run prints them. The fixtures that train the tiny models run in a real subprocess, so
    every script is also run the way a user runs it."""
    argv = [script, *map(str, args)]
    out, err, status, before = io.StringIO(), io.StringIO(), 0, (os.getcwd(), sys.argv)
    try:
        os.chdir(ROOT)
        sys.argv = argv
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", UserWarning)
            warnings.simplefilter("always", RuntimeWarning)
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(before[0])
        sys.argv = before[1]
    warned = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue() + warned)


@pytest.fixture
def run_here():
    """run_script as (exit status, stdout, stderr), for command lines refused while the flags are checked."""
    def run(script, *args):
        r = run_script(script, *args)
        return r.returncode, r.stdout, r.stderr
    return run
