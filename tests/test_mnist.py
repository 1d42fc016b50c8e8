"""The MNIST model and script on a tiny configuration: blocks, training, every subcommand, bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import run_real, run_script
import mnist_ddpm as M
import utils
from ddpm import StepAndClassEmbedding

TINY_MODEL = ["--T", "10", "--batch-size", "32", "--channels", "8", "8", "16", "16", "--quiet"]


def run(*args):
    """mnist_ddpm.py with these arguments, inside this process (tests/helpers.py)."""
    return run_script("mnist_ddpm.py", *args)


@pytest.fixture(scope="module")
def small_data(root, tmp_path_factory):
    """A few hundred real digits in the layout of data/mnist.npz."""
    with np.load(os.path.join(root, "data", "mnist.npz"), allow_pickle=False) as f:
        arrays = {"x_train": f["x_train"][:320], "y_train": f["y_train"][:320],
                  "x_test": f["x_test"][:200], "y_test": f["y_test"][:200]}
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(root, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist") / "tiny.pt"
    r = run_real("mnist_ddpm.py", "train", *TINY_MODEL, "--epochs", 3, "--data", small_data, "--out", out)
    assert r.returncode == 0, r.stderr
    # --precision auto (the default) says what it chose and why
    precision, why = utils.resolve_precision("auto", torch.device("cpu"))
    assert f"precision: {precision} ({why})" in r.stdout
    return out


@pytest.fixture(scope="module")
def tiny_clf(root, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "clf.pt"
    r = run_real("mnist_ddpm.py", "classifier", "--epochs", 1, "--data", small_data, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_blocks_have_residual_layers_and_attention_with_the_right_shapes():
    cfg = M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16))
    net = M.MnistUNet(cfg)
    assert len(net.down) == 4 and len(net.up) == 4
    for block in [*net.down, *net.up]:
        assert all(isinstance(r, M.ResidualLayer) for r in block.res) and isinstance(block.attn, M.SelfAttention)
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([0, 4, 9])
    assert net(x, t, torch.tensor([1, -1, 9])).shape == (3, 1, 28, 28)
    assert net(x, t, None).shape == (3, 1, 28, 28)
    emb = net.embed(t, None)
    h = net.conv_in(x)
    sizes = []
    for i, block in enumerate(net.down):
        h = block(h, emb)
        sizes.append(tuple(h.shape[1:]))
        if i < 2:
            h = torch.nn.functional.avg_pool2d(h, 2)
    assert sizes == [(8, 28, 28), (8, 14, 14), (16, 7, 7), (16, 7, 7)]


def test_residual_layer_adds_its_input():
    layer = M.ResidualLayer(8, 8, 16, 4)
    torch.nn.init.zeros_(layer.conv2.weight)
    torch.nn.init.zeros_(layer.conv2.bias)
    x = torch.randn(2, 8, 7, 7)
    assert torch.allclose(layer(x, torch.randn(2, 16)), x)


def test_windowed_attention_is_full_attention_inside_each_window():
    torch.manual_seed(0)
    attn = M.SelfAttention(8, 4, window=7)
    x = torch.randn(2, 8, 14, 14)
    out = attn(x)
    # the top-left 7 x 7 window on its own, through the same layer with a large window
    full = M.SelfAttention(8, 4, window=100)
    full.load_state_dict(attn.state_dict())
    # GroupNorm statistics are over the whole map, so normalise first and compare attention only
    qkv = attn.qkv(attn.norm(x))[:, :, :7, :7]
    q, k, v = qkv.flatten(2).transpose(1, 2).chunk(3, dim=-1)
    ref = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1) @ v
    ref = x[:, :, :7, :7] + attn.proj(ref.transpose(1, 2).reshape(2, 8, 7, 7))
    assert torch.allclose(out[:, :, :7, :7], ref, atol=1e-5)
    assert full(x).shape == x.shape


def test_windows_taken_a_group_at_a_time_give_the_all_at_once_result():
    torch.manual_seed(0)
    attn = M.SelfAttention(8, 4, window=7)
    x = torch.randn(3, 8, 28, 28)  # 3 images of 16 windows: groups of 5 leave a partial last group
    together = attn(x).detach()  # with gradients the windows go all at once
    attn.group = 5
    with torch.no_grad():
        grouped = attn(x)
    assert torch.allclose(grouped, together, atol=1e-6)


def test_training_lowers_the_loss_and_records_metadata(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    assert ckpt["kind"] == "mnist" and ckpt["T"] == 10
    hist = ckpt["train"]["history"]
    assert hist["epoch"] == [1, 2, 3] and hist["loss"][-1] < hist["loss"][0]
    for key in ("epochs_done", "seconds", "final_loss", "seed"):
        assert key in ckpt["train"]
    assert ckpt["train"]["min_snr"] == 1.0  # the shipped recipe's weighting is the default
    assert ckpt["train"]["min_snr_mode"] == "weight" and ckpt["train"]["model_guidance"] == 0.2  # shipped recipe


def test_the_shipped_checkpoint_is_what_the_default_train_command_makes(root):
    """checkpoints/mnist_T200.pt records the settings it was trained with; they must be the
    defaults of `mnist_ddpm.py train`, or the README's command would train another model."""
    ckpt = torch.load(os.path.join(root, "checkpoints", "mnist_T200.pt"), map_location="cpu", weights_only=True)
    args = M.build_parser().parse_args(["train"])
    recorded = {"extra_ema": [], "model_guidance": 0.0, **ckpt["train"]}  # written before these flags existed
    for key, default in M.train_settings(args).items():
        assert recorded[key] == default, key
    assert recorded["epochs_done"] == args.epochs and recorded["images"] == 60000
    # a setting added after the checkpoint was written is absent from its record and takes the network's default
    shipped = M.config_dict(M.unet_config(ckpt["model_config"]))
    assert shipped == M.config_dict(M.train_config(args)) and ckpt["T"] == args.T


def test_min_snr_flag_takes_a_positive_gamma_or_off(capsys):
    parser = M.build_parser()
    assert parser.parse_args(["train", "--min-snr", "2.5"]).min_snr == 2.5
    assert parser.parse_args(["train", "--min-snr", "off"]).min_snr is None  # the plain loss
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["train", "--min-snr", bad])
        assert exit_.value.code == 2 and "a positive number or 'off'" in capsys.readouterr().err


def test_a_bfloat16_step_matches_the_float32_step_and_keeps_float32_weights():
    cfg = M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16))
    diffusion = utils.Diffusion(10, "cosine")
    x_0, y = torch.rand(16, 1, 28, 28) * 2 - 1, torch.arange(16) % 10
    losses, grads = {}, {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        net = M.MnistUNet(cfg)
        ema = utils.make_ema(net, 0.999)
        opt = torch.optim.Adam(net.parameters())
        losses[bf16] = utils.train_step(net, ema, opt, diffusion, x_0, y, utils.make_generator(0), 1e-3, bf16=bf16)
        grads[bf16] = torch.cat([p.grad.flatten() for p in net.parameters()])
        assert all(p.dtype == torch.float32 for p in [*net.parameters(), *ema.parameters()])
    assert losses[True] == pytest.approx(losses[False], rel=0.02)
    assert torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0) > 0.99


