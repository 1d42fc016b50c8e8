"""Rebuild every figure, animation and the report with one command.

    python reproduce.py                  # from the shipped checkpoints and saved evaluations (minutes)
    python reproduce.py --from-scratch   # retrain every model and re-run every measurement first (hours)
    python reproduce.py --list           # print the steps and their commands; run nothing

Each step is an ordinary command of the project, run as a separate process and printed
before it runs, so any single figure can be remade by hand with the same line. The default
form draws the figures from the checkpoints in checkpoints/ and redraws the MNIST
evaluation figures from their JSON files (measuring them again samples tens of thousands
of digits); --from-scratch first retrains the two-pixel models, the two classifiers and
the MNIST model into checkpoints/ (replacing the shipped ones) and re-runs the MNIST
evaluation, and says beforehand how long that took when the shipped files were made.
"""
import os
import subprocess
import sys
import time

import utils

PY = sys.executable
ROOT = os.path.dirname(os.path.abspath(__file__))

# (what it makes, command); the figures and GIFs drawn from the shipped checkpoints (each
# figure with its numbers as .json beside it, where it has any)
FIGURES = [
    ("figures/twopixel_trajectory.png", ["visualize.py", "--task", "trajectory"]),
    ("figures/twopixel_tsweep.png figures/twopixel_tsweep_oracle.png", ["visualize.py", "--task", "tsweep"]),
    ("figures/twopixel_guidance.png", ["visualize.py", "--task", "guidance"]),
    ("figures/twopixel_loss.png", ["visualize.py", "--task", "loss"]),
    ("figures/twopixel_fast_sampling.png", ["visualize.py", "--task", "fast"]),
    ("figures/twopixel_classifier_guidance.png", ["visualize.py", "--task", "classifier"]),
    ("figures/twopixel_schedules.png", ["visualize.py", "--task", "schedules"]),
    ("figures/twopixel_inpaint.png", ["visualize.py", "--task", "inpaint"]),
    ("figures/twopixel_flow.gif", ["visualize.py", "--task", "animate"]),
    ("figures/mnist_grid.png figures/mnist_grid_w.png", ["mnist_ddpm.py", "grid"]),
    ("figures/mnist_trajectory.png figures/mnist_formation.png", ["mnist_ddpm.py", "trajectory"]),
    ("figures/mnist_training.png", ["mnist_ddpm.py", "progress"]),
    ("figures/mnist_study.png", ["mnist_ddpm.py", "study"]),
    ("figures/mnist_forming.gif", ["mnist_ddpm.py", "animate"]),
    ("figures/mnist_inpaint.png figures/mnist_edit.png", ["mnist_ddpm.py", "prior"]),
    ("figures/mnist_eval.png figures/mnist_eval_misread.png", ["mnist_ddpm.py", "evaluate", "--replot"]),
    ("figures/mnist_eval_seed1.png figures/mnist_eval_seed1_misread.png",
     ["mnist_ddpm.py", "evaluate", "--replot", "--out", "figures/mnist_eval_seed1.json"]),
]
REPORT = ("figures/report.pdf", ["visualize.py", "--task", "report"])

# --from-scratch only: the models, then the measurements the figures above redraw
EVALUATED_WS = ["-0.2", "0", "0.25"]
EVALUATION = [(f"figures/mnist_eval{suffix}.json",  # (what it writes, command)
               ["mnist_ddpm.py", "evaluate", "--ws", *EVALUATED_WS, "--seed", seed, "--out", f"figures/mnist_eval{suffix}.json"])
              for seed, suffix in (("0", ""), ("1", "_seed1"))]
