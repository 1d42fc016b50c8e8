"""Classifier guidance: the exact Bayes classifier's score, the guided eps-function, and a short training run."""
import torch

import classifier_guidance as cg
import utils
from gmm import TwoPixelGMM


def test_exact_class_score_matches_finite_differences_of_the_log_posterior():
    gmm = TwoPixelGMM()
    x = torch.tensor([[0.3, 0.5], [0.9, -0.2], [1.4, 1.1]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    for abar in (0.9, 0.4, 0.05):
        score = gmm.class_score(x, abar, y)
        h = 1e-6
        for d in range(2):
            step = torch.zeros_like(x)
            step[:, d] = h
            up = gmm.class_log_posterior(x + step, abar).gather(1, y[:, None])[:, 0]
            down = gmm.class_log_posterior(x - step, abar).gather(1, y[:, None])[:, 0]
            assert torch.allclose(score[:, d], (up - down) / (2 * h), atol=1e-6)


def test_scale_one_with_exact_parts_is_the_exact_conditional_eps():
    gmm = TwoPixelGMM()
    diffusion = utils.Diffusion(20)
    oracle = gmm.oracle(diffusion.alphas_cumprod)
    guided = utils.classifier_guided(oracle, cg.exact_score(gmm, diffusion.alphas_cumprod), diffusion.alphas_cumprod, 1.0)
    gen = utils.make_generator(0)
    x = torch.randn(64, 1, 2, generator=gen)
    t = torch.randint(0, 20, (64,), generator=gen)
    y = torch.randint(0, 2, (64,), generator=gen)
    assert torch.allclose(guided(x, t, y), oracle(x, t, y), atol=1e-5)
    # classifier-free guidance at w is classifier guidance at scale 1 + w with the implied classifier
    w = 3.0
    strong = utils.classifier_guided(oracle, cg.exact_score(gmm, diffusion.alphas_cumprod), diffusion.alphas_cumprod, 1 + w)
    assert torch.allclose(strong(x, t, y), utils.guided_eps(oracle, x, t, y, w), atol=1e-5)


def test_a_short_training_run_approaches_the_bayes_classifier():
    clf, record = cg.train_classifier(T=10, steps=300, batch_size=512, seed=0, progress=False)
    # the Bayes classifier is the floor; an untrained one scores log 2 = 0.69
    assert record["bayes_val_cross_entropy"] <= record["val_cross_entropy"] < record["bayes_val_cross_entropy"] + 0.02
    x = torch.randn(8, 1, 2)
    t = torch.randint(0, 10, (8,))
    y = torch.randint(0, 2, (8,))
    assert clf.score(x, t, y).shape == x.shape