def test_sample_writes_the_contracted_array_and_repeats(root, tiny_ckpt, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    for out in (a, b):
        r = run("sample", "--checkpoint", tiny_ckpt, "--label", 7, "--n", 5, "--w", 1.5, "--seed", 2, "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
    x = np.load(a, allow_pickle=False)
    assert x.shape == (5, 28, 28) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert a.read_bytes() == b.read_bytes()


def test_sample_no_clip_runs_the_handouts_reverse_step(root, tiny_ckpt, tmp_path):
    """--no-clip: the chain of Ho et al. eq. 11 written out here, step by step, from the same noise."""
    r = run("sample", "--checkpoint", tiny_ckpt, "--label", 4, "--n", 3, "--w", 0, "--seed", 2, "--no-clip",
            "--out", tmp_path / "free.npy", "--quiet")
    assert r.returncode == 0 and "unclipped" in r.stdout, r.stderr
    r = run("sample", "--checkpoint", tiny_ckpt, "--label", 4, "--n", 3, "--w", 0, "--seed", 2,
            "--out", tmp_path / "clipped.npy", "--quiet")
    assert r.returncode == 0, r.stderr
    model, diffusion, _ = M.load_unet(str(tiny_ckpt), None, "cpu")
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 1, 28, 28, generator=gen), torch.full((3,), 4)
    with torch.no_grad():
        for t in range(diffusion.T - 1, -1, -1):
            beta, abar = diffusion.betas[t].item(), diffusion.alphas_cumprod[t].item()
            eps = model(x, torch.full((3,), t), y)
            x = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
            if t > 0:
                x = x + diffusion.posterior_variance[t].sqrt().item() * torch.randn(x.shape, generator=gen)
    expected = ((x[:, 0] + 1) / 2).clamp(0, 1).numpy()
    free, clipped = np.load(tmp_path / "free.npy"), np.load(tmp_path / "clipped.npy")
    np.testing.assert_allclose(free, expected, atol=1e-4)  # (float32 rounding)
    assert np.abs(clipped - expected).max() > 0.1  # clipping (the default) changes the chain


def test_grid_trajectory_animate_and_evaluate_write_their_files(root, tiny_ckpt, tiny_clf, small_data, tmp_path):
    r = run("grid", "--checkpoint", tiny_ckpt, "--ws", 0, 2, "--out", tmp_path / "mnist_grid.png", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mnist_grid.png").exists() and (tmp_path / "mnist_grid_w.png").exists()
    r = run("trajectory", "--checkpoint", tiny_ckpt, "--n", 6, "--out", tmp_path / "mnist_trajectory.png", "--quiet")
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "mnist_formation.json").read_text())
    share = stats["share_settled_all"]
    assert len(share) == 11 and all(a >= b for a, b in zip(share, share[1:]))  # [t]: settled at step t or earlier
    assert (tmp_path / "mnist_formation.png").exists() and (tmp_path / "mnist_trajectory.png").exists()
    r = run("animate", "--checkpoint", tiny_ckpt, "--out", tmp_path / "forming.gif", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "forming.gif").read_bytes()[:6] == b"GIF89a"
    (tmp_path / "eval.json").write_text("[]")  # not results of this command: replaced, not an error
    r = run("evaluate", "--checkpoint", tiny_ckpt, "--classifier", tiny_clf, "--data", small_data, "--n", 4,
            "--ws", 0, 1, "--out", tmp_path / "eval.json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "will be replaced" in r.stdout
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert [e["w"] for e in ev["by_w"]] == [0.0, 1.0]
    assert all(0 <= e["accuracy"] <= 1 and e["frechet_distance"] >= 0 for e in ev["by_w"])
    assert (tmp_path / "eval.png").exists()
    # each entry keeps the samples read as another digit: as many as the accuracy says (up to
    # the cap), each in its place in the batch of 4 per digit, drawn beside the figure
    for e in ev["by_w"]:
        wrong = round(40 * (1 - e["accuracy"]))
        assert len(e["misread"]) == min(wrong, M.MISREAD_KEPT)
        assert all(s["asked"] == s["index"] // 4 != s["read"] for s in e["misread"])
    assert (tmp_path / "eval_misread.png").read_bytes()[:4] == b"\x89PNG"
    # the reference: the classifier's accuracy on the real test digits the samples are compared with
    test_x, test_y = M.per_class(*M.load_mnist(small_data, "test"), 4, utils.make_generator(0))
    model, _ = M.load_classifier(tiny_clf, "cpu")
    with torch.no_grad():
        assert ev["real_test_accuracy"] == pytest.approx((model(test_x).argmax(1) == test_y).float().mean().item())
    # a second run into the same file keeps w = 1 and samples only the new settings
    r = run("evaluate", "--checkpoint", tiny_ckpt, "--classifier", tiny_clf, "--data", small_data, "--n", 4,
            "--ws", 1, 2, "--out", tmp_path / "eval.json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "w=1, ddpm" in r.stdout and "kept from" in r.stdout and r.stdout.count("kept from") == 1
    again = json.loads((tmp_path / "eval.json").read_text())
    assert [e["w"] for e in again["by_w"]] == [0.0, 1.0, 2.0]
    assert again["by_w"][1] == ev["by_w"][1]
    # guidance on the first steps only is another setting of the whole file: nothing is kept
    r = run("evaluate", "--checkpoint", tiny_ckpt, "--classifier", tiny_clf, "--data", small_data, "--n", 4,
            "--ws", 1, "--guided-steps", 3, "--out", tmp_path / "eval.json", "--quiet")
    assert r.returncode == 0 and "will be replaced" in r.stdout, r.stderr
    part = json.loads((tmp_path / "eval.json").read_text())
    assert part["guided_steps"] == 3 and [e["w"] for e in part["by_w"]] == [1.0]
    assert part["by_w"][0]["frechet_distance"] != ev["by_w"][1]["frechet_distance"]


def test_an_evaluation_file_is_kept_only_for_the_same_model_and_settings():
    result = {"checkpoint": "c.pt", "T": 200, "n_per_digit": 100, "seed": 0, "model": {"seed": 0, "final_loss": 0.012},
              "frechet_floor_train_vs_test": 24.341768029085863}
    assert M.same_evaluation(dict(result), result)
    # the floor's last digits as another CPU computes them (two evaluations of the shipped model)
    assert M.same_evaluation({**result, "frechet_floor_train_vs_test": 24.34176716172332}, result)
    assert not M.same_evaluation({**result, "frechet_floor_train_vs_test": 24.35}, result)  # other data
    assert not M.same_evaluation({**result, "guided_steps": 40}, result)
    assert not M.same_evaluation({**result, "clip_x0": False}, result)
    assert not M.same_evaluation({**result, "seed": 1}, result)
    assert not M.same_evaluation({**result, "model": {"seed": 0, "final_loss": 0.013}}, result)
    assert not M.same_evaluation([result], result)


def test_misread_samples_keep_the_wrong_ones_in_order_and_their_pixels():
    images = torch.rand(6, 28, 28)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 3, 1, 0, 2, 9])
    kept = M.misread_samples(images, labels, pred)
    assert [(s["index"], s["asked"], s["read"]) for s in kept] == [(1, 0, 3), (3, 1, 0), (5, 2, 9)]
    assert len(kept[0]["pixels"]) == 2 * 784
    for s in kept:  # 8-bit grey levels: within half a level of the sample
        assert np.abs(M.misread_image(s) - images[s["index"]].numpy()).max() <= 0.5 / 255 + 1e-6
    assert [s["index"] for s in M.misread_samples(images, labels, pred, limit=2)] == [1, 3]
    assert M.misread_samples(images, labels, labels) == []


def test_formation_settle_steps_on_a_hand_made_chain():
    # T = 4; x0_hats[k] is the prediction made at paper step k + 1 (index 0 = last step).
    # Pixel A: predictions at steps 4, 3, 2, 1 are 0.2, 0.95, 1.0, 1.0 -> within 0.1 of 1.0 from step 3 on.
    # Pixel B: close at step 4, far at step 3, close after -> settles at step 2, not 4.
    x0_hats = torch.ones(4, 1, 28, 28)
    x0_hats[:, 0, 0, 0] = torch.tensor([1.0, 1.0, 0.95, 0.2])
    x0_hats[:, 0, 0, 1] = torch.tensor([1.0, 1.0, 0.5, 1.0])
    settle, share = M.formation(x0_hats, torch.ones(1, 28, 28))
    assert settle[0, 0, 0] == 3 and settle[0, 0, 1] == 2
    assert (settle.flatten()[2:] == 4).all()  # every other pixel is right from the first step
    n = 28 * 28
    assert share.tolist() == pytest.approx([1.0, 1.0, 1.0, (n - 1) / n, (n - 2) / n])


def test_augment_moves_turns_and_scales_within_its_ranges():
    gen = utils.make_generator(0)
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 13:15, 13:15] = 1.0  # a blob at the centre of the frame, pixel 13.5
    assert torch.allclose(M.augment(x, gen, degrees=0, scale=0, shift=0), x, atol=1e-5)
    rows = torch.arange(28.0).view(1, 1, 28, 1)

    def centroid(im):
        mass = im.sum((1, 2, 3))
        return (im * rows).sum((1, 2, 3)) / mass, (im * rows.transpose(2, 3)).sum((1, 2, 3)) / mass, mass

    # a pure translation keeps the ink and moves it by at most 2 pixels, differently for each image
    r, c, mass = centroid(M.augment(x, gen, degrees=0, scale=0, shift=2))
    assert torch.allclose(mass, torch.full_like(mass, 4.0), atol=1e-4)
    assert (r - 13.5).abs().max() <= 2 + 1e-4 and (c - 13.5).abs().max() <= 2 + 1e-4
    assert (r - 13.5).abs().max() > 1 and r.unique().numel() > 32
    # turning and scaling about the centre leave a centred blob centred
    r, c, _ = centroid(M.augment(x, gen, degrees=10, scale=0.1, shift=0))
    assert (r - 13.5).abs().max() < 1e-3 and (c - 13.5).abs().max() < 1e-3
    # a blob 8 pixels right of the centre: turning moves it along the circle by up to 10 degrees,
    # scaling moves it along the radius by up to 10% (give or take the 1% that bilinear resampling of
    # so small a blob costs)
    x = torch.zeros(256, 1, 28, 28)
    x[:, :, 13:15, 21:23] = 1.0
    r, c, _ = centroid(M.augment(x, gen, degrees=10, scale=0, shift=0))
    angle = torch.rad2deg(torch.atan2(r - 13.5, c - 13.5)).abs()
    radius = torch.hypot(r - 13.5, c - 13.5)
    assert angle.max() <= 10.1 and angle.max() > 8 and (radius - 8).abs().max() < 0.1
    r, c, _ = centroid(M.augment(x, gen, degrees=0, scale=0.1, shift=0))
    radius = torch.hypot(r - 13.5, c - 13.5) / 8
    assert (r - 13.5).abs().max() < 1e-3 and radius.min() >= 0.88 and radius.max() <= 1.12
    assert radius.min() < 0.92 and radius.max() > 1.08


