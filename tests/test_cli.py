"""train.py and visualize.py end to end on a tiny budget. The tiny model is trained, one sampling
run made and one training interrupted in a new interpreter, as a user runs them; the other command
lines run inside the test process (tests/helpers.py), whose result the sampling test compares with
the user's byte for byte."""
import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import run_real, run_script

TINY = ["--steps", "60", "--batch-size", "64", "--channels", "8", "32", "--log-every", "20", "--quiet"]


@pytest.fixture(scope="module")
def tiny_ckpt(root, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_T4.pt"
    r = run_real("train.py", "--T", 4, *TINY, "--out", path)
    assert r.returncode == 0, r.stderr
    return path


def test_train_writes_a_complete_checkpoint(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    assert ckpt["kind"] == "twopixel" and ckpt["T"] == 4 and ckpt["schedule"] == "cosine"
    meta = ckpt["train"]
    for key in ("seed", "steps", "seconds", "final_loss", "val_loss", "oracle_val_loss"):
        assert key in meta
    assert meta["steps"] == 60 and meta["record"]["step"] == [20, 40, 60]
    assert meta["val_loss"] >= meta["oracle_val_loss"] * 0.98  # nothing beats the oracle (up to noise)
    assert not os.path.exists(str(tiny_ckpt) + ".resume.pt")


def test_samples_cli_writes_the_contracted_array_and_repeats(root, tiny_ckpt, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    for run, out in ((run_real, a), (run_script, b)):  # a user's run, and the tests' in-process one
        r = run("visualize.py", "--task", "samples", "--T", 4, "--checkpoint", tiny_ckpt,
                "--n", 300, "--seed", 3, "--label", 1, "--w", 2, "--out", out)
        assert r.returncode == 0, r.stderr
    x = np.load(a, allow_pickle=False)
    assert x.shape == (300, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert a.read_bytes() == b.read_bytes()


def all_actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


def test_every_flag_of_every_script_has_help_and_seed_and_device_exist(root):
    import benchmark
    import mnist_ddpm
    import train
    import visualize
    for module in (train, visualize, mnist_ddpm, benchmark):
        actions = list(all_actions(module.build_parser()))
        assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]
    for module in (train, visualize, mnist_ddpm):
        flags = {f for a in all_actions(module.build_parser()) for f in a.option_strings}
        assert {"--seed", "--device"} <= flags
    r = run_real("train.py", "--help")
    assert r.returncode == 0 and "--p-uncond" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--T", "0"], "positive integer"),
    (["--T", "-3"], "positive integer"),
    (["--T", "abc"], "positive integer"),
    (["--label", "2"], "invalid choice"),
    (["--n", "0"], "positive integer"),
    (["--w", "-2"], "w >= -1"),
])
def test_bad_sampling_flags_give_one_line_and_exit_2(run_here, tmp_path, args, needle):
    out = tmp_path / "s.npy"
    status, _, err = run_here("visualize.py", "--task", "samples", "--out", out, *args)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not out.exists()


def test_bad_checkpoints_give_one_line_and_exit_2(run_here, tiny_ckpt, tmp_path):
    out = tmp_path / "s.npy"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_ckpt.read_bytes()[:500])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    other_kind = tmp_path / "mnist.pt"
    torch.save({"kind": "mnist", "T": 4}, other_kind)
    cases = [
        (["--T", "7"], "python train.py --T 7"),  # the shipped checkpoint for T=7 does not exist
        (["--checkpoint", tmp_path / "nope.pt", "--T", "4"], "not found"),
        (["--checkpoint", truncated, "--T", "4"], "cannot be read"),
        (["--checkpoint", garbage, "--T", "4"], "cannot be read"),
        (["--checkpoint", other_kind, "--T", "4"], "'mnist' model"),
        (["--checkpoint", tiny_ckpt, "--T", "5"], "trained with T=4"),
    ]
    for args, needle in cases:
        status, _, err = run_here("visualize.py", "--task", "samples", "--out", out, *args)
        assert status == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and needle in err, (args, err)
        assert not out.exists()


def test_unwritable_output_gives_one_line_and_exit_2(root, tiny_ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = run_script("visualize.py", "--task", "samples", "--T", 4, "--checkpoint", tiny_ckpt,
                   "--out", blocker / "sub" / "s.npy")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot create directory" in r.stderr
    r = run_script("train.py", "--T", 4, *TINY, "--out", blocker / "x.pt")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_leaves_a_resumable_run_that_ends_where_an_uninterrupted_one_does(root, tmp_path):
    args = ["--T", "4", "--steps", "400", "--batch-size", "64", "--channels", "8", "32", "--log-every", "20", "--quiet"]
    full, cut = tmp_path / "full.pt", tmp_path / "cut.pt"
    assert run_script("train.py", *args, "--out", full).returncode == 0

    proc = subprocess.Popen([sys.executable, os.path.join(root, "train.py"), *args, "--out", str(cut)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    resume = str(cut) + ".resume.pt"
    deadline = time.time() + 60
    while not os.path.exists(resume) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "--resume" in err and len(err.strip().splitlines()) == 1
    assert not cut.exists()
    state = torch.load(resume, weights_only=True)
    assert 0 < state["step"] < 400 and state["extra_emas"] == []
    del state["extra_emas"]  # as written before the resume file kept further averages: it resumes the same
    torch.save(state, resume)

    r = run_script("train.py", *args, "--out", cut, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = torch.load(full, weights_only=True), torch.load(cut, weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["train"]["record"]["val_loss"] == b["train"]["record"]["val_loss"]
    assert not os.path.exists(resume)


def test_output_whose_reader_has_gone_ends_without_a_traceback(root):
    # as `python reproduce.py --list | head -1`: the pipe is closed before the script writes to it
    proc = subprocess.Popen([sys.executable, os.path.join(root, "reproduce.py"), "--list"], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and err == "", err
