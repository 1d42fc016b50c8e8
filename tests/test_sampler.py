"""The DDPM sampler and classifier-free guidance, checked with the exact oracle (no training involved)."""
import torch

import utils
from gmm import TwoPixelGMM

N = 4000


def oracle_samples(T, seed, label=None, w=0.0, diffusion=None):
    g = TwoPixelGMM()
    d = diffusion or utils.Diffusion(T)
    gen = utils.make_generator(seed)
    x_T = torch.randn(N, 1, 2, generator=gen)
    y = None if label is None else torch.full((N,), label)
    return d.p_sample_loop(g.oracle(d.alphas_cumprod), x_T, y, w, gen).reshape(N, 2)


def test_oracle_driven_sampler_reproduces_ground_truth_at_large_T():
    g = TwoPixelGMM()
    x = oracle_samples(200, seed=0)
    ref, _ = g.sample(N, utils.make_generator(100))
    other, _ = g.sample(N, utils.make_generator(101))
    floor = utils.energy_distance(other, ref)  # two ground-truth samples of the same size
    ed = utils.energy_distance(x, ref)
    assert ed < 5e-4 and ed < 3 * floor + 2e-4, (ed, floor)
    share = (g.nearest_class(x) == 1).float().mean().item()
    assert abs(share - 0.65) < 0.02


def test_sampler_without_posterior_noise_is_caught_by_the_same_check():
    # Negative control: the check above must fail for a wrong sampler (z scaled to 0).
    g = TwoPixelGMM()
    d = utils.Diffusion(200)
    d.posterior_variance = torch.zeros_like(d.posterior_variance)
    x = oracle_samples(200, seed=0, diffusion=d)
    ref, _ = g.sample(N, utils.make_generator(100))
    assert utils.energy_distance(x, ref) > 5e-3


def test_conditional_oracle_sampling_lands_in_the_requested_class():
    g = TwoPixelGMM()
    for label in (0, 1):
        x = oracle_samples(50, seed=1, label=label)
        assert (g.nearest_class(x) == label).float().mean().item() >= 0.99
        assert torch.allclose(x.mean(0), g.means[label].float(), atol=0.02)


def test_guidance_pushes_away_from_the_other_class():
    # eps_bar = (1 + w) eps(x|y) - w eps(x): w > 0 moves samples further from the other mode
    g = TwoPixelGMM()
    other = g.means[1].float()
    x0 = oracle_samples(50, seed=2, label=0, w=0.0)
    x4 = oracle_samples(50, seed=2, label=0, w=4.0)
    d0 = (x0 - other).norm(dim=1).mean()
    d4 = (x4 - other).norm(dim=1).mean()
    assert d4 > d0 + 0.02
    assert (g.nearest_class(x4) == 0).float().mean() >= (g.nearest_class(x0) == 0).float().mean()


def test_guided_eps_is_one_batched_call_with_the_right_combination():
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        return torch.where((y == utils.NULL_LABEL)[:, None, None], torch.ones_like(x), 3 * torch.ones_like(x))

    x = torch.zeros(4, 1, 2)
    t = torch.zeros(4, dtype=torch.int64)
    eps = utils.guided_eps(model, x, t, torch.tensor([0, 1, 0, 1]), w=2.0)
    assert len(calls) == 1 and calls[0].tolist() == [0, 1, 0, 1, -1, -1, -1, -1]
    assert torch.allclose(eps, torch.full_like(x, 3 * 3 - 2 * 1))  # (1 + w) 3 - w 1
    assert torch.allclose(utils.guided_eps(model, x, t, torch.tensor([0, 1, 0, 1]), w=-1.0), torch.ones_like(x))


def test_trajectory_is_in_paper_order_and_matches_the_loop():
    g = TwoPixelGMM()
    d = utils.Diffusion(10)
    x_T = torch.randn(50, 1, 2, generator=utils.make_generator(0))
    traj = d.sample_trajectory(g.oracle(d.alphas_cumprod), x_T, generator=utils.make_generator(5))
    x_0 = d.p_sample_loop(g.oracle(d.alphas_cumprod), x_T, generator=utils.make_generator(5))
    assert traj.shape == (11, 50, 1, 2)
    assert torch.equal(traj[10], x_T) and torch.equal(traj[0], x_0)


def test_sampling_repeats_with_the_same_seed():
    assert torch.equal(oracle_samples(20, seed=7), oracle_samples(20, seed=7))
    assert not torch.equal(oracle_samples(20, seed=7), oracle_samples(20, seed=8))


def test_energy_distance_matches_scipy_in_one_dimension():
    # scipy.stats.energy_distance is 1-D only and returns the square root of ours
    from scipy.stats import energy_distance as scipy_energy_distance

    gen = utils.make_generator(0)
    u, v = torch.randn(300, generator=gen), 0.5 + 2 * torch.randn(400, generator=gen)
    pad = lambda a: torch.stack([a, torch.zeros_like(a)], dim=1)
    ours = utils.energy_distance(pad(u), pad(v))
    assert abs(ours - scipy_energy_distance(u.numpy(), v.numpy()) ** 2) < 1e-9
    assert utils.energy_distance(pad(u), pad(u)) == 0.0


