"""Diffusion math shared by the two-pixel and the MNIST models, plus the small pieces every script needs.

Index convention (as in openai/improved-diffusion): a step index t is int64 in [0, T-1],
and index t means the paper's step t + 1. So `betas[0]` is beta_1, `alphas_cumprod[t]` is
abar_{t+1}, and index 0 is the last denoising step (x_1 -> x_0). Trajectories are the
exception, stored in paper order: `trajectory[k]` is x_k for k = 0..T, so
`trajectory[T]` is the starting noise x_T and `trajectory[0]` the sample x_0.

Nothing here holds weights: every function that needs a denoiser takes it as an
argument `model(x_t, t, y) -> eps_pred`, which may be a network or the exact oracle of
gmm.py. The code works for any data shape, (B, 1, 2) pixels pairs or (B, 1, 28, 28) digits.

Labels y are int64 (B,); NULL_LABEL (-1) means "no label" (classifier-free guidance).
"""
import argparse
import contextlib
import math
import os
import signal
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

NULL_LABEL = -1
SCHEDULES = ("cosine", "linear")
LOSSES = ("l2", "l1", "huber")


# ----------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------
def cosine_betas(T, s=0.008, max_beta=0.999):
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar_t = f(t) / f(0) with
    f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), and beta_t = 1 - abar_t / abar_{t-1}
    clipped to at most max_beta. Returns float64 (T,)."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f(t) / f(t - 1), max_beta) for t in range(1, T + 1)]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(T, beta_1=1e-4, beta_T=0.02):
    """Linear schedule of Ho et al. 2020 (section 4): beta_t evenly spaced from 1e-4 to 0.02.

    These end points were chosen for T = 1000; at small T the chain never reaches pure
    noise (abar_T = 0.61 at T = 50), which is part of what the schedule comparison shows.
    """
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def extract(a, t, shape):
    """Pick the per-step constants a[t] for a batch of indices t (B,) and shape them to
    broadcast against a batch of data of the given shape: (B, 1, ..., 1)."""
    out = a.to(t.device)[t].float()
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