def test_frechet_distance_of_shifted_gaussians():
    gen = utils.make_generator(0)
    a = torch.randn(4000, 3, generator=gen)
    b = torch.randn(4000, 3, generator=gen) + torch.tensor([2.0, 0.0, 0.0])
    assert abs(M.frechet_distance(a, b) - 4.0) < 0.2  # |mu_a - mu_b|^2 with equal covariances
    assert M.frechet_distance(a, a) < 1e-6


@pytest.mark.parametrize("args, needle", [
    (["sample", "--label", "10", "--out", "x.npy"], "digit 0-9"),
    (["sample", "--label", "3", "--n", "0", "--out", "x.npy"], "positive integer"),
    (["sample", "--label", "3", "--out", "x.npy", "--eta", "0.5"], "--eta applies to --sampler ddim only"),
    (["sample", "--label", "3", "--out", "x.npy", "--seed", "-1"], "a seed in"),
    (["train", "--channels", "8", "8", "12", "16"], "multiple of 8"),
    (["evaluate", "--n", "1"], "at least 2"),
    (["grid", "--out", "grid.jpeg"], "must end in .png"),
    (["heldout", "--out", "losses.txt"], "must end in .json"),
    (["train", "--dropout", "1"], "a number in [0, 1)"),
    (["train", "--model-guidance", "1"], "a number in [0, 1)"),
])
def test_bad_flags(run_here, args, needle):
    status, _, err = run_here("mnist_ddpm.py", *args)
    assert status == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_bad_checkpoints_and_data(root, run_here, tiny_ckpt, small_data, tmp_path):
    out = tmp_path / "x.npy"
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(tiny_ckpt.read_bytes()[:1000])
    two_pixel = os.path.join(root, "checkpoints", "twopixel_T50.pt")
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, images=np.zeros((3, 28, 28), np.uint8))
    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"junk")
    cases = [
        (["sample", "--label", 1, "--checkpoint", tmp_path / "missing.pt"], "python mnist_ddpm.py train"),
        (["sample", "--label", 1, "--checkpoint", truncated], "cannot be read"),
        (["sample", "--label", 1, "--checkpoint", two_pixel], "'twopixel' model"),
        (["sample", "--label", 1, "--checkpoint", tiny_ckpt, "--T", 200], "trained with T=10"),
        (["sample", "--label", 1, "--checkpoint", tiny_ckpt, "--guided-steps", 11], "more than the 10 sampling steps"),
        (["sample", "--label", 1, "--checkpoint", tiny_ckpt, "--steps", 5, "--guided-steps", 6], "more than the 5 sampling"),
    ]
    for args, needle in cases:
        status, _, err = run_here("mnist_ddpm.py", *args, "--out", out)
        assert status == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists()
    for data, needle in ((bad_npz, "no x_train"), (not_npz, "not a readable"), (tmp_path / "none.npz", "not found")):
        status, _, err = run_here("mnist_ddpm.py", "train", *TINY_MODEL, "--data", data, "--out", tmp_path / "m.pt")
        assert status == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("old_format", [True, False])
