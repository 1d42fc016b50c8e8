"""visualize.py figure tasks end to end on tiny checkpoints: files written, numbers repeat."""
import json
import os

import pytest

from helpers import run_real, run_script


@pytest.fixture(scope="module")
def tiny_dir(root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ckpts")
    r = run_real("train.py", "--T", 5, 10, 25, 50, 200, "--steps", 30, "--batch-size", 64, "--channels", 8, 32,
                 "--log-every", 10, "--quiet", "--checkpoint-dir", folder)
    assert r.returncode == 0, r.stderr
    r = run_real("train.py", "--T", 5, 10, 25, 50, "--schedule", "linear", "--steps", 30, "--batch-size", 64,
                 "--channels", 8, 32, "--log-every", 10, "--quiet", "--checkpoint-dir", folder / "linear")
    assert r.returncode == 0, r.stderr
    r = run_real("classifier_guidance.py", "--T", 50, "--steps", 30, "--quiet",
                 "--out", folder / "twopixel_classifier_T50.pt")
    assert r.returncode == 0, r.stderr
    return folder


def test_all_tasks_write_their_files_and_repeat(root, tiny_dir, tmp_path):
    outs = []
    for name, task in (("a", "all"), ("b", "trajectory")):  # everything once; then one figure again
        figures = tmp_path / name
        r = run_script("visualize.py", "--task", task, "--checkpoint-dir", tiny_dir, "--figures", figures, "--quiet",
                       "--n", 400)  # a draft: each figure draws 400 samples instead of its own 1000 to 10000
        assert r.returncode == 0, r.stderr
        outs.append(figures)
    expected = ["twopixel_trajectory.png", "twopixel_trajectory.json", "twopixel_tsweep.png", "twopixel_tsweep_oracle.png",
                "twopixel_tsweep.json", "twopixel_guidance.png", "twopixel_guidance.json", "twopixel_loss.png",
                "twopixel_loss.json", "twopixel_fast_sampling.png", "twopixel_fast_sampling.json",
                "twopixel_classifier_guidance.png", "twopixel_classifier_guidance.json", "twopixel_schedules.png",
                "twopixel_schedules.json", "twopixel_inpaint.png", "twopixel_inpaint.json", "report.pdf"]
    for f in expected:
        assert (outs[0] / f).stat().st_size > 0, f
    for f in expected:
        if (outs[1] / f).exists() and f.endswith(".json") and f != "twopixel_loss.json":  # the loss record holds seconds
            assert json.loads((outs[0] / f).read_text()) == json.loads((outs[1] / f).read_text()), f
    assert [p.name for p in outs[1].glob("*.json")] == ["twopixel_trajectory.json"]
    sweep = json.loads((outs[0] / "twopixel_tsweep.json").read_text())
    assert set(sweep["by_T"]) == {"5", "10", "25", "50"}
    assert (outs[0] / "report.pdf").read_bytes()[:4] == b"%PDF"
    fast = json.loads((outs[0] / "twopixel_fast_sampling.json").read_text())
    assert fast["n"] == 400 and json.loads((outs[0] / "twopixel_trajectory.json").read_text())["n_chains"] == 400
    assert set(fast["by_sampler"]) == {"ddpm_learned", "ddpm_oracle", "ddim_learned", "ddim_oracle"}
    assert all(len(v["energy_distance"]) == len(fast["steps"]) for v in fast["by_sampler"].values())
    guided = json.loads((outs[0] / "twopixel_classifier_guidance.json").read_text())
    assert len(guided["by_method"]) == 3 and all(len(rows) == len(guided["scales"]) for rows in guided["by_method"].values())
    schedules = json.loads((outs[0] / "twopixel_schedules.json").read_text())
    # the linear schedule of Ho et al. does not reach noise at small T; the cosine one does
    assert schedules["by_schedule"]["linear"]["5"]["alpha_bar_T"] > 0.9
    assert schedules["by_schedule"]["cosine"]["5"]["alpha_bar_T"] < 1e-3


def test_report_names_the_command_for_a_missing_figure(root, tiny_dir, tmp_path):
    # a report source that shows a figure nobody has made yet
    (tmp_path / "figures").mkdir()
    r = run_script("visualize.py", "--task", "report", "--figures", tmp_path / "figures", "--checkpoint-dir", tiny_dir)
    assert r.returncode == 0, r.stderr  # every figure REPORT.md shows ships in figures/
    import visualize
    src = tmp_path / "R.md"
    src.write_text("# R\n\n## Problem 1\n\n![x](figures/twopixel_nothing_yet.png)\n")
    import argparse
    import utils
    with pytest.raises(utils.UserError, match="twopixel_nothing_yet.png"):
        visualize.task_report(argparse.Namespace(figures=str(tmp_path / "figures")), "cpu", source=str(src))
    src.write_text("# R\n\n## Problem 1\n\n![x](figures/twopixel_fast_sampling.png)\n")
    with pytest.raises(utils.UserError, match="python visualize.py --task fast"):  # made neither in --figures nor beside R.md
        visualize.task_report(argparse.Namespace(figures=str(tmp_path / "figures")), "cpu", source=str(src))


def test_animate_writes_a_gif(root, tiny_dir, tmp_path):
    r = run_script("visualize.py", "--task", "animate", "--checkpoint-dir", tiny_dir, "--figures", tmp_path, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "twopixel_flow.gif").read_bytes()[:6] == b"GIF89a"


def test_figure_task_errors(root, tmp_path):
    r = run_script("visualize.py", "--task", "movie")
    assert r.returncode == 2 and "invalid choice" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_script("visualize.py", "--task", "trajectory", "--checkpoint-dir", tmp_path, "--figures", tmp_path / "f")
    assert r.returncode == 2 and "python train.py --T 50" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_script("visualize.py", "--task", "loss", "--figures", blocker / "sub")
    assert r.returncode == 2 and "cannot create directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_script("visualize.py", "--task", "loss", "--n", 100)
    assert r.returncode == 2 and "--task loss draws no samples" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_draft_goes_to_its_own_folder_and_needs_two_samples(run_here):
    import visualize
    assert visualize.parse_args(["--task", "trajectory", "--n", "50"]).figures == os.path.join("figures", "draft")
    assert visualize.parse_args(["--task", "trajectory"]).figures == "figures"  # the shipped figures
    assert visualize.parse_args(["--task", "all", "--n", "50", "--figures", "elsewhere"]).figures == "elsewhere"
    assert visualize.parse_args(["--task", "samples", "--out", "x.npy"]).n == 5000
    status, _, err = run_here("visualize.py", "--task", "fast", "--n", 1)
    assert status == 2 and "at least 2 samples" in err and len(err.strip().splitlines()) == 1