class Diffusion:
    """The fixed forward process q and the DDPM reverse process p for T steps.

    Attributes, all float64 (T,), indexed by step index t (paper step t + 1):
      betas, alphas = 1 - betas, alphas_cumprod (abar_t), alphas_cumprod_prev (abar_{t-1},
      with abar_0 = 1), posterior_variance = beta_t (1 - abar_{t-1}) / (1 - abar_t)
      (the fixed variance of q(x_{t-1} | x_t, x_0), Ho et al. 2020 eq. 7).
    """

    def __init__(self, T, schedule="cosine", betas=None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if T < 1:
            raise ValueError(f"T must be a positive number of steps, got {T}")
        self.T = int(T)
        self.schedule = schedule
        if betas is None:
            betas = cosine_betas(T) if schedule == "cosine" else linear_betas(T)
        self.betas = betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    # -- forward process -------------------------------------------------------------
    def q_sample(self, x_0, t, noise):
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020 eq. 4)."""
        abar = extract(self.alphas_cumprod, t, x_0.shape)
        return abar.sqrt() * x_0 + (1 - abar).sqrt() * noise

    def min_snr_weights(self, gamma, prediction="eps"):
        """The Min-SNR weight of every step's squared noise error, (T,) float32, SNR_t = abar_t / (1 - abar_t).
        prediction "eps": min(SNR_t, gamma) / SNR_t. prediction "v": the squared error of v is the noise's
        divided by abar_t, and of the clean image's times 1 + SNR_t; capped, the image error counts
        min(1 + SNR_t, gamma), so the noise error counts min(1 + SNR_t, gamma) / SNR_t (without a cap,
        gamma = None, (1 + SNR_t) / SNR_t: the plain loss of v)."""
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        if prediction == "v":
            image = 1 + snr if gamma is None else (1 + snr).clamp(max=gamma)
            return (image / snr).float()
        return (snr.clamp(max=gamma) / snr).float()

    def training_loss(self, model, x_0, y, generator, p_uncond=0.1, loss_type="l2", min_snr=None,
                      min_snr_mode="weight", prediction="eps", model_guidance=0.0):
        """The simplified DDPM objective E_{t, x_0, eps} || eps - eps_theta(x_t, t, y) || (Ho et al.
        2020 eq. 14), with each label replaced by NULL_LABEL with probability p_uncond so that
        one network also learns the unconditional eps(x_t, t, none) (Ho & Salimans 2022, alg. 1).

        min_snr = gamma weights each example's squared error by min(SNR_t, gamma) / SNR_t with
        SNR_t = abar_t / (1 - abar_t) (Min-SNR weighting, Hang et al. 2023, eq. 7 for the noise
        prediction): the nearly clean steps, where predicting the noise is hard and matters
        little, stop dominating the loss. Only with the l2 loss.

        min_snr_mode = "sample" gives the same expected loss another way: t is drawn with probability
        proportional to the weight and the squared errors are averaged unweighted (then scaled by the
        mean weight, so the value matches the weighted form). With uniform t and gamma = 1 (T = 200,
        cosine) the mean weight is 0.64 and a fifth of every batch goes to steps weighted below 0.1;
        sampled, every example counts fully, and the noisy half of the chain, where the digit is
        decided, gets 78% of the examples instead of 50% for the same cost.

        prediction = "v": the model predicts v and turns it into eps itself; the loss is that of v
        (see min_snr_weights), written on the noise error.

        model_guidance = m > 0 (model guidance, Tang et al. 2025): every labelled example is trained
        toward eps + m (eps_theta(x_t, t, y) - eps_theta(x_t, t, none)) instead of eps, both
        predictions from the network itself and held constant (no gradient; the unconditional one
        costs one more forward pass). Where the network matches its target, eps_theta(x_t, t, y) =
        eps*(y) + m / (1 - m) (eps*(y) - eps*(none)) with eps* the plain objective's optimum: the
        guided prediction of Ho & Salimans eq. 6 at w = m / (1 - m), learnt by the conditional
        network, so that sampling it without guidance draws what guidance at that w would, at one
        network pass per step. Unlabelled examples keep the plain target eps (their two predictions
        are the same).

        x_0: (B, ...) clean data; y: (B,) int64 labels or None. Returns the scalar mean loss.
        """
        B, device = x_0.shape[0], x_0.device
        if min_snr_mode not in ("weight", "sample"):
            raise ValueError(f"unknown min_snr_mode {min_snr_mode!r}; choose 'weight' or 'sample'")
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; choose 'eps' or 'v'")
        weighted = min_snr is not None or prediction == "v"
        sample_t = weighted and min_snr_mode == "sample"
        if sample_t:
            weights = self.min_snr_weights(min_snr, prediction).to(device)
            t = torch.multinomial(weights, B, replacement=True, generator=generator)
        else:
            t = torch.randint(0, self.T, (B,), generator=generator, device=device)
        noise = torch.randn(x_0.shape, generator=generator, device=device)
        if y is not None and p_uncond > 0:
            drop = torch.rand(B, generator=generator, device=device) < p_uncond
            y = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
        x_t = self.q_sample(x_0, t, noise)
        eps_pred = model(x_t, t, y)
        if model_guidance and y is not None:
            with torch.no_grad():
                eps_uncond = model(x_t, t, torch.full_like(y, NULL_LABEL))
            noise = noise + model_guidance * (eps_pred.detach() - eps_uncond).float()  # 0 where the label was dropped
        if not weighted:
            return noise_loss(eps_pred, noise, loss_type)
        if loss_type != "l2":
            raise ValueError("min_snr weighting and v-prediction are defined for the l2 loss only")
        per_example = (eps_pred.float() - noise).square().flatten(1).mean(1)
        if sample_t:  # E_uniform[weight * error] = mean(weight) * E_{t ~ weight}[error]
            return weights.mean() * per_example.mean()
        return (self.min_snr_weights(min_snr, prediction).to(device)[t] * per_example).mean()

    def predict_x0(self, x_t, t, eps):
        """The clean image implied by a noise prediction: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        (Ho et al. 2020 eq. 4 solved for x_0)."""
        abar = extract(self.alphas_cumprod, t, x_t.shape)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def predict_eps(self, x_t, t, x_0):
        """The noise implied by a clean prediction: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        abar = extract(self.alphas_cumprod, t, x_t.shape)
        return (x_t - abar.sqrt() * x_0) / (1 - abar).sqrt()

    def q_posterior_mean(self, x_0, x_t, t):
        """Mean of q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eq. 7):
        sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t."""
        abar, abar_prev = extract(self.alphas_cumprod, t, x_t.shape), extract(self.alphas_cumprod_prev, t, x_t.shape)
        beta = extract(self.betas, t, x_t.shape)
        return (abar_prev.sqrt() * beta * x_0 + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (1 - abar)

    def respaced(self, K):
        """The same process seen at K evenly spaced steps (Nichol & Dhariwal 2021, section 4):
        keep steps tau_1 < ... < tau_K (always the first and the last) and set
        beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}, so that abar is unchanged at every kept step.

        Returns (diffusion with K steps, kept: int64 (K,) original step index of each new one).
        Sampling it with DDPM is strided DDPM; K = T gives back this process.
        """
        if not 1 <= K <= self.T:
            raise ValueError(f"the number of sampling steps must be between 1 and T={self.T}, got {K}")
        kept = torch.linspace(self.T - 1, 0, K).round().long().flip(0)
        if K == self.T:
            return self, kept
        abar = self.alphas_cumprod[kept]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return Diffusion(K, self.schedule, betas=1 - abar / abar_prev), kept

    # -- reverse process -------------------------------------------------------------
    def p_sample(self, model, x_t, t, y=None, w=0.0, generator=None, clip_x0=None):
        """One DDPM reverse step x_t -> x_{t-1} for a batch all at the same step index t (int).

        1. eps_bar = guided_eps(...)                          (Ho & Salimans 2022 eq. 6)
        2. mean = (x_t - beta_t / sqrt(1 - abar_t) eps_bar) / sqrt(alpha_t)   (Ho et al. eq. 11);
           with clip_x0 = (lo, hi), the implied x0_hat is clipped to the data range first and
           the mean is the posterior mean q(x_{t-1} | x_t, x0_hat) (equal to eq. 11 unclipped)
        3. x_{t-1} = mean + sigma_t z, sigma_t^2 = posterior_variance_t, z ~ N(0, I),
           with z = 0 at the last step (t = 0)                  (Ho et al. alg. 2)
        Returns (x_{t-1}, x0_hat), both shaped like x_t.
        """
        tt = torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device)
        eps_bar = guided_eps(model, x_t, tt, y, w)
        x0_hat = self.predict_x0(x_t, tt, eps_bar)
        if clip_x0 is None:
            beta = extract(self.betas, tt, x_t.shape)
            abar = extract(self.alphas_cumprod, tt, x_t.shape)
            mean = (x_t - beta / (1 - abar).sqrt() * eps_bar) / (1 - beta).sqrt()
        else:
            x0_hat = x0_hat.clamp(*clip_x0)
            mean = self.q_posterior_mean(x0_hat, x_t, tt)
        if t == 0:
            return mean, x0_hat
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device)
        return mean + extract(self.posterior_variance, tt, x_t.shape).sqrt() * z, x0_hat

    def p_sample_loop_progressive(self, model, x_T, y=None, w=0.0, generator=None, progress=False, clip_x0=None,
                                  start=None, desc="sampling", guided_steps=None):
        """Run the reverse chain from x_T, yielding (x_{t-1}, x0_hat at step t) for t = T, ..., 1;
        with start = s, the chain begins at paper step s (x_T is then x_s). With guided_steps = K,
        only the K noisiest steps (t > T - K) are guided; the others use w = 0."""
        x = x_T
        for t in tqdm(range((self.T if start is None else start) - 1, -1, -1), desc=desc, unit="step", leave=False, disable=not progress):
            x, x0_hat = self.p_sample(model, x, t, y, guidance_at(w, t, self.T, guided_steps), generator, clip_x0)
            yield x, x0_hat

    @torch.no_grad()
    def p_sample_loop(self, model, x_T, y=None, w=0.0, generator=None, progress=False, clip_x0=None, guided_steps=None):
        """Sample x_0 ~ p_theta by running every reverse step from the starting noise x_T."""
        for x, _ in self.p_sample_loop_progressive(model, x_T, y, w, generator, progress, clip_x0,
                                                   guided_steps=guided_steps):
            pass
        return x

    @torch.no_grad()
    def sample_trajectory(self, model, x_T, y=None, w=0.0, generator=None, progress=False, clip_x0=None):
        """The whole chain in paper order: (T + 1, *x_T.shape), where [k] is x_k and [T] is x_T."""
        steps = self.p_sample_loop_progressive(model, x_T, y, w, generator, progress, clip_x0)
        xs = [x_T] + [x for x, _ in steps]
        return torch.stack(xs[::-1])