def test_ctrl_c_keeps_finished_epochs_and_resume_ends_like_an_uninterrupted_run(root, small_data, tmp_path, old_format):
    # old_format: the resume file is rewritten as one from before --embedding-layers and --model-guidance
    # existed (one layer, the plain target, neither recorded); otherwise the shipped recipe's model guidance
    settings = [*TINY_MODEL, "--epochs", "30", "--limit", "64", "--data", str(small_data), "--extra-ema", "0.9",
                "--dropout", "0.1"]  # dropout's masks come from the global generator, which must resume too
    if old_format:
        settings += ["--embedding-layers", "1", "--model-guidance", "0"]
    full, cut = tmp_path / "full.pt", tmp_path / "cut.pt"
    assert run("train", *settings, "--out", full).returncode == 0
    proc = subprocess.Popen([sys.executable, os.path.join(root, "mnist_ddpm.py"), "train", *settings, "--out", str(cut)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(str(cut) + ".resume.pt") and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume" in err and len(err.strip().splitlines()) == 1, err
    done = torch.load(cut, weights_only=True)["train"]["epochs_done"]
    assert torch.load(str(cut) + ".resume.pt", weights_only=True)["epoch"] == done and 1 <= done < 30
    r = run("train", *settings, "--out", cut, "--resume", "--lr", "0.01")
    assert r.returncode == 2 and "lr 0.002 there, 0.01 here" in r.stderr  # refused, not mixed in, and named
    resume = str(cut) + ".resume.pt"
    if old_format:  # as written before --embedding-layers and --model-guidance existed: neither recorded
        state = torch.load(resume, weights_only=True)
        del state["model_config"]["embed_layers"]
        del state["run"]["model_guidance"]
        torch.save(state, resume)
    r = run("train", *settings, "--out", cut, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = torch.load(full, weights_only=True), torch.load(cut, weights_only=True)
    assert a["model_config"]["dropout"] == 0.1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["train"]["history"]["loss"] == b["train"]["history"]["loss"]
    model, _, _ = M.load_unet(str(full))  # sampling from the checkpoint: no dropout
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 6, 9]), torch.tensor([1, 2, 3, -1])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t, y))
    a, b = (torch.load(M.extra_ema_path(str(path), 0.9), weights_only=True) for path in (full, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the extra average resumes too


def test_extra_ema_checkpoints_average_the_same_weights_at_their_own_decay(root, small_data, tmp_path):
    out = tmp_path / "m.pt"
    r = run("train", *TINY_MODEL, "--epochs", "2", "--limit", "64", "--data", small_data, "--out", out,
            "--ema", "0.9", "--extra-ema", "0.9", "0.5", "--quiet")
    assert r.returncode == 0, r.stderr
    main = torch.load(out, weights_only=True)
    same, shorter = (torch.load(tmp_path / name, weights_only=True) for name in ("m_ema0.9.pt", "m_ema0.5.pt"))
    assert all(torch.equal(main["model"][k], same["model"][k]) for k in main["model"])
    assert not all(torch.equal(main["model"][k], shorter["model"][k]) for k in main["model"])
    assert (main["train"]["ema_decay"], same["train"]["ema_decay"], shorter["train"]["ema_decay"]) == (0.9, 0.9, 0.5)
    assert main["train"]["extra_ema"] == [0.9, 0.5] and shorter["model_config"] == main["model_config"]
    status = run("sample", "--checkpoint", tmp_path / "m_ema0.5.pt", "--label", 3, "--n", 2, "--out", tmp_path / "s.npy")
    assert status.returncode == 0, status.stderr  # a checkpoint like any other


def test_precision_auto_resolves_to_what_the_hardware_supports():
    cpu = torch.device("cpu")
    native, why = utils.native_bf16(cpu)
    assert utils.resolve_precision("auto", cpu) == ("bf16" if native else "fp32", why) and why
    assert native in (True, False)
    assert utils.resolve_precision("fp32", cpu)[0] == "fp32" and utils.resolve_precision("bf16", cpu)[0] == "bf16"
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        utils.resolve_precision("fp16", cpu)


@pytest.mark.parametrize("text, native", [
    ("processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n", False),  # AVX-512 without bfloat16: emulated
    ("flags : fpu avx512f avx512_bf16 avx512_vnni\n", True),  # Zen 4, Cooper Lake
    ("flags : fpu avx512f amx_bf16 amx_tile amx_int8\n", True),  # Sapphire Rapids
    ("processor : 0\nFeatures : fp asimd sve bf16 i8mm\n", True),  # ARM (Graviton 3)
    ("flags : fpu sse2 avx avx2 fma\n", False),  # AVX2 only
])
def test_native_bf16_reads_the_cpu_flags(tmp_path, text, native):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    got, why = utils.native_bf16(torch.device("cpu"), str(info))
    assert got is native and why
    got, why = utils.native_bf16(torch.device("cpu"), str(tmp_path / "missing"))
    assert got is False and "cannot read" in why


def test_dropout_zeroes_a_share_of_conv2_inputs_in_training_only():
    torch.manual_seed(0)
    layer = M.ResidualLayer(8, 32, 16, 4, dropout=0.25)
    seen = []
    layer.conv2.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    x, emb = torch.randn(64, 8, 7, 7), torch.randn(64, 16)
    layer.train()
    layer(x, emb)
    layer.eval()
    first, second = layer(x, emb), layer(x, emb)
    dropped, kept = seen[0], seen[1]
    assert torch.equal(first, second)  # eval: no randomness
    zeroed = (dropped == 0) & (kept != 0)
    assert abs(zeroed.float().mean().item() - 0.25) < 0.01  # 100,352 features, 0.25 +- 0.004 at 3 sigma
    assert torch.allclose(dropped[~zeroed], kept[~zeroed] / 0.75, atol=1e-6)  # the rest scaled up by 1 / (1 - p)
    # without dropout, a training pass draws nothing from the global generator (runs without it repeat as before)
    plain = M.MnistUNet(M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16))).train()
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    state = torch.get_rng_state()
    plain(torch.zeros(2, 1, 28, 28), torch.tensor([0, 9]), torch.tensor([3, -1]))
    assert torch.equal(torch.get_rng_state(), state)


def test_heldout_comparison_on_hand_made_errors():
    diffusion = utils.Diffusion(10, "cosine")
    t = torch.tensor([0, 4, 5, 9, 0, 4, 5, 9])  # the noisy half is t >= 5 (paper steps 6 to 10)
    train = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    test = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 6.0, 6.0])
    r = M.heldout_comparison(t, train, test, diffusion, gamma=None)
    assert r["plain"]["train"] == 2.0 and r["plain"]["test"] == 3.0 and r["plain"]["test_over_train"] == 1.5
    assert r["plain_noisy_half"]["test_over_train"] == 2.0 and r["plain_noisy_half"]["standard_error"] == 0.0
    assert r["weighted"] == r["plain"]  # no gamma: nothing to weigh
    # with gamma = 1, the step t = 0 (SNR far above 1) weighs 1 / SNR, the others as computed by hand
    abar = diffusion.alphas_cumprod
    w = [min(s, 1.0) / s for s in (abar / (1 - abar)).tolist()]
    r = M.heldout_comparison(t, train, test, diffusion, gamma=1.0)
    weights = torch.tensor([w[k] for k in t.tolist()])
    assert r["weighted"]["train"] == pytest.approx((weights * train).mean().item())
    assert r["weighted"]["test_over_train"] == pytest.approx((weights * test).sum().item() / (weights * train).sum().item())
    # the standard error of the ratio against the spread of the ratio itself over many simulated pairs of
    # sets: losses that share a step-dependent level (as pairs sharing t and noise do), test 3% higher
    gen = torch.Generator().manual_seed(0)
    ratios, errors = [], []
    for _ in range(400):
        t = torch.randint(0, 10, (500,), generator=gen)
        level = torch.exp(-0.3 * t.float()) * torch.rand(500, generator=gen) * 4
        train = level * (1 + 0.5 * torch.rand(500, generator=gen))
        test = 1.03 * level * (1 + 0.5 * torch.rand(500, generator=gen))
        r = M.heldout_comparison(t, train, test, diffusion, gamma=None)["plain"]
        ratios.append(r["test_over_train"])
        errors.append(r["standard_error"])
    spread, mean_error = torch.tensor(ratios).std().item(), sum(errors) / len(errors)
    assert abs(mean_error / spread - 1) < 0.15, (mean_error, spread)  # 400 ratios: the spread is known to ~4%
    assert abs(sum(ratios) / len(ratios) - 1.03) < 3 * spread / 20


