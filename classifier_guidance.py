"""Classifier guidance on two pixels: a small classifier of noisy points, p(y | x_t, t).

    python classifier_guidance.py          # trains it for T = 50: checkpoints/twopixel_classifier_T50.pt (about 5 s)
    python visualize.py --task classifier  # figures/twopixel_classifier_guidance.png, against the exact Bayes classifier

Classifier guidance (Dhariwal & Nichol 2021) steers the unconditional model with the
gradient of a classifier trained on noisy inputs; `utils.classifier_guided` does the
steering. On two pixels the exact Bayes classifier q(y | x_t) is known in closed form
(`gmm.TwoPixelGMM.class_score`), so the learned classifier has an oracle to meet.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import utils
from ddpm import GaussianFourierProjection, TwoPixelUNetConfig, precondition
from gmm import TwoPixelGMM

KIND = "twopixel_classifier"


def default_checkpoint(T, folder="checkpoints"):
    return f"{folder}/twopixel_classifier_T{T}.pt"


class NoisyClassifier(nn.Module):
    """x_t (B, 1, 2) and step index t (B,) -> class logits (B, K).

    The point is scaled to unit variance at its noise level (as in the UNet) and joined with
    Fourier features of s = (t + 1) / T; two hidden SiLU layers follow."""

    def __init__(self, alphas_cumprod, num_classes=2, hidden=128, fourier_dim=64, fourier_scale=4.0):
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float32))
        self.fourier = GaussianFourierProjection(fourier_dim, fourier_scale)
        self.net = nn.Sequential(nn.Linear(2 + fourier_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x_t, t):
        config = TwoPixelUNetConfig  # the same data scale as the UNet's
        x = precondition(x_t.reshape(-1, 2), self.alphas_cumprod[t][:, None], config.data_mean, config.data_std)
        return self.net(torch.cat([x, self.fourier((t.float() + 1) / len(self.alphas_cumprod))], dim=-1))

    def score(self, x_t, t, y):
        """grad_x log p(y | x_t, t), by autograd: the shape of x_t."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = F.log_softmax(self(x, t), dim=-1).gather(1, y[:, None]).sum()
            return torch.autograd.grad(log_p, x)[0]


def exact_score(gmm, alphas_cumprod):
    """The exact Bayes classifier's score as class_score(x_t (B, 1, 2), t (B,), y (B,))."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return lambda x_t, t, y: gmm.class_score(x_t.reshape(-1, 2), alphas_cumprod[t], y).reshape(x_t.shape)


def noisy_points(gmm, diffusion, n, gen):
    """n ground-truth points noised to uniformly drawn steps: x_t (n, 1, 2), t (n,), labels y (n,)."""
    x_0, y = gmm.sample(n, gen)
    t = torch.randint(0, diffusion.T, (n,), generator=gen)
    return diffusion.q_sample(x_0[:, None], t, torch.randn(n, 1, 2, generator=gen)), t, y


def train_classifier(T=50, steps=1500, batch_size=1024, lr=3e-3, seed=0, progress=True, device="cpu"):
    """Train a NoisyClassifier on fresh ground-truth points noised to random steps.
    Returns (classifier in eval mode, record with its loss and the exact classifier's on a fixed set)."""
    torch.manual_seed(seed)
    gmm = TwoPixelGMM()
    diffusion = utils.Diffusion(T)
    clf = NoisyClassifier(diffusion.alphas_cumprod).to(device)
    optimizer = torch.optim.Adam(clf.parameters(), lr=lr)
    gen = utils.make_generator(seed)
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=f"classifier T={T}", disable=not progress):
        x_t, t, y = noisy_points(gmm, diffusion, batch_size, gen)
        for group in optimizer.param_groups:
            group["lr"] = utils.cosine_lr(step, steps, lr, warmup=50)
        loss = F.cross_entropy(clf(x_t.to(device), t.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    clf.eval()
    # a fixed validation set: the learned classifier's cross-entropy beside the Bayes classifier's
    x_t, t, y = noisy_points(gmm, diffusion, 20_000, utils.make_generator(12_345))
    with torch.no_grad():
        val_loss = F.cross_entropy(clf(x_t.to(device), t.to(device)).cpu(), y).item()
    bayes = F.nll_loss(gmm.class_log_posterior(x_t.reshape(-1, 2), diffusion.alphas_cumprod[t]).float(), y).item()
    record = {"T": T, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "seconds": round(time.perf_counter() - start, 1), "val_cross_entropy": val_loss,
              "bayes_val_cross_entropy": bayes}
    return clf, record


def load_classifier(path, T, device="cpu"):
    ckpt = utils.load_checkpoint(path, KIND, f"python classifier_guidance.py --T {T}")
    if ckpt["T"] != T:
        raise utils.UserError(f"{path} is a classifier for T={ckpt['T']}, not T={T}")
    clf = NoisyClassifier(utils.Diffusion(T).alphas_cumprod)
    with utils.checkpoint_format(path):
        clf.load_state_dict(ckpt["model"])
    return clf.to(device).eval()


def build_parser():
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=utils.positive_int, default=50, help="diffusion steps of the model it will guide (default 50)")
    p.add_argument("--steps", type=utils.positive_int, default=1500, help="optimiser steps (default 1500)")
    p.add_argument("--out", default=None, help="checkpoint to write (default checkpoints/twopixel_classifier_T{T}.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    utils.add_common_flags(p)
    return p


def main():
    args = build_parser().parse_args()
    out = args.out or default_checkpoint(args.T)
    utils.ensure_writable_dir(out)
    device = utils.pick_device(args.device)
    clf, record = train_classifier(args.T, args.steps, seed=args.seed, progress=not args.quiet, device=device)
    utils.save_checkpoint(out, {"kind": KIND, "T": args.T, "model": {k: v.cpu() for k, v in clf.state_dict().items()},
                                "train": record})
    print(f"wrote {out} in {record['seconds']} s: validation cross-entropy {record['val_cross_entropy']:.4f} "
          f"(exact Bayes classifier {record['bayes_val_cross_entropy']:.4f})")


if __name__ == "__main__":
    utils.run_main(main)