def ddim_step(diffusion, model, x_t, t, y=None, w=0.0, eta=0.0, generator=None, clip_x0=None):
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12) at step index t (int):

    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps + sigma_t z,
    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}).
    eta = 0 is deterministic; eta = 1 is the DDPM step. Returns (x_{t-1}, x0_hat).
    """
    tt = torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device)
    eps = guided_eps(model, x_t, tt, y, w)
    x0_hat = diffusion.predict_x0(x_t, tt, eps)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(*clip_x0)
        eps = diffusion.predict_eps(x_t, tt, x0_hat)
    abar = extract(diffusion.alphas_cumprod, tt, x_t.shape)
    abar_prev = extract(diffusion.alphas_cumprod_prev, tt, x_t.shape)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    x_prev = abar_prev.sqrt() * x0_hat + (1 - abar_prev - sigma ** 2).sqrt() * eps
    if eta > 0 and t > 0:
        x_prev = x_prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device)
    return x_prev, x0_hat


SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def sample(diffusion, model, x_T, y=None, w=0.0, generator=None, sampler="ddpm", steps=None, eta=0.0,
           clip_x0=None, progress=False, guided_steps=None):
    """Draw x_0 from x_T with `sampler` over `steps` evenly spaced steps (default: all T).

    'ddpm' with steps < T is strided DDPM on the respaced process; 'ddim' is the DDIM step
    with noise scale eta (0: deterministic). Both reuse the network trained on all T steps.
    guided_steps = K guides only the first K of those steps, the noisiest (default: all).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = steps or diffusion.T
    short, kept = diffusion.respaced(steps)
    kept = kept.to(x_T.device)
    on_kept = lambda x, t, y_: model(x, kept[t], y_)  # the network sees the original step index
    if sampler == "ddpm":
        return short.p_sample_loop(on_kept, x_T, y, w, generator, progress, clip_x0, guided_steps)
    x = x_T
    for t in tqdm(range(steps - 1, -1, -1), desc="sampling", unit="step", leave=False, disable=not progress):
        x, _ = ddim_step(short, on_kept, x, t, y, guidance_at(w, t, steps, guided_steps), eta, generator, clip_x0)
    return x


