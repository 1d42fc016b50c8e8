import os
import runpy
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture
def run_here(monkeypatch, capsys):
    """run_here(script, *args) runs `python script args` as the subprocess tests do (from the
    project folder, as __main__), but inside this process: for command lines refused while the
    flags are checked, where starting a new interpreter and importing torch would be most of
    the time. Returns (exit status, stdout, stderr). pytest keeps warnings from stderr, so the
    user and runtime warnings the command raises are added to stderr, where a real run prints
    them; an exception other than SystemExit (a traceback in a real run) fails the test."""
    def run(script, *args):
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", UserWarning)
            warnings.simplefilter("always", RuntimeWarning)
            with pytest.raises(SystemExit) as exit_:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        out, err = capsys.readouterr()
        err += "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
        return exit_.value.code, out, err
    return run