def test_respacing_keeps_alphas_cumprod_at_the_kept_steps():
    d = utils.Diffusion(50)
    short, kept = d.respaced(10)
    assert kept[0] == 0 and kept[-1] == 49 and len(kept) == 10
    assert torch.allclose(short.alphas_cumprod, d.alphas_cumprod[kept])
    same, kept_all = d.respaced(50)
    assert torch.equal(kept_all, torch.arange(50)) and torch.allclose(same.betas, d.betas)


def test_respacing_to_one_step_keeps_the_last_step():
    short, kept = utils.Diffusion(50).respaced(1)
    assert kept.tolist() == [49] and short.T == 1


def test_strided_ddpm_with_all_steps_equals_full_ddpm():
    g = TwoPixelGMM()
    d = utils.Diffusion(20)
    oracle = g.oracle(d.alphas_cumprod)
    x_T = torch.randn(500, 1, 2, generator=utils.make_generator(0))
    full = d.p_sample_loop(oracle, x_T, generator=utils.make_generator(1))
    strided = utils.sample(d, oracle, x_T, generator=utils.make_generator(1), sampler="ddpm", steps=20)
    assert torch.equal(full, strided)


def test_strided_ddpm_with_fewer_steps_matches_ddpm_run_with_that_many_steps():
    # 100 of 1000 cosine steps: the oracle chain must reproduce the ground truth about as well
    # as a full DDPM chain with 100 steps of its own
    g = TwoPixelGMM()
    long = utils.Diffusion(1000)
    x_T = torch.randn(N, 1, 2, generator=utils.make_generator(0))
    strided = utils.sample(long, g.oracle(long.alphas_cumprod), x_T, generator=utils.make_generator(1), steps=100)
    ref, _ = g.sample(N, utils.make_generator(100))
    ed = utils.energy_distance(strided.reshape(N, 2), ref)
    assert ed < 1e-3, ed
    # negative control: the respaced chain whose denoiser is not told the original step indices
    short, _ = long.respaced(100)
    wrong = short.p_sample_loop(g.oracle(long.alphas_cumprod), x_T, generator=utils.make_generator(1))
    assert utils.energy_distance(wrong.reshape(N, 2), ref) > 10 * ed


def test_ddim_is_deterministic_and_reproduces_the_ground_truth_with_the_oracle():
    g = TwoPixelGMM()
    d = utils.Diffusion(500)
    oracle = g.oracle(d.alphas_cumprod)
    x_T = torch.randn(N, 1, 2, generator=utils.make_generator(0))
    a = utils.sample(d, oracle, x_T, generator=utils.make_generator(1), sampler="ddim", steps=200).reshape(N, 2)
    b = utils.sample(d, oracle, x_T, generator=utils.make_generator(2), sampler="ddim", steps=200).reshape(N, 2)
    assert torch.equal(a, b)  # eta = 0: no randomness after x_T
    ref, _ = g.sample(N, utils.make_generator(100))
    other, _ = g.sample(N, utils.make_generator(101))
    ed, floor = utils.energy_distance(a, ref), utils.energy_distance(other, ref)
    assert ed < 5e-4 and ed < 3 * floor + 2e-4, (ed, floor)


def test_ddim_with_eta_one_is_the_ddpm_step():
    # Song et al. 2021: eta = 1 gives the DDPM posterior mean and variance
    g = TwoPixelGMM()
    d = utils.Diffusion(30)
    oracle = g.oracle(d.alphas_cumprod)
    x_t = torch.randn(200, 1, 2, generator=utils.make_generator(0))
    for t in (29, 10, 0):
        ddpm, _ = d.p_sample(oracle, x_t, t, generator=utils.make_generator(3))
        ddim, _ = utils.ddim_step(d, oracle, x_t, t, eta=1.0, generator=utils.make_generator(3))
        assert torch.allclose(ddpm, ddim, atol=1e-4), t


def test_guided_steps_guides_only_the_noisiest_steps():
    # Record, for each network call, the step index it saw and whether the batch carried the
    # unconditional half (a guided step is one call on twice the batch).
    g = TwoPixelGMM()
    d = utils.Diffusion(20)
    oracle = g.oracle(d.alphas_cumprod)
    calls = []

    def model(x, t, y):
        calls.append((int(t[0]), bool((y == utils.NULL_LABEL).any())))
        return oracle(x, t, y)

    x_T = torch.randn(50, 1, 2, generator=utils.make_generator(0))
    y = torch.zeros(50, dtype=torch.int64)
    for sampler, steps in (("ddpm", None), ("ddpm", 10), ("ddim", 10)):
        calls.clear()
        utils.sample(d, model, x_T, y, 2.0, utils.make_generator(1), sampler, steps, guided_steps=3)
        kept = (steps or 20)
        assert len(calls) == kept and [guided for _, guided in calls] == [True] * 3 + [False] * (kept - 3)
        assert calls[0][0] == 19 and calls[-1][0] == 0  # noisiest step first, on the original step indices
    full = utils.sample(d, oracle, x_T, y, 2.0, utils.make_generator(1))
    assert torch.equal(utils.sample(d, oracle, x_T, y, 2.0, utils.make_generator(1), guided_steps=20), full)
    unguided = utils.sample(d, oracle, x_T, y, 0.0, utils.make_generator(1))
    part = utils.sample(d, oracle, x_T, y, 2.0, utils.make_generator(1), guided_steps=3)
    assert not torch.equal(part, full) and not torch.equal(part, unguided)
