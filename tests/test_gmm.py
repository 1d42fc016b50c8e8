"""The ground-truth mixture and its exact oracle."""
import pytest
import torch

import utils
from gmm import TwoPixelGMM


def test_sample_moments_and_class_share():
    g = TwoPixelGMM()
    x, y = g.sample(100_000, utils.make_generator(0))
    assert x.shape == (100_000, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.float().mean().item() == pytest.approx(0.65, abs=0.005)
    for k, mu in enumerate(([0.35, 0.65], [0.75, 0.45])):
        xk = x[y == k]
        assert xk.mean(0).tolist() == pytest.approx(mu, abs=3e-3)
        assert xk.std(0).tolist() == pytest.approx([0.1, 0.1], abs=3e-3)


def test_sample_with_label_and_generator_repeats():
    g = TwoPixelGMM()
    a, ya = g.sample(10, utils.make_generator(3), label=0)
    b, _ = g.sample(10, utils.make_generator(3), label=0)
    assert torch.equal(a, b) and (ya == 0).all()


def test_density_integrates_to_one_and_noised_marginal_is_standard_normal_at_abar_0():
    g = TwoPixelGMM()
    xs = torch.linspace(-0.5, 1.5, 401)
    dens = g.density_grid(xs, xs, alpha_bar=1.0)
    cell = (xs[1] - xs[0]).item() ** 2
    assert dens.sum() * cell == pytest.approx(1.0, abs=1e-3)
    x = torch.randn(100, 2, dtype=torch.float64)
    std_normal = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    assert torch.allclose(g.log_prob(x, alpha_bar=0.0), std_normal)


@pytest.mark.parametrize("labels", [None, [0, 1, -1, 1, 0, -1]])
def test_eps_star_is_scaled_score_of_exact_marginal(labels):
    # eps*(x_t) = -sqrt(1 - abar) grad log q(x_t), checked with autograd through log_prob
    g = TwoPixelGMM()
    gen = utils.make_generator(1)
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    abar = torch.rand(6, generator=gen, dtype=torch.float64)
    y = None if labels is None else torch.tensor(labels)
    eps = g.eps_star(x, abar, y)
    xr = x.clone().requires_grad_()
    logp = sum(g.log_prob(xr[i:i + 1], abar[i], None if y is None else y[i:i + 1]).sum() for i in range(6))
    (grad,) = torch.autograd.grad(logp, xr)
    assert torch.allclose(eps, -(1 - abar).sqrt()[:, None] * grad, atol=1e-10)


def test_eps_star_finite_difference_scalar_level():
    g = TwoPixelGMM()
    x = torch.tensor([[0.3, 0.2]], dtype=torch.float64)
    h = 1e-6
    grad = torch.stack([(g.log_prob(x + h * e, 0.5) - g.log_prob(x - h * e, 0.5)) / (2 * h)
                        for e in torch.eye(2, dtype=torch.float64)], dim=-1)
    assert torch.allclose(g.eps_star(x, 0.5), -(0.5 ** 0.5) * grad, atol=1e-7)


def test_nearest_class():
    g = TwoPixelGMM()
    pts = torch.tensor([[0.35, 0.65], [0.75, 0.45], [0.0, 1.0], [1.0, 0.0]])
    assert g.nearest_class(pts).tolist() == [0, 1, 0, 1]
