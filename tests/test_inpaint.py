"""Inpainting one pixel given the other: the exact conditional, the samplers, the command line."""
import numpy as np
import pytest
import torch

from helpers import run_script
import utils
from gmm import TwoPixelGMM


def run(*args):
    """visualize.py with these arguments, inside this process (tests/helpers.py)."""
    return run_script("visualize.py", *args)


@pytest.mark.parametrize("known, v", [(0, 0.35), (0, 0.55), (1, 0.55), (1, 0.2)])
def test_exact_conditional_matches_the_joint_density_integrated_numerically(known, v):
    gmm = TwoPixelGMM()
    xs = np.linspace(-1.0, 2.0, 6001)
    pts = np.stack([np.full_like(xs, v), xs], 1) if known == 0 else np.stack([xs, np.full_like(xs, v)], 1)
    joint = gmm.log_prob(torch.from_numpy(pts)).exp().numpy()  # p(x_known = v, x_other = x)
    expected = joint / np.trapezoid(joint, xs)
    got = gmm.conditional_density(xs, v, known).numpy()
    assert np.abs(got - expected).max() < 1e-6 * expected.max()
    draws = gmm.sample_conditional(200_000, v, known, utils.make_generator(0)).numpy()
    mean = np.trapezoid(xs * expected, xs)
    assert abs(draws.mean() - mean) < 0.002


def mixture_eps_star(weights, means, std, alphas_cumprod):
    """The exact noise predictor of a 1-D Gaussian mixture under the forward process, by hand:
    eps* = sqrt(1 - abar) sum_k r_k (x - sqrt(abar) m_k) / v_k, v_k = abar s^2 + 1 - abar."""
    def eps(x_t, t, y=None):
        abar = alphas_cumprod[t].reshape(-1, 1, 1)
        x = x_t.double()
        var = abar * std**2 + 1 - abar
        loc = abar.sqrt() * means.reshape(1, 1, -1)
        log_r = weights.log().reshape(1, 1, -1) - 0.5 * (x - loc) ** 2 / var - 0.5 * var.log()
        r = torch.softmax(log_r, dim=-1)
        return ((1 - abar).sqrt() * (r * (x - loc)).sum(-1, keepdim=True) / var).to(x_t.dtype)
    return eps


def test_a_chain_driven_by_the_conditionals_own_eps_lands_on_it():
    # the machinery is right: with the exact eps* of p(x_L | x_R = 0.55) itself (bimodal), DDPM at
    # T = 200 reproduces it, so what the replacement samplers miss is their own error
    from scipy import stats
    gmm = TwoPixelGMM()
    weights, means, std = gmm.conditional(0.55, known=1)
    diffusion = utils.Diffusion(200, "cosine")
    eps = mixture_eps_star(weights, means, std, diffusion.alphas_cumprod)
    gen = utils.make_generator(0)
    x = diffusion.p_sample_loop(eps, torch.randn(4000, 1, 1, generator=gen), None, 0.0, gen).flatten().numpy()
    exact = gmm.sample_conditional(4000, 0.55, 1, utils.make_generator(1)).numpy()
    other = gmm.sample_conditional(4000, 0.55, 1, utils.make_generator(2)).numpy()
    floor = stats.wasserstein_distance(other, exact)
    assert stats.wasserstein_distance(x, exact) < 3 * floor + 0.005
    assert abs(np.mean(x > 0.55) - np.mean(exact > 0.55)) < 0.03


def test_replacement_keeps_the_known_pixel_and_repaint_corrects_its_bias():
    # with the exact oracle at T = 50 and the left pixel at 0.35: the exact conditional puts 84% of
    # the right pixel above 0.55; replacement falls short of that, RePaint's resampling gets close
    gmm = TwoPixelGMM()
    diffusion = utils.Diffusion(50, "cosine")
    oracle = gmm.oracle(diffusion.alphas_cumprod)
    n = 2000
    mask = torch.tensor([True, False]).reshape(1, 1, 2)
    known = torch.full((n, 1, 2), 0.35)
    shares = {}
    for resample, jump in ((1, 1), (10, 5)):
        gen = utils.make_generator(0)
        x = utils.inpaint(diffusion, oracle, torch.randn(n, 1, 2, generator=gen), known, mask, generator=gen,
                          resample=resample, jump=jump).reshape(n, 2)
        assert (x[:, 0] == known[0, 0, 0]).all()
        shares[resample] = (x[:, 1] > 0.55).float().mean().item()
    exact = float(1 - torch.distributions.Normal(0.65, 0.1).cdf(torch.tensor(0.55)))
    assert exact == pytest.approx(0.841, abs=1e-3)
    assert shares[1] < exact - 0.05 and abs(shares[10] - exact) < abs(shares[1] - exact) / 2
    with pytest.raises(ValueError):
        utils.inpaint(diffusion, oracle, torch.zeros(2, 1, 2), known[:2], mask, resample=0)


def test_samples_known_left_writes_the_exact_value(root, tmp_path):
    out = tmp_path / "s.npy"
    r = run("--task", "samples", "--T", 50, "--n", 64, "--seed", 3, "--known-left", 0.35, "--out", out)
    assert r.returncode == 0, r.stderr
    x = np.load(out, allow_pickle=False)
    assert x.shape == (64, 2) and x.dtype == np.float32 and (x[:, 0] == np.float32(0.35)).all()
    assert x[:, 1].std() > 0.03  # the other pixel is drawn, not fixed
    r = run("--task", "samples", "--T", 50, "--n", 16, "--known-right", 0.2, "--inpaint", "repaint",
            "--resample", 2, "--jump", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    assert (np.load(out)[:, 1] == np.float32(0.2)).all()
    for args, needle in ((["--known-left", 0.3, "--known-right", 0.5], "not both"),
                         (["--inpaint", "repaint"], "need --known-left"),
                         (["--known-left", 0.3, "--resample", 3], "repaint only"),
                         (["--known-left", "nan"], "finite")):
        r = run("--task", "samples", *args, "--out", out)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