def test_heldout_compares_the_splits_at_the_same_steps_and_noise(root, tiny_ckpt, tmp_path):
    with np.load(os.path.join(root, "data", "mnist.npz"), allow_pickle=False) as f:
        images, labels = f["x_test"][:2], f["y_test"][:2]
    same = tmp_path / "same.npz"  # both splits one digit, repeated: the two sets are the same noised images
    np.savez(same, x_train=np.repeat(images[:1], 40, 0), y_train=np.repeat(labels[:1], 40),
             x_test=np.repeat(images[:1], 30, 0), y_test=np.repeat(labels[:1], 30))
    out = tmp_path / "heldout.json"
    r = run("heldout", "--checkpoint", tiny_ckpt, "--data", same, "--n", "50", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "was trained on" in r.stderr  # not the data the run trained on: said so
    result = json.loads(out.read_text())
    assert result["n"] == 30 and result["min_snr"] == 1.0  # at most the smaller split; the run's own gamma
    for name in ("plain", "weighted", "plain_noisy_half", "weighted_noisy_half"):
        assert result["losses"][name]["test_over_train"] == 1.0 and result["losses"][name]["standard_error"] == 0.0
        assert f"{name}: train " in r.stdout
    assert result["losses"]["weighted"]["train"] < result["losses"]["plain"]["train"]  # Min-SNR lowers the early steps
    # one digit for training, another for test: each split's loss is that of its own digit
    apart = tmp_path / "apart.npz"
    np.savez(apart, x_train=np.repeat(images[:1], 40, 0), y_train=np.repeat(labels[:1], 40),
             x_test=np.repeat(images[1:], 30, 0), y_test=np.repeat(labels[1:], 30))
    r = run("heldout", "--checkpoint", tiny_ckpt, "--data", apart, "--out", out, "--quiet", "--seed", "3")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())["losses"]["plain"]
    model, diffusion, _ = M.load_unet(str(tiny_ckpt))
    for split, k in (("train", 0), ("test", 1)):
        x = M.to_model(torch.from_numpy(np.repeat(images[k:k + 1], 30, 0)).float()[:, None] / 255)
        _, errors = M.noise_errors(model, diffusion, x, torch.from_numpy(np.repeat(labels[k:k + 1], 30)).long(), 3, "cpu")
        assert result[split] == pytest.approx(errors.mean().item(), rel=1e-5)
    assert result["test_over_train"] != 1.0


def test_the_embedding_token_is_one_more_key_and_value_for_every_window_of_its_image(root, small_data, tmp_path):
    torch.manual_seed(0)
    attn = M.SelfAttention(8, 4, window=7, embed_dim=12)
    x, emb = torch.randn(2, 8, 14, 14), torch.randn(2, 12)
    out = attn(x, emb)
    # the bottom-left window of image 1 by hand: its 49 pixels and the token of image 1 as keys and values
    qkv = attn.qkv(attn.norm(x))[1, :, 7:, :7].flatten(1).T
    q, k, v = qkv.chunk(3, dim=-1)
    k_emb, v_emb = attn.token(emb[1]).chunk(2)
    k, v = torch.cat([k, k_emb[None]]), torch.cat([v, v_emb[None]])
    ref = torch.softmax(q @ k.T / 8 ** 0.5, dim=-1) @ v
    ref = x[1, :, 7:, :7] + attn.proj(ref.T.reshape(1, 8, 7, 7))[0]
    assert torch.allclose(out[1, :, 7:, :7], ref, atol=1e-5)
    # with the residual layers deaf to the embedding, the label still reaches the output through the token
    net = M.MnistUNet(M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16), scale_shift=True, embed_token=True)).eval()
    deaf = M.MnistUNet(M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16), scale_shift=True)).eval()
    for model in (net, deaf):
        for layer in model.modules():
            if isinstance(layer, M.ResidualLayer):
                torch.nn.init.zeros_(layer.emb.weight)
                torch.nn.init.zeros_(layer.emb.bias)
    x_t, t = torch.randn(1, 1, 28, 28), torch.tensor([5])
    with torch.no_grad():
        assert not torch.allclose(net(x_t, t, torch.tensor([3])), net(x_t, t, torch.tensor([8])))
        assert torch.equal(deaf(x_t, t, torch.tensor([3])), deaf(x_t, t, torch.tensor([8])))
    # the flag trains such a network and its checkpoint rebuilds it
    out = tmp_path / "token.pt"
    r = run("train", *TINY_MODEL, "--embedding-token", "--limit", "64", "--epochs", "1", "--data", small_data, "--out", out)
    assert r.returncode == 0, r.stderr
    model, _, ckpt = M.load_unet(out)
    assert ckpt["model_config"]["embed_token"] and all(b.attn.token is not None for b in [*model.down, *model.up])


def test_scale_shift_with_a_silent_embedding_is_the_plain_layer():
    torch.manual_seed(0)
    plain, modulated = M.ResidualLayer(8, 16, 12, 4), M.ResidualLayer(8, 16, 12, 4, scale_shift=True)
    shared = {k: v for k, v in plain.state_dict().items() if not k.startswith("emb.")}
    modulated.load_state_dict({**modulated.state_dict(), **shared})
    for layer in (plain, modulated):
        torch.nn.init.zeros_(layer.emb.weight)
        torch.nn.init.zeros_(layer.emb.bias)
    x, emb = torch.randn(3, 8, 7, 7), torch.randn(3, 12)
    assert torch.allclose(plain(x, emb), modulated(x, emb), atol=1e-6)
    # a scale of -1 switches the second convolution's input off: only the skip path and conv2's bias remain
    torch.nn.init.constant_(modulated.emb.bias[:16], -1.0)
    expected = modulated.skip(x) + modulated.conv2.bias[None, :, None, None]
    assert torch.allclose(modulated(x, emb), expected, atol=1e-5)
    net = M.MnistUNet(M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16), res_layers=2, scale_shift=True))
    assert all(len(block.res) == 2 for block in [*net.down, *net.up])
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([0, 9]), torch.tensor([3, -1])).shape == (2, 1, 28, 28)


def test_residual_layers_per_level_mirror_on_the_up_path_and_survive_a_checkpoint(root, tmp_path):
    cfg = M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16), res_layers=(1, 1, 2, 3), scale_shift=True)
    net = M.MnistUNet(cfg)
    assert [len(b.res) for b in net.down] == [1, 1, 2, 3] and [len(b.res) for b in net.up] == [3, 2, 1, 1]
    # the recorded config (lists, as JSON-like data) rebuilds the same network
    assert M.unet_config(M.config_dict(cfg)) == cfg
    assert M.MnistUNet(M.unet_config(M.config_dict(cfg))).load_state_dict(net.state_dict())
    r = run("train", "--res-layers", "1", "2", "--limit", "64", "--epochs", "1", "--out", tmp_path / "x.pt")
    assert r.returncode == 2 and "--res-layers takes one number or four" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.pt").exists()