INPAINT_METHODS = ("replace", "repaint")


@torch.no_grad()
def inpaint(diffusion, model, x_T, known, mask, y=None, w=0.0, generator=None, resample=1, jump=1,
            clip_x0=None, progress=False):
    """Complete x_0 where mask is False, keeping x_0 = known where it is True, by replacement:
    after every DDPM reverse step the known entries of x_{t-1} are overwritten with a fresh
    draw of q(x_{t-1} | x_0 = known) = N(sqrt(abar_{t-1}) known, (1 - abar_{t-1}) I), and at the
    end with `known` itself (Song et al. 2021, appendix; Lugmayr et al. 2022, eq. 8).

    resample = r > 1 adds RePaint's resampling (Lugmayr et al. 2022, section 4.2): the chain
    goes down `jump` steps, is sent back up those steps by the forward process
    x_t = sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) z, and goes down again, r times
    in all, so that the unknown part can adapt to the known part before moving on.

    x_T: (B, ...) starting noise; known: (B, ...) (entries outside the mask are ignored);
    mask: bool, broadcastable to x_T. Returns x_0 with x_0[mask] equal to known[mask] exactly.
    """
    if resample < 1 or jump < 1:
        raise ValueError("resample and jump must be at least 1")
    mask = mask.expand_as(x_T)
    ones = torch.ones(1, dtype=torch.float64)
    levels = torch.cat([ones, diffusion.alphas_cumprod])  # levels[k]: abar of x at paper step k (x_0: 1)

    def replace(x, k):  # x is at paper step k: its known entries become a draw of q(x_k | known)
        if k == 0:
            return torch.where(mask, known, x)
        abar = levels[k].item()
        noisy = abar ** 0.5 * known + (1 - abar) ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device)
        return torch.where(mask, noisy, x)

    x, k = x_T, diffusion.T
    bar = tqdm(total=diffusion.T * resample, desc="inpainting", unit="step", leave=False, disable=not progress)
    while k > 0:
        low = max(k - jump, 0)
        for r in range(resample):
            if r > 0:  # back up from step low to step k by the forward process
                ratio = (levels[k] / levels[low]).item()
                x = ratio ** 0.5 * x + (1 - ratio) ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device)
            for step in range(k, low, -1):  # x_step -> x_{step-1}; step index step - 1
                x, _ = diffusion.p_sample(model, x, step - 1, y, w, generator, clip_x0)
                x = replace(x, step - 1)
                bar.update(1)
        k = low
    bar.close()
    return x