TRAINING = [  # (checkpoint whose record gives the time it took, command)
    ("checkpoints/twopixel_T50.pt", ["train.py", "--T", "5", "10", "25", "50"]),
    # the fast-sampling study's model: at T = 200 each step is seen less often, and 2500 steps
    # left it at 1.9 times the oracle's distance with all 200 steps; 4000 bring it to 1.15
    ("checkpoints/twopixel_T200.pt", ["train.py", "--T", "200", "--steps", "4000"]),
    ("checkpoints/linear/twopixel_T50.pt", ["train.py", "--T", "5", "10", "25", "50", "--schedule", "linear",
                                            "--checkpoint-dir", "checkpoints/linear"]),
    ("checkpoints/twopixel_classifier_T50.pt", ["classifier_guidance.py"]),
    ("checkpoints/mnist_classifier.pt", ["mnist_ddpm.py", "classifier"]),
    ("checkpoints/mnist_T200.pt", ["mnist_ddpm.py", "train"]),
]


def maker(path):
    """The command that makes a figure of the report, as a string, or None."""
    for outs, cmd in FIGURES:
        if os.path.normpath(path) in map(os.path.normpath, outs.split()):
            return "python " + " ".join(cmd)
    return None


def recorded_seconds(path, per_model=1):
    """Seconds the shipped checkpoint's training took, from its own record, times the number of
    models its command trains (None if unknown). Where the record has the time after every
    epoch, the median epoch times the epochs: a run that was paused or stopped and resumed
    has wall time in its total that no epoch used."""
    import statistics
    import torch
    try:
        train = torch.load(os.path.join(ROOT, path), map_location="cpu", weights_only=True)["train"]
        ends = train.get("history", {}).get("seconds", [])
        if len(ends) >= 3:
            return statistics.median(b - a for a, b in zip(ends, ends[1:])) * len(ends) * per_model
        return float(train["seconds"]) * per_model
    except Exception:
        return None


def evaluation_seconds():
    """Seconds the saved MNIST evaluations spent sampling, from their JSON files."""
    import json
    total = 0.0
    for name in ("mnist_eval.json", "mnist_eval_seed1.json"):
        try:
            with open(os.path.join(ROOT, "figures", name)) as f:
                total += sum(e.get("sampling_seconds", 0) for e in json.load(f)["by_w"])
        except (OSError, ValueError, KeyError):
            pass
    return total


def run(steps, quiet):
    start = time.perf_counter()
    for k, (out, cmd) in enumerate(steps, 1):
        line = "python " + " ".join(cmd)
        print(f"[{k}/{len(steps)}] {', '.join(out.split())}: {line}", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run([PY, *cmd] + (["--quiet"] if quiet and "--quiet" not in cmd else []), cwd=ROOT,
                                stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE if quiet else None,
                                text=True)
        if result.returncode != 0:  # the command's own one-line error, when it was captured
            error = (result.stderr or "").strip().splitlines()
            raise utils.UserError(f"step {k} ({line}) failed: {error[-1] if error else 'exit status ' + str(result.returncode)}")
        print(f"      done in {time.perf_counter() - t0:.1f} s", flush=True)
    return time.perf_counter() - start


def main(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-scratch", action="store_true",
                   help="retrain every model and re-run the MNIST evaluation before drawing (hours on 2 CPU cores)")
    p.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    p.add_argument("--verbose", action="store_true", help="show each command's own output and progress bars")
    args = p.parse_args(argv)
    steps = list(FIGURES) + [REPORT]
    if args.from_scratch:
        first = TRAINING + EVALUATION
        steps = first + steps
        known = [recorded_seconds(ckpt, 4 if "twopixel_T50" in ckpt else 1) for ckpt, _ in TRAINING]
        hours = (sum(s for s in known if s) + evaluation_seconds()) / 3600
        print(f"--from-scratch retrains {len(TRAINING)} sets of models into checkpoints/ (replacing the shipped ones) "
              f"and re-runs the MNIST evaluation: the shipped files took about {hours:.1f} hours of training and "
              f"sampling on 2 CPU cores, plus the figures. Ctrl-C stops it; training commands resume with --resume.",
              flush=True)
    if args.list:
        for k, (out, cmd) in enumerate(steps, 1):
            print(f"[{k}/{len(steps)}] {', '.join(out.split())}: python {' '.join(cmd)}")
        return
    seconds = run(steps, quiet=not args.verbose)
    print(f"all {len(steps)} steps done in {seconds:.0f} s; the report is figures/report.pdf")


if __name__ == "__main__":
    utils.run_main(main)
