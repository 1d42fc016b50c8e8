"""The noise schedules and the forward process against values computed by hand."""
import math

import pytest
import torch

import utils


def test_cosine_schedule_golden_values_T5():
    # abar_t = f(t)/f(0), f(t) = cos^2(((t/5 + 0.008)/1.008) pi/2), worked out step by step:
    #   t:     0          1          2          3          4          5
    #   angle: 0.012467   0.324133   0.635799   0.947464   1.259130   pi/2
    #   f:     0.99984459 0.89856625 0.64737759 0.34075667 0.09403100 0
    # so abar_1 = 0.89856625 / 0.99984459 = 0.89870592, and so on.
    abar_hand = [0.8987059206, 0.6474782111, 0.3408096398, 0.0940456127]
    betas_hand = [1 - 0.8987059206, 1 - 0.6474782111 / 0.8987059206, 1 - 0.3408096398 / 0.6474782111,
                  1 - 0.0940456127 / 0.3408096398, 0.999]  # the last beta is 1 before clipping
    d = utils.Diffusion(5, "cosine")
    assert d.betas.tolist() == pytest.approx(betas_hand, abs=1e-9)
    assert d.alphas_cumprod[:4].tolist() == pytest.approx(abar_hand, abs=1e-9)
    # after clipping, abar_T = abar_{T-1} * (1 - 0.999)
    assert d.alphas_cumprod[4].item() == pytest.approx(0.0940456127e-3, rel=1e-8)
    assert d.alphas.tolist() == pytest.approx([1 - b for b in betas_hand], abs=1e-9)


def test_cosine_schedule_first_beta_T1000():
    # beta_1 = 1 - cos^2((0.001+0.008)/1.008 pi/2) / cos^2(0.008/1.008 pi/2), about 4.1e-5
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    d = utils.Diffusion(1000)
    assert d.betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-12)
    assert d.betas[0].item() == pytest.approx(4.1e-5, rel=0.05)
    assert d.betas.max().item() == pytest.approx(0.999)


def test_linear_schedule_end_points():
    d = utils.Diffusion(50, "linear")
    assert d.betas[0].item() == pytest.approx(1e-4)
    assert d.betas[-1].item() == pytest.approx(0.02)
    assert d.betas[1].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 49)
    assert d.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - b for b in d.betas.tolist()))


def test_posterior_variance_is_conditional_variance_of_gaussian_pair():
    # Independent derivation: given x_0, x_{t-1} ~ N(., 1 - abar_{t-1}) and
    # x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e, so Var[x_{t-1} | x_t, x_0] =
    # (1 - abar_{t-1}) - alpha_t (1 - abar_{t-1})^2 / (1 - abar_t)   (Gaussian conditioning).
    d = utils.Diffusion(20)
    for t in range(20):
        prev = 1.0 if t == 0 else d.alphas_cumprod[t - 1].item()
        a, abar = d.alphas[t].item(), d.alphas_cumprod[t].item()
        expected = (1 - prev) - a * (1 - prev) ** 2 / (1 - abar)
        assert d.posterior_variance[t].item() == pytest.approx(expected, abs=1e-12)
    assert d.posterior_variance[0].item() == 0.0


def test_q_sample_moments():
    d = utils.Diffusion(10)
    gen = utils.make_generator(0)
    x_0 = torch.full((200_000, 1, 2), 0.7)
    t = torch.full((200_000,), 6, dtype=torch.int64)
    x_t = d.q_sample(x_0, t, torch.randn(x_0.shape, generator=gen))
    abar = d.alphas_cumprod[6].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=1e-2)


def test_extract_shapes_for_pixels_and_images():
    a = torch.arange(10, dtype=torch.float64)
    t = torch.tensor([0, 3, 9])
    assert utils.extract(a, t, (3, 1, 2)).shape == (3, 1, 1)
    assert utils.extract(a, t, (3, 1, 28, 28)).shape == (3, 1, 1, 1)
    assert utils.extract(a, t, (3, 1, 2)).flatten().tolist() == [0.0, 3.0, 9.0]


def test_bad_schedule_and_loss_names_list_the_choices():
    with pytest.raises(ValueError, match="cosine, linear"):
        utils.Diffusion(10, "quadratic")
    with pytest.raises(ValueError, match="l2, l1, huber"):
        utils.noise_loss(torch.zeros(2), torch.zeros(2), "l3")


def test_losses():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.0])
    assert utils.noise_loss(a, b, "l2").item() == pytest.approx(2.0)
    assert utils.noise_loss(a, b, "l1").item() == pytest.approx(1.0)
    assert utils.noise_loss(a, b, "huber").item() == pytest.approx(0.75)  # (2 - 0.5) / 2


def test_posterior_mean_of_predicted_x0_equals_the_eps_form_of_the_reverse_mean():
    # Ho et al. eq. 11 (eps form) and eq. 7 (x_0 form) give the same mean when x0_hat is not clipped
    d = utils.Diffusion(30)
    gen = utils.make_generator(0)
    x_t = torch.randn(64, 1, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(64, 1, 2, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 30, (64,), generator=gen)
    beta = utils.extract(d.betas, t, x_t.shape).double()
    abar = utils.extract(d.alphas_cumprod, t, x_t.shape).double()
    eps_form = (x_t - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
    x0_form = d.q_posterior_mean(d.predict_x0(x_t, t, eps), x_t, t)
    assert torch.allclose(eps_form, x0_form, atol=1e-5)