@torch.no_grad()
def sdedit(diffusion, model, x_0, t0, y=None, w=0.0, generator=None, clip_x0=None, progress=False):
    """SDEdit (Meng et al. 2022): noise x_0 to paper step t0 with q(x_t0 | x_0), then run the DDPM
    reverse chain from there (toward label y, at guidance w). t0 = 1 changes the image a little;
    t0 = T keeps almost nothing of it (abar_T is near 0). Returns the edited x_0, shaped like x_0."""
    if not 1 <= t0 <= diffusion.T:
        raise ValueError(f"t0 must be between 1 and T={diffusion.T}, got {t0}")
    t = torch.full((x_0.shape[0],), t0 - 1, dtype=torch.int64, device=x_0.device)
    x = diffusion.q_sample(x_0, t, torch.randn(x_0.shape, generator=generator, device=x_0.device))
    for x, _ in diffusion.p_sample_loop_progressive(model, x, y, w, generator, progress, clip_x0, start=t0, desc="editing"):
        pass
    return x


def guidance_at(w, t, steps, guided_steps):
    """The guidance strength at step index t (steps - 1 first, 0 last) of a chain of `steps`
    reverse steps when only its first guided_steps (None: all) are guided."""
    return w if guided_steps is None or t >= steps - guided_steps else 0.0


def guided_eps(model, x_t, t, y, w):
    """Classifier-free guidance eps_bar = (1 + w) eps(x_t, t, y) - w eps(x_t, t, none)
    (Ho & Salimans 2022 eq. 6). w = 0 (or y = None) is the plain conditional (or
    unconditional) prediction; w = -1 is the unconditional one. The conditional and
    unconditional passes run as one batched call."""
    if y is None or w == 0:
        return model(x_t, t, y)
    null = torch.full_like(y, NULL_LABEL)
    eps = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
    eps_cond, eps_uncond = eps.chunk(2)
    return (1 + w) * eps_cond - w * eps_uncond


def classifier_guided(model, class_score, alphas_cumprod, scale):
    """An eps-function with classifier guidance (Dhariwal & Nichol 2021, section 4.2):

    eps_hat(x_t, t, y) = eps(x_t, t, none) - scale sqrt(1 - abar_t) grad_x log p(y | x_t, t),

    the unconditional prediction shifted along the classifier's score class_score(x_t, t, y).
    With scale = 1, the exact unconditional eps* and the exact Bayes classifier, this is the
    exact conditional eps*(x_t, y); classifier-free guidance at w is the same formula with
    scale = 1 + w and the classifier implied by the conditional model.
    """
    def eps(x_t, t, y):
        abar = extract(alphas_cumprod, t, x_t.shape)
        return model(x_t, t, None) - scale * (1 - abar).sqrt() * class_score(x_t, t, y)

    return eps


def noise_loss(eps_pred, noise, loss_type="l2"):
    """Mean loss between predicted and true noise: 'l2' (squared error), 'l1' or 'huber'."""
    if loss_type == "l2":
        return F.mse_loss(eps_pred, noise)
    if loss_type == "l1":
        return F.l1_loss(eps_pred, noise)
    if loss_type == "huber":
        return F.smooth_l1_loss(eps_pred, noise)
    raise ValueError(f"unknown loss {loss_type!r}; choose one of {', '.join(LOSSES)}")


