"""Running the project's command lines from the tests: inside the test process, or in a new one."""
import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the warning filters of a fresh interpreter (Python's defaults), so that a command line prints
# inside the test process the warnings a user would see
DEFAULT_FILTERS = [("ignore", ResourceWarning, ""), ("ignore", ImportWarning, ""),
                   ("ignore", PendingDeprecationWarning, ""), ("ignore", DeprecationWarning, ""),
                   ("default", DeprecationWarning, "__main__")]


def run_script(script, *args, timeout=300):
    """`python script args` from the project folder, run inside this process: most of a tiny
    command line's time in a new interpreter is importing torch. Returns a
    subprocess.CompletedProcess with the exit status, stdout and stderr.

    The script runs as __main__, so its own error handling turns a UserError or a refused flag
    into a message and exit status 2; any other exception (a traceback in a real run) is raised
    into the test, with what the command had printed, and fails it, as does a run longer than
    `timeout` seconds (where the system has SIGALRM). Warnings are filtered as in a fresh
    interpreter and written to stderr as Python writes them. The working folder, sys.argv and
    torch's global generator are restored afterwards, and figures left open are closed, so that
    one run does not change the next."""
    argv = [script, *map(str, args)]
    out, err, status = io.StringIO(), io.StringIO(), 0
    cwd, saved_argv, rng = os.getcwd(), sys.argv, torch.get_rng_state()

    def expire(signum, frame):
        raise TimeoutError(f"{' '.join(argv)} ran longer than {timeout} s")

    timed = hasattr(signal, "SIGALRM")  # POSIX; elsewhere the run has no time limit
    if timed:
        previous_alarm = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        os.chdir(ROOT)
        sys.argv = argv
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.resetwarnings()
            for action, category, module in DEFAULT_FILTERS:
                warnings.filterwarnings(action, category=category, module=module)
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            except SystemExit as e:  # as the interpreter ends: None is 0, a message is printed and is 1
                if e.code is None or isinstance(e.code, int):
                    status = (e.code or 0) & 0xFF
                else:
                    print(e.code, file=sys.stderr)
                    status = 1
            except BaseException as e:
                e.add_note(f"stdout of {' '.join(argv)}:\n{out.getvalue()}\nstderr:\n{err.getvalue()}")
                raise
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_alarm)
        os.chdir(cwd)
        sys.argv = saved_argv
        torch.set_rng_state(rng)
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
    warned = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue() + warned)


def run_real(script, *args, timeout=300):
    """`python script args` in a new interpreter, from the project folder, as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