def test_each_further_embedding_layer_is_a_linear_map_and_silu_after_the_sum_of_step_and_class():
    torch.manual_seed(0)
    one, two = StepAndClassEmbedding(10, 16, 10, 4.0), StepAndClassEmbedding(10, 16, 10, 4.0, layers=2)
    # one layer keeps the parameters of the checkpoints from before the option
    assert set(one.state_dict()) == {"fourier.W", "time_proj.weight", "time_proj.bias", "class_proj.weight"}
    two.load_state_dict({**two.state_dict(), **one.state_dict()})
    t, y = torch.tensor([0, 5, 9]), torch.tensor([3, -1, 7])
    hidden = two.hidden[0]
    assert torch.allclose(two(t, y), torch.nn.functional.silu(one(t, y) @ hidden.weight.T + hidden.bias), atol=1e-6)
    cfg = M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16), scale_shift=True, embed_layers=3)
    net = M.build_unet(M.config_dict(cfg))
    assert len(net.embed.hidden) == 2
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([0, 9]), torch.tensor([3, -1])).shape == (2, 1, 28, 28)


def test_min_snr_weights_each_example_by_min_snr_over_snr():
    diffusion = utils.Diffusion(20, "cosine")
    x_0 = torch.zeros(64, 1, 4, 4)
    zero = lambda x, t, y: torch.zeros_like(x)  # eps_pred = 0: each example's loss is mean(noise^2)
    gamma = 5.0
    loss = diffusion.training_loss(zero, x_0, None, utils.make_generator(3), min_snr=gamma)
    gen = utils.make_generator(3)  # the same draws by hand
    t = torch.randint(0, 20, (64,), generator=gen)
    noise = torch.randn(x_0.shape, generator=gen)
    snr = diffusion.alphas_cumprod[t] / (1 - diffusion.alphas_cumprod[t])
    weight = torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))
    assert loss.item() == pytest.approx((weight * noise.square().mean((1, 2, 3))).mean().item(), rel=1e-5)
    assert (weight < 1).any() and (weight == 1).any()  # both regimes are exercised
    # a gamma above every SNR weighs nothing: the plain loss
    plain = diffusion.training_loss(zero, x_0, None, utils.make_generator(3))
    assert diffusion.training_loss(zero, x_0, None, utils.make_generator(3), min_snr=1e9).item() == pytest.approx(plain.item())


def test_sampled_min_snr_draws_t_by_weight_and_keeps_the_expected_loss():
    T, gamma = 20, 1.0
    diffusion = utils.Diffusion(T, "cosine")
    # the weights by hand from the cosine schedule's abar_t, indexed t = 0..T-1 for steps 1..T
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = [f(s + 1) / f(0) for s in range(T)]
    weight = torch.tensor([min(a / (1 - a), gamma) / (a / (1 - a)) for a in abar])
    assert torch.allclose(diffusion.min_snr_weights(gamma), weight, rtol=1e-4)

    # a "model" whose error depends on t only: eps_pred = c_t everywhere, so the expected squared
    # error of an example at step t is 1 + c_t^2, and the expected loss is mean_t weight_t (1 + c_t^2)
    c = torch.linspace(-2, 2, T)
    seen = []

    def model(x, t, y):
        seen.append(t)
        return c[t][:, None, None, None].expand_as(x)

    x_0 = torch.zeros(4000, 1, 2, 2)
    expected = (weight * (1 + c ** 2)).mean().item()
    for mode in ("weight", "sample"):
        seen.clear()
        loss = diffusion.training_loss(model, x_0, None, utils.make_generator(5), min_snr=gamma, min_snr_mode=mode)
        assert loss.item() == pytest.approx(expected, rel=0.05), mode
    # sampled: each step turns up in proportion to its weight (4000 draws; a step of share p has
    # a standard deviation of sqrt(p (1 - p) / 4000) < 0.008)
    share = torch.bincount(seen[0], minlength=T).float() / len(seen[0])
    assert torch.allclose(share, weight / weight.sum(), atol=0.025)
    assert share[:3].sum() < 0.5 * 3 / T  # the nearly clean steps are drawn far less than uniformly
    with pytest.raises(ValueError, match="choose 'weight' or 'sample'"):
        diffusion.training_loss(model, x_0, None, utils.make_generator(5), min_snr=gamma, min_snr_mode="uniform")


def test_v_prediction_gives_the_noise_and_the_loss_of_v():
    T, gamma = 20, 5.0
    diffusion = utils.Diffusion(T, "cosine")
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    # abar_t by hand, with each beta capped at 0.999 as the schedule does (f(T) = 0 would give abar_T = 0)
    abar = torch.tensor([math.prod(1 - min(1 - f(k) / f(k - 1), 0.999) for k in range(1, s + 2)) for s in range(T)],
                        dtype=torch.float64)
    snr = abar / (1 - abar)
    # the image error counts min(1 + SNR, gamma): on the noise error that is min(1 + SNR, gamma) / SNR
    expected = torch.tensor([min(1 + r, gamma) / r for r in snr.tolist()])
    assert torch.allclose(diffusion.min_snr_weights(gamma, "v"), expected.float(), rtol=1e-4)

    # a network whose last layer outputs the true v = sqrt(abar) eps - sqrt(1 - abar) x_0 returns eps
    torch.manual_seed(0)
    net = M.MnistUNet(M.MnistUNetConfig(T=T, channels=(8, 8, 16, 16), prediction="v")).eval()
    x_0, eps, t = torch.rand(6, 1, 28, 28) * 2 - 1, torch.randn(6, 1, 28, 28), torch.tensor([0, 3, 9, 15, 18, 19])
    a = abar[t].float()[:, None, None, None]
    x_t = diffusion.q_sample(x_0, t, eps)
    v = a.sqrt() * eps - (1 - a).sqrt() * x_0

    class Fixed(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, h):
            return self.out + v

    net.conv_out = Fixed(torch.zeros(()))
    with torch.no_grad():
        assert torch.allclose(net(x_t, t, None), eps, atol=1e-4)
        # an error d in v is an error sqrt(abar) d in eps; weighted, the loss is that of v times min(1 + SNR, gamma) / (1 + SNR)
        net.conv_out = Fixed(torch.full((), 0.1))
        err = (net(x_t, t, None) - eps).square().flatten(1).mean(1)
    w = diffusion.min_snr_weights(gamma, "v")[t]
    assert torch.allclose(w * err, 0.01 * (snr[t].float() + 1).clamp(max=gamma) / (1 + snr[t].float()), rtol=1e-2)
    with pytest.raises(ValueError, match="choose 'eps' or 'v'"):
        M.MnistUNet(M.MnistUNetConfig(T=T, channels=(8, 8, 16, 16), prediction="x0"))