# ----------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------
def make_ema(model, decay):
    """An exponential moving average of the model's weights (used for sampling)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def cosine_lr(step, total, lr, warmup):
    """Learning rate at a step: linear warm-up for `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_step(model, ema, optimizer, diffusion, x_0, y, generator, lr, p_uncond=0.1, loss_type="l2", clip=1.0,
               bf16=False, min_snr=None, min_snr_mode="weight", prediction="eps", model_guidance=0.0):
    """One optimisation step on a batch: loss, backward, gradient clipping, Adam, EMA. Returns the loss.
    With bf16, the model's matrix products and convolutions run in bfloat16 (torch.autocast);
    the weights, their gradients, the loss and the optimiser stay float32."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(x_0.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = diffusion.training_loss(model, x_0, y, generator, p_uncond, loss_type, min_snr, min_snr_mode, prediction,
                                       model_guidance)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    ema.update_parameters(model)
    return loss.item()


# ----------------------------------------------------------------------------------
# Randomness, devices, files
# ----------------------------------------------------------------------------------
def training_state(model, ema, optimizer, extra_emas=(), **generators):
    """Everything an interrupted run needs to go on exactly where it stopped (weights, EMA and any
    further averages kept beside it, optimiser moments, the state of each named random generator,
    and of torch's global generators, which draw the dropout masks)."""
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "extra_emas": [extra.state_dict() for extra in extra_emas],
             "generators": {name: g.get_state() for name, g in generators.items()},
             "global_rng": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # training on a GPU: its generator too (the current device's)
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def restore_training_state(state, model, ema, optimizer, extra_emas=(), **generators):
    """The inverse of training_state."""
    with checkpoint_format("the resume file"):
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        # files written before the further averages were kept here have none (the MNIST command
        # refuses to resume with --extra-ema a file that was not written with it)
        for extra, saved in zip(extra_emas, state.get("extra_emas", []), strict=True):
            extra.load_state_dict(saved)
        optimizer.load_state_dict(state["optimizer"])
        for name, g in generators.items():
            g.set_state(state["generators"][name])
        if "global_rng" in state:  # files written before it was kept go on from the state seeding left
            torch.set_rng_state(state["global_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])


def make_generator(seed, device="cpu"):
    """An explicit random generator: every random draw in the project goes through one, except
    initial weights and dropout masks, which come from torch's global generator, seeded by each
    training command (training_state keeps its state for --resume)."""
    return torch.Generator(device=device).manual_seed(int(seed))


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device, cpuinfo="/proc/cpuinfo"):
    """(True/False, reason): does this device compute in bfloat16 natively, so that bf16 is faster
    than fp32? On a CPU: the AMX or AVX512-BF16 instructions (x86) or BF16 (ARM) among the flags
    in `cpuinfo`; without them torch emulates bfloat16 and is slower than in float32."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bfloat16"
    if device.type != "cpu":
        return False, f"{device.type}: float32 is the safe choice"
    try:
        with open(cpuinfo) as f:
            flags = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        return False, f"cannot read {cpuinfo} to find bfloat16 support"
    found = sorted(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    if found:
        return True, f"the CPU has native bfloat16 ({', '.join(found)})"
    return False, "the CPU has no native bfloat16 (no amx_bf16 / avx512_bf16), so bf16 would be emulated and slower"


def resolve_precision(name, device):
    """'auto' -> 'bf16' where the device computes bfloat16 natively, else 'fp32'; 'bf16' and
    'fp32' stay as given. Returns (precision, one-line reason)."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name, "as asked"
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), why


def announce_precision(name, device):
    """resolve_precision, with the choice and its reason printed on one line; returns the choice."""
    precision, why = resolve_precision(name, device)
    print(f"precision: {precision} ({why})", flush=True)
    return precision


def add_precision_flag(parser, what):
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help=f"arithmetic of {what}: bf16 runs matrix products and convolutions in bfloat16 "
                             "(weights, loss and optimiser stay float32), fp32 in float32; auto (default) picks "
                             "bf16 only where the hardware computes it natively (a CPU with AMX or AVX512-BF16, "
                             "a GPU with bfloat16), since emulated bfloat16 is slower than float32")


def pick_device(name):
    """'auto' picks a GPU when one is present; 'cuda' without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


class StopOnInterrupt:
    """Inside this block the first Ctrl-C only sets `requested`, so a training loop can finish
    its current step and save a consistent state before it stops; a second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


class UserError(Exception):
    """A problem with the user's input or files: the scripts print it as one line and exit 2."""


def atomic_write(path, write, suffix=""):
    """Write a file so that an interruption never leaves it half written: `write(tmp_path)`
    fills a temporary file beside the target, which then replaces it in one step. `suffix`
    ends the temporary name, for writers that take the format from it."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy(path, array):
    """Save a numpy array atomically."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def save_json(path, data):
    """Save plain data as indented JSON atomically."""
    import json

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    atomic_write(path, write)


def save_figure(fig, path):
    """Save a matplotlib figure atomically (format from the file name) and close it."""
    import matplotlib.pyplot as plt
    fmt = os.path.splitext(path)[1][1:] or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format=fmt))
    plt.close(fig)


def save_animation(fig, draw_frame, n_frames, path, fps=10):
    """Save a GIF atomically: draw_frame(k) updates the figure for frame k (matplotlib's
    FuncAnimation with the Pillow writer, which ships with matplotlib)."""
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    animation = FuncAnimation(fig, draw_frame, frames=n_frames, blit=False)
    atomic_write(path, lambda tmp: animation.save(tmp, writer=PillowWriter(fps=fps), dpi=60), suffix=".gif")
    plt.close(fig)


def ensure_writable_dir(path):
    """Make sure the directory that will hold `path` exists and can be written, before any work."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create directory {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"directory {folder} is not writable; choose another output path")


def save_checkpoint(path, ckpt):
    """Save a checkpoint dict (tensors and plain Python values only) atomically."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path, kind, make_command):
    """Load a checkpoint written by save_checkpoint with torch.load(weights_only=True) and check
    that it holds a model of the expected kind. Problems raise UserError with one line."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} not found; create it with `{make_command}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"checkpoint {path} cannot be read (truncated or corrupted?); "
                        f"recreate it with `{make_command}`") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project")
    if ckpt["kind"] != kind:
        raise UserError(f"{path} holds a {ckpt['kind']!r} model, but a {kind!r} model is needed here")
    return ckpt


