"""The two-pixel world: a two-component Gaussian mixture over [left, right] pixel values.

An image has two pixels, so an image is a point in 2-D and its whole distribution can
be drawn. The ground truth, as the handout defines it:

    class y = 0: mean [0.35, 0.65], std 0.1, weight 0.35  (left darker than right)
    class y = 1: mean [0.75, 0.45], std 0.1, weight 0.65  (left lighter than right)

Because a Gaussian mixture stays a Gaussian mixture under the forward process
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the noised marginal is known exactly:

    q(x_t) = sum_k w_k N(sqrt(abar_t) mu_k, (abar_t s^2 + 1 - abar_t) I),

and so is the optimal noise predictor eps*(x_t, t) = -sqrt(1 - abar_t) grad log q(x_t)
(Tweedie's formula). That oracle is the best any learned denoiser can do; the tests and
figures use it as the reference.

Shapes: points are float tensors (N, 2); labels are int64 (N,), where NULL_LABEL (-1)
means "no label" (the unconditional mixture).
"""
import torch
from torch import distributions as D

from utils import NULL_LABEL

MEANS = ((0.35, 0.65), (0.75, 0.45))
STD = 0.1
WEIGHTS = (0.35, 0.65)


class TwoPixelGMM:
    """The ground-truth mixture, its exact noised marginals and its exact noise predictor."""

    def __init__(self, means=MEANS, std=STD, weights=WEIGHTS):
        self.means = torch.tensor(means, dtype=torch.float64)  # (K, 2)
        self.std = float(std)
        self.weights = torch.tensor(weights, dtype=torch.float64)  # (K,)
        self.num_classes = len(weights)

    # -- distributions -------------------------------------------------------------
    def components(self, alpha_bar=1.0):
        """The K Gaussians N(sqrt(abar) mu_k, (abar s^2 + 1 - abar) I) of q(x_t | y = k), batched over k.

        alpha_bar: a scalar (batch shape (K,)) or one level per point, shape (N,) (batch
        shape (N, K)). alpha_bar = 1 gives the clean data components N(mu_k, s^2 I).
        """
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)[..., None, None]
        loc = alpha_bar.sqrt() * self.means
        scale = (alpha_bar * self.std**2 + 1 - alpha_bar).sqrt()
        return D.Independent(D.Normal(loc, scale.expand_as(loc)), 1)

    def marginal(self, alpha_bar=1.0):
        """q(x_t) = sum_k w_k N(sqrt(abar) mu_k, (abar s^2 + 1 - abar) I) as a torch distribution."""
        return D.MixtureSameFamily(D.Categorical(probs=self.weights), self.components(alpha_bar))

    def log_prob(self, x, alpha_bar=1.0, y=None):
        """log q(x_t) of points x (N, 2); with labels y (N,), log q(x_t | y) (NULL_LABEL rows use the mixture)."""
        x = x.to(torch.float64)
        log_joint = self._log_joint(x, alpha_bar, y)
        return torch.logsumexp(log_joint, dim=-1)

    def density_grid(self, xs, ys, alpha_bar=1.0, label=None):
        """Density on the grid xs (left pixel) by ys (right pixel): array (len(ys), len(xs)) for imshow.

        label=None gives the mixture, label=k the weighted component w_k N_k alone.
        """
        xs, ys = (torch.as_tensor(v, dtype=torch.float64) for v in (xs, ys))
        gx, gy = torch.meshgrid(xs, ys, indexing="xy")
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)
        log_joint = self._log_joint(pts, alpha_bar, None)
        dens = log_joint.exp().sum(-1) if label is None else log_joint[:, label].exp()
        return dens.reshape(gx.shape).numpy()

    def _log_joint(self, x, alpha_bar, y):
        """log w_k + log N_k(x) for every point and component: (N, K).

        Rows with a label y >= 0 keep only their own component (with log-weight 0), so that
        logsumexp / softmax over k gives the class-conditional quantity for them.
        """
        log_comp = self.components(alpha_bar).log_prob(x.unsqueeze(-2))  # (N, K)
        log_joint = log_comp + self.weights.log()
        if y is not None:
            y = torch.as_tensor(y, device=x.device).to(torch.int64)
            labelled = y >= 0
            own = torch.full_like(log_comp, float("-inf"))
            own[labelled, y[labelled]] = log_comp[labelled, y[labelled]]
            log_joint = torch.where(labelled[:, None], own, log_joint)
        return log_joint

    # -- sampling ------------------------------------------------------------------
    def sample(self, n, generator=None, label=None):
        """Draw n points x_0 (n, 2) float32 and their labels y (n,) int64.

        torch.distributions draws from the global random state only, so the two draws
        (component, then Gaussian noise) are made here with an explicit generator.
        label=k draws every point from component k.
        """
        if label is None:
            y = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            y = torch.full((n,), int(label), dtype=torch.int64)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        x = self.means[y] + self.std * noise
        return x.float(), y

    # -- one pixel given the other -------------------------------------------------
    def conditional(self, v, known=0):
        """p(x_other | x_known = v): a mixture of K 1-D Gaussians N(mu_k[other], s^2) whose weights
        are the class posteriors given the known pixel, pi_k(v) = w_k N(v; mu_k[known], s^2) / sum_j
        (the components are isotropic, so within a component the pixels are independent).
        known: 0 (left pixel known) or 1 (right). Returns (weights (K,), means (K,), std), float64."""
        if known not in (0, 1):
            raise ValueError("known must be 0 (left pixel) or 1 (right pixel)")
        log_w = self.weights.log() + D.Normal(self.means[:, known], self.std).log_prob(torch.tensor(float(v), dtype=torch.float64))
        return torch.softmax(log_w, dim=0), self.means[:, 1 - known].clone(), self.std

    def conditional_density(self, xs, v, known=0):
        """Density of the unknown pixel at the points xs, given the known one equals v: float64 like xs."""
        weights, means, std = self.conditional(v, known)
        xs = torch.as_tensor(xs, dtype=torch.float64)
        return (weights * D.Normal(means, std).log_prob(xs[..., None]).exp()).sum(-1)

    def sample_conditional(self, n, v, known=0, generator=None):
        """n draws of the unknown pixel given the known one equals v: float32 (n,)."""
        weights, means, std = self.conditional(v, known)
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        return (means[k] + std * torch.randn(n, generator=generator, dtype=torch.float64)).float()

    # -- the oracle ----------------------------------------------------------------
    def eps_star(self, x_t, alpha_bar, y=None):
        """Exact optimal noise prediction eps*(x_t) = -sqrt(1 - abar) grad log q(x_t), the scaled score of the
        noised marginal.

        For a mixture, grad log q(x_t) = -sum_k r_k(x_t) (x_t - sqrt(abar) mu_k) / v with
        v = abar s^2 + 1 - abar and r_k(x_t) the posterior responsibility of component k
        (one-hot on the label for labelled rows).
        x_t: (N, 2); alpha_bar: scalar or (N,); y: optional (N,) labels (NULL_LABEL = none).
        Returns (N, 2) in the dtype of x_t.
        """
        x = x_t.to(torch.float64)
        comps = self.components(alpha_bar)
        resp = torch.softmax(self._log_joint(x, alpha_bar, y), dim=-1)  # (N, K)
        diff = x.unsqueeze(-2) - comps.base_dist.loc  # (N, K, 2)
        var = comps.base_dist.scale[..., 0, :1] ** 2  # (1,) or (N, 1)
        score = -(resp.unsqueeze(-1) * diff).sum(-2) / var
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(var.shape)
        return (-(1 - alpha_bar).sqrt() * score).to(x_t.dtype)

    def class_log_posterior(self, x_t, alpha_bar):
        """log q(y = k | x_t) for every class k: (N, K). The exact Bayes classifier of noisy points."""
        return torch.log_softmax(self._log_joint(x_t.to(torch.float64), alpha_bar, None), dim=-1)

    def class_score(self, x_t, alpha_bar, y):
        """grad_x log q(y | x_t), exactly: (N, 2) in the dtype of x_t.

        By Bayes, grad log q(y | x_t) = grad log q(x_t | y) - grad log q(x_t), and each score is
        -eps* / sqrt(1 - abar), so this is (eps*(x_t) - eps*(x_t, y)) / sqrt(1 - abar).
        """
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        diff = self.eps_star(x_t.to(torch.float64), alpha_bar) - self.eps_star(x_t.to(torch.float64), alpha_bar, y)
        return (diff / (1 - alpha_bar).sqrt().reshape(-1, 1)).to(x_t.dtype)

    def nearest_class(self, x):
        """Index of the nearest class mean for each point x (N, 2): int64 (N,)."""
        return torch.cdist(x.to(torch.float64), self.means).argmin(dim=1)

    def oracle(self, alphas_cumprod):
        """The oracle as a denoiser with the network's interface: eps(x_t (B, 1, 2), t (B,), y) -> (B, 1, 2).

        alphas_cumprod: (T,) of the diffusion it is used with; t indexes it.
        """
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

        def eps(x_t, t, y=None):
            abar = alphas_cumprod.to(x_t.device)[t]
            return self.eps_star(x_t.reshape(-1, 2), abar, y).reshape(x_t.shape)

        return eps