def test_model_guidance_trains_labelled_examples_toward_the_guided_noise():
    T, m, p_uncond = 20, 0.3, 0.3
    diffusion = utils.Diffusion(T, "cosine")
    scale = torch.tensor(1.5, requires_grad=True)

    def model(x, t, y):  # depends on the label (none = -1), so eps(y) - eps(none) is not zero
        return scale * x * (1 + 0.1 * (y + 1))[:, None, None, None] + 0.01 * t[:, None, None, None]

    x_0, y = torch.rand(64, 1, 2, 2) * 2 - 1, torch.arange(64) % 10
    for gamma in (None, 1.0):
        loss = diffusion.training_loss(model, x_0, y, utils.make_generator(4), p_uncond, min_snr=gamma,
                                       model_guidance=m)
        (grad,) = torch.autograd.grad(loss, scale)
        gen = utils.make_generator(4)  # the same draws by hand
        t = torch.randint(0, T, (64,), generator=gen)
        noise = torch.randn(x_0.shape, generator=gen)
        kept = torch.rand(64, generator=gen) >= p_uncond
        y_in = torch.where(kept, y, torch.full_like(y, -1))
        x_t = diffusion.q_sample(x_0, t, noise)
        eps = model(x_t, t, y_in)
        target = noise + m * (eps - model(x_t, t, torch.full_like(y, -1))).detach()  # no gradient through the target
        assert (target[~kept] == noise[~kept]).all()  # an unlabelled example's two predictions are the same
        weight = torch.ones(64) if gamma is None else diffusion.min_snr_weights(gamma)[t]
        expected = (weight * (eps - target).square().mean((1, 2, 3))).mean()
        (expected_grad,) = torch.autograd.grad(expected, scale)
        assert kept.any() and not kept.all()  # both kinds of example are in the batch
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert grad.item() == pytest.approx(expected_grad.item(), rel=1e-4)
    plain = diffusion.training_loss(model, x_0, y, utils.make_generator(4), p_uncond)
    assert plain.item() != pytest.approx(loss.item(), rel=1e-3)  # the guided target is not the plain one


def test_model_guidance_is_stationary_at_the_guided_optimum():
    """A 'network' eps = s[y, t] x_t with one number per label and step, on one-pixel data c_y per class:
    the plain loss is least at s*_y = sqrt(1 - abar) / (abar c_y^2 + 1 - abar) (the regression of eps on
    x_t), and model guidance m should make it stationary at s*_y + m / (1 - m) (s*_y - s*_none) instead,
    the guided prediction at w = m / (1 - m), with the unlabelled entry left at s*_none."""
    T, m, p_uncond, n = 4, 0.5, 0.2, 4_000_000
    diffusion = utils.Diffusion(T, "linear")
    abar = diffusion.alphas_cumprod.float()
    c = torch.tensor([2.0, 0.2])
    y = torch.arange(n) % 2
    x_0 = c[y][:, None]
    optimum = lambda c2: (1 - abar).sqrt() / (abar * c2 + 1 - abar)  # (T,)
    plain = torch.stack([optimum(c[0] ** 2), optimum(c[1] ** 2), optimum(c.square().mean())])  # labels 0, 1, none
    guided = plain.clone()
    guided[:2] = plain[:2] + m / (1 - m) * (plain[:2] - plain[2])

    def gradient(s):
        s = s.clone().requires_grad_(True)
        model = lambda x, t, label: s[label.where(label >= 0, 2), t][:, None] * x
        loss = diffusion.training_loss(model, x_0, y, utils.make_generator(0), p_uncond, model_guidance=m)
        return torch.autograd.grad(loss, s)[0]

    at_guided, at_plain = gradient(guided), gradient(plain)
    assert at_plain[:2].abs().max() > 1e-3  # the plain optimum is not where model guidance settles
    assert at_guided[:2].norm() < 0.1 * at_plain[:2].norm()  # sampling error only (about 0.03 of it)
    assert at_guided[2].abs().max() < 0.1 * at_plain[:2].abs().max()


def test_chunked_sampling_passes_give_the_one_batch_result(monkeypatch):
    torch.manual_seed(0)
    net = M.MnistUNet(M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16))).eval()
    x, t, y = torch.randn(7, 1, 28, 28), torch.arange(7), torch.tensor([0, 1, 2, -1, 4, 5, -1])
    with torch.no_grad():
        whole = net(x, t, y, chunk=1000)
        chunked = net(x, t, y, chunk=3)
    assert torch.allclose(whole, chunked, atol=1e-5)
    diffusion = utils.Diffusion(10, "cosine")
    monkeypatch.setattr(M, "CHUNK", 1000)
    a = M.draw(net, diffusion, torch.arange(6), 1.0, 0, "cpu")
    monkeypatch.setattr(M, "CHUNK", 4)  # the guided pass of 6 digits is 12 images: three chunks
    b = M.draw(net, diffusion, torch.arange(6), 1.0, 0, "cpu")
    assert torch.allclose(a, b, atol=1e-4)


def test_checkpoints_from_before_res_layers_still_load(tmp_path):
    torch.manual_seed(0)
    cfg = M.MnistUNetConfig(T=10, channels=(8, 8, 16, 16))
    net = M.MnistUNet(cfg)
    old_keys = {k.replace(".res.0.", ".res."): v for k, v in net.state_dict().items()}
    config = M.config_dict(cfg)
    del config["res_layers"], config["scale_shift"]
    path = tmp_path / "old.pt"
    utils.save_checkpoint(str(path), {"kind": "mnist", "T": 10, "schedule": "cosine", "model_config": config,
                                      "model": old_keys, "train": {}})
    model, _, _ = M.load_unet(str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())