@contextlib.contextmanager
def checkpoint_format(path):
    """Inside this block, a checkpoint whose contents do not fit the code (missing keys, other
    shapes, another version) raises a one-line UserError instead of a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match this version of the code ({type(e).__name__}); "
                        "retrain it, or rerun without --resume") from None


# ----------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit status 2) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(main):
    """Run a script's main(); a UserError becomes a one-line message and exit status 2, and output
    whose reader has gone (`... | head`) ends the script quietly with status 1."""
    try:
        main()
        sys.stdout.flush()  # (here, so that a reader gone before the last lines is caught below)
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(1)


def number_type(convert, accept, expected):
    """An argparse type: convert the text (int or float), then check it; errors say what was expected."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    parse.__name__ = expected
    return parse


positive_int = number_type(int, lambda v: v >= 1, "a positive integer")
positive_float = number_type(float, lambda v: v > 0, "a positive number")
fraction = number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
guidance_strength = number_type(float, lambda v: v >= -1, "a guidance strength w >= -1 (w = -1 is unconditional)")
eta_value = number_type(float, lambda v: 0 <= v <= 1, "a DDIM noise scale eta in [0, 1]")
seed_value = number_type(int, lambda v: 0 <= v < 2**63, "a seed in [0, 2^63)")


def check_steps(steps, diffusion):
    """Refuse a --steps larger than the model's T (a sampler cannot take more steps than there are)."""
    if steps is not None and steps > diffusion.T:
        raise UserError(f"--steps {steps} is more than the model's T={diffusion.T}")


def add_sampler_flags(parser, title="sampler"):
    """--sampler, --steps and --eta, for every command that samples."""
    g = parser.add_argument_group(title)
    g.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: the stochastic DDPM reverse process; ddim: DDIM (deterministic with --eta 0) (default ddpm)")
    g.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps, evenly spaced over the model's T (default: all T; fewer = strided sampling)")
    g.add_argument("--eta", type=eta_value, default=0.0, help="DDIM noise scale in [0, 1]: 0 deterministic, 1 = DDPM; ddim only (default 0)")


def add_common_flags(parser, seed_default=0):
    """--seed and --device, which every script has."""
    parser.add_argument("--seed", type=seed_value, default=seed_default, help=f"random seed; the same seed repeats the run exactly (default {seed_default})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run: auto picks a CUDA GPU when one is present (default auto)")


# ----------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------
def energy_distance(x, y):
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo 2013) between two
    samples (N, d) and (M, d), with the expectations taken over all pairs (a V-statistic,
    so two samples of the same law give a small positive floor rather than exactly 0)."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()