def test_progress_figure_and_replot(root, tiny_ckpt, tmp_path):
    assert M.snapshot_epochs(22) == [1, 2, 4, 8, 16, 22] and M.snapshot_epochs(1) == [1]
    hist = torch.load(tiny_ckpt, weights_only=True)["train"]["history"]
    assert hist["snapshot_epochs"] == [1, 2, 3]
    assert [tuple(s.shape) for s in hist["snapshots"]] == [(10, 28, 28)] * 3 and hist["snapshots"][0].dtype == torch.uint8
    r = run("progress", "--checkpoint", tiny_ckpt, "--out", tmp_path / "training.png", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    r = run("evaluate", "--replot", "--out", tmp_path / "none.json")
    assert r.returncode == 2 and "none.json not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    shipped = json.load(open(os.path.join(root, "figures", "mnist_eval.json")))
    (tmp_path / "ev.json").write_text(json.dumps(shipped))
    r = run("evaluate", "--replot", "--out", tmp_path / "ev.json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ev.png").exists()


def test_study_figure_reads_each_run_at_w0(root, run_here, tmp_path):
    study = os.path.join(root, "figures", "mnist_study")
    points = M.design_points(study)
    assert len(points) == len(M.DESIGN_RUNS)
    # the shipped run's point is the shipped evaluation's entry at w = 0, seed by seed
    shipped = points[M.design_run_index(M.SHIPPED_RUN)]
    for p, name in zip(shipped, ("mnist_eval.json", "mnist_eval_seed1.json")):
        ev = json.load(open(os.path.join(root, "figures", name)))
        e = next(e for e in ev["by_w"] if e["w"] == 0 and e["sampler"] == "ddpm" and e["steps"] == 200)
        assert p.accuracy == pytest.approx(100 * e["accuracy"]) and p.samples == 1000
        assert p.frechet_ratio == pytest.approx(e["frechet_distance"] / ev["frechet_floor_train_vs_test"])
        assert p.real_accuracy == pytest.approx(100 * ev["real_test_accuracy"])
        assert p.misread == {m["index"] for m in e["misread"]} and len(p.misread) == round(1000 * (1 - e["accuracy"]))
    assert points[0][1] is None  # the first model was not evaluated at seed 1
    assert points[0][0].misread is None  # nor were its misread samples kept
    r = run("study", "--out", tmp_path / "study.png", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    numbers = json.load(open(tmp_path / "study.json"))
    assert [run["stem"] for run in numbers["runs"]] == [stem for stem, _ in M.DESIGN_RUNS]
    # the reference of the shared misreads shares all of its own
    assert numbers["reference"] == M.REFERENCE_RUN and numbers["shipped"] == M.SHIPPED_RUN
    ref = M.design_run_index(M.REFERENCE_RUN)
    assert [(s["misread"], s["also_misread_by_reference"]) for s in numbers["runs"][ref]["seeds"]] == [
        (len(p.misread),) * 2 for p in points[ref]]
    # a folder lacking a run: one line naming it, no figure
    for name in os.listdir(study):
        if not name.startswith("bias_22_epochs"):
            (tmp_path / name).write_bytes(open(os.path.join(study, name), "rb").read())
    status, out, err = run_here("mnist_ddpm.py", "study", "--study-dir", tmp_path, "--out", tmp_path / "none.png")
    assert status == 2 and "bias_22_epochs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.png").exists()
    (tmp_path / "bias_22_epochs_eval.json").write_text('{"by_w": [')  # cut short
    status, out, err = run_here("mnist_ddpm.py", "study", "--study-dir", tmp_path, "--out", tmp_path / "none.png")
    assert status == 2 and "bias_22_epochs_eval.json is not an evaluation" in err and len(err.strip().splitlines()) == 1
    status, out, err = run_here("mnist_ddpm.py", "study", "--study-dir", tmp_path / "nowhere", "--out", tmp_path / "none.png")
    assert status == 2 and "not found" in err and len(err.strip().splitlines()) == 1


def test_shared_misreads_counts_the_same_noise_and_the_chance_of_it():
    def point(misread):
        return M.DesignPoint(99.6, 1.0, 1000, 99.7, frozenset(misread))
    points = [[None, None] for _ in M.DESIGN_RUNS]
    ref = M.design_run_index(M.REFERENCE_RUN)
    points[ref] = [point({5, 150, 420, 421}), point({7})]
    points[0] = [point({5, 151, 420, 999}), None]
    points[1] = [M.DesignPoint(99.0, 1.0, 1000, 99.7, None), point({7, 8})]
    shared = M.shared_misreads(points)
    # samples 5 and 420 are wrong in both; by digit (100 samples each) the reference misreads one 0, one 1 and
    # two 4s, the other run one 0, one 1, one 4 and one 9: (1 * 1 + 1 * 1 + 2 * 1 + 0 * 1) / 100 by chance
    assert shared[0] == [(4, 2, pytest.approx(0.04)), None]
    assert shared[1] == [None, (2, 1, pytest.approx(0.02))]  # seed 0 kept no misreads
    assert shared[ref] == [(4, 4, pytest.approx((1 + 1 + 4) / 100)), (1, 1, pytest.approx(0.01))]
    # an entry that kept fewer misread samples than it counted cannot be compared
    result = {"n_per_digit": 100}
    entry = {"accuracy": 0.98, "misread": [{"index": i} for i in range(15)]}
    assert M.misread_indices(result, entry) is None
    assert M.misread_indices(result, dict(entry, accuracy=0.985)) == frozenset(range(15))


def test_inpaint_keeps_the_kept_pixels_and_edit_follows_t0(root, tiny_ckpt, small_data, tmp_path):
    out = tmp_path / "inp.npy"
    r = run("inpaint", "--checkpoint", tiny_ckpt, "--data", small_data, "--index", 7, "--mask", "top",
            "--n", 3, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    x = np.load(out, allow_pickle=False)
    image = M.load_mnist(small_data, "test")[0][7, 0].numpy()
    assert x.shape == (3, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert (x[:, 14:] == image[14:]).all()  # the bottom half is kept exactly
    assert np.abs(x[:, :14] - image[:14]).max() > 0.1  # the top half is drawn anew
    region = M.removed_region("centre")
    assert region.sum() == 196 and region[7:21, 7:21].all()
    # SDEdit: with t0 = 1 the image changes little; with t0 = T the result no longer depends on it
    model, diffusion, _ = M.load_unet(str(tiny_ckpt))
    images = M.load_mnist(small_data, "test")[0][:2, 0]
    labels = torch.tensor([3])
    near = [M.edit(model, diffusion, img, 1, labels, 0.0, 0, "cpu") for img in images]
    far = [M.edit(model, diffusion, img, diffusion.T, labels, 0.0, 0, "cpu") for img in images]
    change_near = (near[0] - images[0]).abs().mean().item()
    change_far = (far[0] - images[0]).abs().mean().item()
    assert change_near < 0.5 * change_far
    assert (far[0] - far[1]).abs().mean().item() < 0.01 and (near[0] - near[1]).abs().mean().item() > 0.05
    r = run("edit", "--checkpoint", tiny_ckpt, "--data", small_data, "--index", 0, "--t0", 5, "--label", 2,
            "--n", 2, "--out", tmp_path / "edit.npy", "--quiet")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "edit.npy").shape == (2, 28, 28)


@pytest.mark.parametrize("args, needle", [
    (["inpaint", "--index", "10000", "--mask", "top"], "digits 0 to 9999"),
    (["inpaint", "--index", "-1", "--mask", "top"], "digits 0 to 9999"),
    (["inpaint", "--index", "3", "--mask", "middle"], "invalid choice"),
    (["inpaint", "--index", "3", "--mask", "left", "--label", "12"], "digit 0-9"),
    (["edit", "--index", "3", "--t0", "0"], "positive integer"),
    (["edit", "--index", "3", "--t0", "201"], "between 1 and T"),
])
def test_inpaint_and_edit_refuse_bad_input(run_here, tmp_path, args, needle):
    status, _, err = run_here("mnist_ddpm.py", *args, "--out", tmp_path / "x.npy")
    assert status == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.npy").exists()


def test_prior_figures_and_numbers(root, tiny_ckpt, tiny_clf, small_data, tmp_path):
    r = run("prior", "--checkpoint", tiny_ckpt, "--classifier", tiny_clf, "--data", small_data, "--n", 1,
            "--out", tmp_path / "mnist_inpaint.png", "--quiet")
    assert r.returncode == 0, r.stderr
    inp = json.loads((tmp_path / "mnist_inpaint.json").read_text())
    assert set(inp["by_mask"]) == set(M.MASKS)
    assert all(0 <= v["own_label_read_as_requested"] <= 1 for v in inp["by_mask"].values())
    assert all(v[f"{mode}_removed_pixels_mean_abs_change"] > 0 for v in inp["by_mask"].values() for mode in ("own", "other"))
    ed = json.loads((tmp_path / "mnist_edit.json").read_text())
    assert ed["t0"] == [1, 2, 5, 6, 8, 9, 10]  # shares of T = 10
    changes = [e["own_mean_abs_change"] for e in ed["by_t0"]]
    assert changes[0] < changes[-1]  # the higher t0, the more of the image is redrawn
    assert (tmp_path / "mnist_edit.png").exists() and (tmp_path / "mnist_inpaint.png").exists()
