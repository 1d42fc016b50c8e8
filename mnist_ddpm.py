"""Class-conditional DDPM on MNIST with classifier-free guidance, reusing the diffusion code of utils.py.

Subcommands (each has its own --help):
    train       train the UNet (checkpoint and resume file written after every epoch)
    classifier  train the small MNIST classifier used by `evaluate`
    sample      save samples of one digit as float32 (N, 28, 28) in [0, 1], ink = 1
    grid        draw the 10 x 10 grid (one digit per row) and the same noise at several w
    trajectory  draw one sample from noise to digit, and measure how the digit forms
    evaluate    classifier accuracy, Frechet distance and diversity of the samples

Images are scaled from [0, 1] to [-1, 1] for the diffusion (the usual choice for images:
the data then sit at the scale of the unit-variance noise) and back for every output.
"""
import functools
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import utils
from ddpm import StepAndClassEmbedding

KIND = "mnist"
CLASSIFIER_KIND = "mnist-classifier"
DEFAULT_DATA = os.path.join("data", "mnist.npz")
DEFAULT_CKPT = os.path.join("checkpoints", "mnist_T200.pt")
DEFAULT_CLASSIFIER = os.path.join("checkpoints", "mnist_classifier.pt")
# The default guidance strength: the smallest w in the shipped model's evaluation (figures/mnist_eval.json
# and mnist_eval_seed1.json, seeds 0 and 1) at which the targets hold with margin at both seeds: more
# than 99.5% of samples read as the digit asked for, the Frechet distance within 1.15 times its floor and
# diversity at least 90% of real. The shipped model learnt guidance at w = 0.25 in training (model
# guidance, --model-guidance 0.2), and meets them without any more: w = 0 reads 996 of 1000 at both
# seeds; see REPORT.md, Problem 5.
DEFAULT_W = 0.0
TRAIN_COMMAND = "python mnist_ddpm.py train"
CLASSIFIER_COMMAND = "python mnist_ddpm.py classifier"


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------
def load_mnist(path, split="train"):
    """Images (N, 1, 28, 28) float32 in [0, 1] (ink = 1) and labels (N,) int64 from an npz with
    the keys x_train, y_train, x_test, y_test (uint8). Problems raise a one-line UserError."""
    if not os.path.exists(path):
        raise utils.UserError(f"data file {path} not found; the repository ships data/mnist.npz")
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f[f"x_{split}"], f[f"y_{split}"]
    except KeyError:
        raise utils.UserError(f"{path} has no x_{split} / y_{split} arrays (expected the keys of mnist.npz)") from None
    except Exception:
        raise utils.UserError(f"{path} is not a readable .npz file") from None
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],) or x.dtype != np.uint8:
        raise utils.UserError(f"{path}: expected uint8 images (N, 28, 28) and N labels, got {x.dtype} {x.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise utils.UserError(f"{path}: labels must be digits 0-9")
    images = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    return images, torch.from_numpy(y.astype(np.int64))


def to_model(images):
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def to_pixels(x):
    """[-1, 1] -> [0, 1], clipped."""
    return ((x + 1) / 2).clamp(0, 1)


def to_grey_levels(images):
    """[0, 1] -> uint8 0-255 (ink 255), as the data are stored."""
    return (images * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------
# The UNet: four blocks on each path, each a residual layer and self-attention
# ----------------------------------------------------------------------------------
@dataclass
class MnistUNetConfig:
    T: int = 200
    num_classes: int = 10
    channels: tuple = (16, 32, 64, 64)  # features of the four blocks, at 28, 14, 7 and 7 pixels
    embed_dim: int = 128
    embed_layers: int = 1  # linear layers of the step-and-class embedding, each followed by SiLU
    fourier_scale: float = 4.0
    attn_window: int = 7  # attention inside non-overlapping windows of this size (the whole map if larger)
    groups: int = 8  # GroupNorm groups
    res_layers: int | tuple = 1  # residual layers per block, before its attention: one number for every
    # block, or four for the blocks at 28, 14, 7 and 7 pixels (the up path mirrors the down path)
    scale_shift: bool = False  # the embedding scales and shifts the normalised features instead of adding a bias
    prediction: str = "eps"  # what the last convolution predicts: the noise, or v (turned into the noise on the way out)
    dropout: float = 0.0  # probability of zeroing a feature before each residual layer's second conv (training only)
    embed_token: bool = False  # the embedding is also one more key and value in every attention layer


class ResidualLayer(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; inject the step-and-class embedding; GroupNorm, SiLU, 3x3 conv; plus the input.

    The embedding enters either as a per-channel bias added to the features (scale_shift=False),
    or as a per-channel scale and shift of the second normalisation, h = GroupNorm(h) (1 + scale)
    + shift (scale_shift=True; Dhariwal & Nichol 2021, section 3, "adaptive group normalization"),
    which lets the label multiply features rather than only offset them.

    With dropout > 0, training zeroes each feature entering the second conv with that probability
    (Ho et al. 2020, as in their residual blocks); in eval mode the layer is deterministic.
    """

    def __init__(self, c_in, c_out, embed_dim, groups, scale_shift=False, dropout=0.0):
        super().__init__()
        self.scale_shift = scale_shift
        # no Dropout module at p = 0: even then it would draw from the global random generator
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(embed_dim, 2 * c_out if scale_shift else c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# Attention windows computed together when sampling: 100 score matrices of 49 x 49 (960 KB in
# float32) fit a core's L2 cache, where the 800 windows of a chunk of 50 images at 28 x 28 do
# not (benchmark.py times both ways).
ATTENTION_GROUP = 100


class SelfAttention(nn.Module):
    """Single-head self-attention over pixels, with a residual connection.

    With window < map size, each non-overlapping window x window patch attends within
    itself (as in Swin transformers): full attention over 28 x 28 = 784 pixels costs
    784^2 weights per image and dominates a CPU step; 7 x 7 windows cost 16 times less.

    With embed_dim, a linear map of the step-and-class embedding gives one more key and value,
    shared by every window of the image, so that each pixel can take from the label as much as
    its own query asks for (the label as a token to attend to, as text is in cross-attention).
    """

    def __init__(self, channels, groups, window, embed_dim=None):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.token = nn.Linear(embed_dim, 2 * channels) if embed_dim else None
        self.window = window
        self.group = ATTENTION_GROUP

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        s = self.window if (H > self.window and H % self.window == 0 and W % self.window == 0) else None
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        if s is None:  # (B, HW, 3C)
            tokens = qkv.flatten(2).transpose(1, 2)
        else:  # (B * nH * nW, s*s, 3C)
            tokens = qkv.reshape(B, 3 * C, H // s, s, W // s, s).permute(0, 2, 4, 3, 5, 1).reshape(-1, s * s, 3 * C)
        q, k, v = tokens.chunk(3, dim=-1)
        if self.token is not None:  # windows are image-major: image b holds windows b * n ... (b + 1) * n - 1
            k_emb, v_emb = self.token(emb).repeat_interleave(len(q) // B, dim=0)[:, None].chunk(2, dim=-1)
            k, v = torch.cat([k, k_emb], dim=1), torch.cat([v, v_emb], dim=1)
        # softmax(q k^T / sqrt(C)) v written out: on a CPU this is about twice as fast as
        # F.scaled_dot_product_attention, whose fallback also scans for masked rows. Without
        # gradients (sampling) the windows go `group` at a time, so that their score matrices stay
        # in the cache; each window is computed alone either way, so the result is the same. (In
        # training, groups measured no faster.)
        g = len(q) if torch.is_grad_enabled() else self.group
        out = torch.cat([torch.softmax((q[i:i + g] * C ** -0.5) @ k[i:i + g].transpose(1, 2), dim=-1) @ v[i:i + g]
                         for i in range(0, len(q), g)])
        if s is None:
            out = out.transpose(1, 2).reshape(B, C, H, W)
        else:
            out = out.reshape(B, H // s, W // s, s, s, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return x + self.proj(out)


class Block(nn.Module):
    """One UNet block: n_res residual layers (with the embedding injected), then self-attention."""

    def __init__(self, c_in, c_out, cfg, n_res):
        super().__init__()
        self.res = nn.ModuleList([ResidualLayer(c_in if k == 0 else c_out, c_out, cfg.embed_dim, cfg.groups, cfg.scale_shift,
                                                cfg.dropout)
                                  for k in range(n_res)])
        self.attn = SelfAttention(c_out, cfg.groups, cfg.attn_window, cfg.embed_dim if cfg.embed_token else None)

    def forward(self, x, emb):
        for layer in self.res:
            x = layer(x, emb)
        return self.attn(x, emb)


# Images per forward pass. On a CPU a batch is fastest in chunks whose feature maps stay in the
# cache: a guided sampling step (200 images) takes less time in chunks of 50 than in chunks of
# 100 or in one pass (benchmark.py measures all three on each machine).
CHUNK = 50


def in_chunks(net, size, x_t, t, y):
    """net(x_t, t, y) computed on `size` images at a time and concatenated."""
    return torch.cat([net(x_t[i:i + size], t[i:i + size], None if y is None else y[i:i + size])
                      for i in range(0, len(x_t), size)])


class MnistUNet(nn.Module):
    """x_t (B, 1, 28, 28), t (B,) step indices, y (B,) digits or NULL_LABEL -> eps_pred (B, 1, 28, 28).
    Without gradients, batches larger than `chunk` images (default CHUNK) go through in chunks.

    Down path: blocks at 28, 14, 7, 7 pixels (2x average-pool after the first two).
    Up path: four blocks, each fed the previous output concatenated with the matching
    down-path output (skip connection), nearest-neighbour 2x upsampling before the last two.
    """

    def __init__(self, config: MnistUNetConfig):
        super().__init__()
        self.config = cfg = config
        c1, c2, c3, c4 = cfg.channels
        self.embed = StepAndClassEmbedding(cfg.T, cfg.embed_dim, cfg.num_classes, cfg.fourier_scale, cfg.embed_layers)
        self.conv_in = nn.Conv2d(1, c1, 3, padding=1)
        n1, n2, n3, n4 = res_layers_per_level(cfg.res_layers)
        self.down = nn.ModuleList([Block(c1, c1, cfg, n1), Block(c1, c2, cfg, n2), Block(c2, c3, cfg, n3), Block(c3, c4, cfg, n4)])
        self.up = nn.ModuleList([Block(c4 + c4, c4, cfg, n4), Block(c4 + c3, c3, cfg, n3),
                                 Block(c3 + c2, c2, cfg, n2), Block(c2 + c1, c1, cfg, n1)])
        self.norm_out = nn.GroupNorm(cfg.groups, c1)
        self.conv_out = nn.Conv2d(c1, 1, 3, padding=1)
        if cfg.prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {cfg.prediction!r}; choose 'eps' or 'v'")
        if cfg.prediction == "v":  # abar_t of the cosine schedule that MNIST training uses (not saved: derived from T)
            self.register_buffer("abar", utils.Diffusion(cfg.T, "cosine").alphas_cumprod.float(), persistent=False)

    def forward(self, x_t, t, y=None, chunk=None):
        chunk = CHUNK if chunk is None else chunk
        if len(x_t) > chunk and not torch.is_grad_enabled():  # sampling: every layer is per-image, so chunks
            # give the same result as one batch (training batches go through whole)
            return in_chunks(functools.partial(self, chunk=chunk), chunk, x_t, t, y)
        emb = self.embed(t, y)
        h = self.conv_in(x_t)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < 2:
                h = F.avg_pool2d(h, 2)
        for i, block in enumerate(self.up):
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.config.prediction == "eps":
            return out
        # v = sqrt(abar) eps - sqrt(1 - abar) x_0 with x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps gives
        # eps = sqrt(abar) v + sqrt(1 - abar) x_t (Salimans & Ho 2022), in float32 even under autocast
        abar = self.abar[t][:, None, None, None]
        return abar.sqrt() * out.float() + (1 - abar).sqrt() * x_t.float()


def res_layers_per_level(res_layers):
    """Residual layers of the blocks at 28, 14, 7 and 7 pixels, from one number or four."""
    if isinstance(res_layers, int):
        return (res_layers,) * 4
    if len(res_layers) != 4:
        raise ValueError(f"res_layers takes one number or four, not {len(res_layers)}")
    return tuple(res_layers)


def unet_config(recorded):
    """The network config a checkpoint records; settings added after it was written take their defaults."""
    cfg = dict(recorded)
    cfg["channels"] = tuple(cfg["channels"])
    if isinstance(cfg.get("res_layers"), list):
        cfg["res_layers"] = tuple(cfg["res_layers"])
    return MnistUNetConfig(**cfg)


def build_unet(recorded):
    return MnistUNet(unet_config(recorded))


def config_dict(config):
    d = asdict(config)
    d["channels"] = list(d["channels"])
    if isinstance(d["res_layers"], tuple):
        d["res_layers"] = list(d["res_layers"])
    return d


def load_unet(path, T=None, device="cpu"):
    """(EMA UNet in eval mode, Diffusion, checkpoint dict) from an MNIST checkpoint; T must match if given."""
    ckpt = utils.load_checkpoint(path, KIND, TRAIN_COMMAND)
    if T is not None and ckpt["T"] != T:
        raise utils.UserError(f"{path} was trained with T={ckpt['T']}, not --T {T}")
    with utils.checkpoint_format(path):
        model = build_unet(ckpt["model_config"])
        # checkpoints from before --res-layers hold one residual layer per block, stored as block.res
        state = {re.sub(r"\.res\.(?!\d)", ".res.0.", k): v for k, v in ckpt["model"].items()}
        model.load_state_dict(state)
        diffusion = utils.Diffusion(ckpt["T"], ckpt["schedule"])
    return model.to(device).eval(), diffusion, ckpt


# ----------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------
SNAPSHOT_STEPS = 25  # DDIM steps of the snapshots drawn during training (one digit of each class, w = 0)


def snapshot_epochs(epochs):
    """Epochs after which training draws its snapshot: 1, 2, 4, 8, ... and the last."""
    return sorted({2 ** k for k in range(epochs.bit_length()) if 2 ** k <= epochs} | {epochs})


def training_snapshot(model, diffusion, seed, device):
    """One digit of each class drawn with the current EMA weights at w = 0, from the same noise
    at every snapshot (DDIM, SNAPSHOT_STEPS steps): uint8 (10, 28, 28), ink = 255."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = draw(model, diffusion, torch.arange(10), 0.0, seed, device, sampler="ddim", steps=min(SNAPSHOT_STEPS, diffusion.T))
    model.train(was_training)
    return to_grey_levels(x)


def train_config(args):
    """The network `train` builds from its flags."""
    if len(args.res_layers) not in (1, 4):
        raise utils.UserError(f"--res-layers takes one number or four (for 28, 14, 7 and 7 pixels), not {len(args.res_layers)}")
    res_layers = args.res_layers[0] if len(args.res_layers) == 1 else tuple(args.res_layers)
    return MnistUNetConfig(T=args.T, channels=tuple(args.channels), res_layers=res_layers,
                           scale_shift=args.embedding == "scale-shift", embed_layers=args.embedding_layers,
                           prediction=args.prediction, dropout=args.dropout, embed_token=args.embedding_token)


def train_settings(args):
    """The training settings `train` records in its checkpoint, from its flags."""
    return {"seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "p_uncond": args.p_uncond, "ema_decay": args.ema, "min_snr": args.min_snr,
            "min_snr_mode": args.min_snr_mode, "extra_ema": list(args.extra_ema), "model_guidance": args.model_guidance}


def extra_ema_path(out, decay):
    """Where `train --extra-ema DECAY` writes the checkpoint with that EMA's weights."""
    return f"{os.path.splitext(out)[0]}_ema{decay:g}.pt"


def cmd_train(args, device):
    out, resume_path = args.out, args.out + ".resume.pt"
    utils.ensure_writable_dir(out)
    precision = utils.announce_precision(args.precision, device)
    images, labels = load_mnist(args.data, "train")
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    x_all = to_model(images)
    config = train_config(args)
    diffusion = utils.Diffusion(args.T, "cosine")

    torch.manual_seed(args.seed)  # initial weights, Fourier frequencies and dropout masks
    model = MnistUNet(config).to(device)
    ema = utils.make_ema(model, args.ema)
    extra_emas = [utils.make_ema(model, decay) for decay in args.extra_ema]  # other averaging lengths, same run
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = utils.make_generator(args.seed, device)
    order_gen = utils.make_generator(args.seed + 1)  # order of the images in each epoch
    steps_per_epoch = math.ceil(len(x_all) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    run = {**train_settings(args), "precision": precision, "images": len(x_all), "data": args.data, "device": str(device)}
    epoch, seconds = 0, 0.0
    history = {"epoch": [], "loss": [], "seconds": [], "snapshot_epochs": [], "snapshots": []}
    if args.resume:
        state = utils.load_checkpoint(resume_path, KIND + "-resume", f"{TRAIN_COMMAND} --out {out}")
        with utils.checkpoint_format(resume_path):  # settings the file predates take their defaults
            saved = {"min_snr_mode": "weight", "extra_ema": [], "model_guidance": 0.0,
                     **config_dict(unet_config(state["model_config"])), **state["run"]}
        current = {**config_dict(config), **run}
        differ = [f"{k} {saved.get(k)} there, {current.get(k)} here" for k in sorted(saved.keys() | current.keys())
                  if saved.get(k) != current.get(k)]
        if differ:
            raise utils.UserError(f"{resume_path} was made with other settings ({'; '.join(differ)}); "
                                  "pass the same flags, or rerun without --resume to start again")
        utils.restore_training_state(state, model, ema, optimizer, extra_emas, noise=gen, order=order_gen)
        epoch, seconds, history = state["epoch"], state["seconds"], state["history"]
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.epochs} epochs of {steps_per_epoch} "
          f"batches; starting at epoch {epoch + 1}", flush=True)

    start = time.perf_counter() - seconds
    with utils.StopOnInterrupt() as interrupt:
        while epoch < args.epochs and not interrupt.requested:
            # 1. one pass over the shuffled training images
            order = torch.randperm(len(x_all), generator=order_gen)
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", disable=args.quiet)
            losses, t_epoch = [], time.perf_counter()
            for i in bar:
                if interrupt.requested:
                    break
                idx = order[i * args.batch_size:(i + 1) * args.batch_size]
                lr = utils.cosine_lr(epoch * steps_per_epoch + i, total_steps, args.lr, warmup=min(500, total_steps // 10 + 1))
                losses.append(utils.train_step(model, ema, optimizer, diffusion, x_all[idx].to(device),
                                               labels[idx].to(device), gen, lr, args.p_uncond,
                                               bf16=precision == "bf16", min_snr=args.min_snr,
                                               min_snr_mode=args.min_snr_mode, prediction=args.prediction,
                                               model_guidance=args.model_guidance))
                for extra in extra_emas:
                    extra.update_parameters(model)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}",
                                    img_s=f"{len(losses) * args.batch_size / (time.perf_counter() - t_epoch):.0f}")
            bar.close()
            if len(losses) < steps_per_epoch:  # interrupted inside the epoch: drop it
                break
            epoch += 1
            # 2. at epochs 1, 2, 4, 8, ... and the last: the same ten starting noises, denoised
            # with the EMA weights (its own seed, so the training randomness is untouched)
            if epoch in snapshot_epochs(args.epochs):
                history["snapshot_epochs"].append(epoch)
                history["snapshots"].append(training_snapshot(ema.module, diffusion, args.seed, device))
            seconds = time.perf_counter() - start
            history["epoch"].append(epoch)
            history["loss"].append(sum(losses) / len(losses))
            history["seconds"].append(round(seconds, 1))
            # 3. the checkpoint (EMA weights), and what --resume needs
            ckpt = {"kind": KIND, "T": args.T, "schedule": "cosine", "model_config": config_dict(config),
                    "model": ema.module.state_dict(),
                    "train": {**run, "epochs_done": epoch, "seconds": round(seconds, 1),
                              "final_loss": history["loss"][-1], "history": history}}
            utils.save_checkpoint(out, ckpt)
            for decay, extra in zip(args.extra_ema, extra_emas):
                utils.save_checkpoint(extra_ema_path(out, decay), {
                    **ckpt, "model": extra.module.state_dict(),
                    "train": {**ckpt["train"], "ema_decay": decay, "extra_ema": []}})
            if epoch < args.epochs:
                utils.save_checkpoint(resume_path, {
                    "kind": KIND + "-resume", "model_config": config_dict(config), "run": run,
                    **utils.training_state(model, ema, optimizer, extra_emas, noise=gen, order=order_gen),
                    "epoch": epoch, "seconds": seconds, "history": history})
            print(f"epoch {epoch}: loss {history['loss'][-1]:.4f}, {seconds:.0f} s so far; wrote {out}", flush=True)
    if epoch < args.epochs:
        raise utils.UserError(f"interrupted during epoch {epoch + 1}; {epoch} epochs are saved; continue with "
                              f"`{TRAIN_COMMAND} --out {out} --epochs {args.epochs} --resume` (and the same settings)")
    if os.path.exists(resume_path):
        os.remove(resume_path)


# ----------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------
CLIP = (-1.0, 1.0)  # predicted clean images are clipped to the data range at each step


def draw(model, diffusion, labels, w, seed, device, progress=False, sampler="ddpm", steps=None, eta=0.0,
         guided_steps=None, clip=True):
    """Samples for the given digits (n,) at guidance w (on the first guided_steps steps only, if given):
    (n, 28, 28) float32 in [0, 1]. x_T and every z come from one generator seeded with `seed`. With
    clip=False the predicted clean images are not clipped to CLIP on the way (the handout's step)."""
    gen = utils.make_generator(seed, device)
    x_T = torch.randn(len(labels), 1, 28, 28, generator=gen, device=device)
    x_0 = utils.sample(diffusion, model, x_T, labels.to(device), w, gen, sampler, steps, eta, CLIP if clip else None,
                       progress, guided_steps)
    return to_pixels(x_0)[:, 0].cpu()


def cmd_sample(args, device):
    if not args.out.endswith(".npy"):
        raise utils.UserError(f"--out {args.out}: the samples file must end in .npy")
    utils.ensure_writable_dir(args.out)
    model, diffusion, _ = load_unet(args.checkpoint, args.T, device)
    utils.check_steps(args.steps, diffusion)
    check_guided_steps(args.guided_steps, args.steps or diffusion.T)
    x = draw(model, diffusion, torch.full((args.n,), args.label), args.w, args.seed, device, not args.quiet,
             args.sampler, args.steps, args.eta, args.guided_steps, args.clip)
    utils.save_npy(args.out, x.numpy().astype(np.float32))
    print(f"wrote {args.out}: {args.n} samples of digit {args.label} at w={args.w:g}{'' if args.clip else ', unclipped'}")


def check_guided_steps(guided_steps, steps):
    """Refuse a --guided-steps larger than the number of sampling steps."""
    if guided_steps is not None and guided_steps > steps:
        raise utils.UserError(f"--guided-steps {guided_steps} is more than the {steps} sampling steps")


def add_guided_steps_flag(parser):
    parser.add_argument("--guided-steps", type=utils.positive_int, default=None, metavar="K",
                        help="guide only the first K sampling steps, the noisiest, and draw the rest without "
                             "guidance (one network pass instead of two); default: every step")


def add_clip_flag(parser):
    parser.add_argument("--no-clip", dest="clip", action="store_false",
                        help=f"do not clip the predicted clean image to [{CLIP[0]:g}, {CLIP[1]:g}] at each step "
                             "(the handout's reverse step, Ho et al. eq. 11); default: clip")


MASKS = ("top", "bottom", "left", "right", "centre")


def removed_region(name):
    """bool (28, 28), True on the pixels the mask removes: a half of the image, or the central 14 x 14."""
    region = torch.zeros(28, 28, dtype=torch.bool)
    halves = {"top": (slice(0, 14), slice(None)), "bottom": (slice(14, 28), slice(None)),
              "left": (slice(None), slice(0, 14)), "right": (slice(None), slice(14, 28)),
              "centre": (slice(7, 21), slice(7, 21))}
    if name not in halves:
        raise ValueError(f"unknown mask {name!r}; choose one of {', '.join(MASKS)}")
    region[halves[name]] = True
    return region


def test_digit(data, index):
    """Test digit `index`: image (28, 28) in [0, 1] and its label; a one-line error outside the split."""
    images, labels = load_mnist(data, "test")
    if not 0 <= index < len(images):
        raise utils.UserError(f"--index {index}: the test split has digits 0 to {len(images) - 1}")
    return images[index, 0], int(labels[index])


def complete(model, diffusion, image, removed, labels, w, seed, device, progress=False):
    """Inpaint: (n, 28, 28) in [0, 1], each `image` with the `removed` pixels filled in toward its label
    (utils.inpaint by replacement); the kept pixels are the original's."""
    n = len(labels)
    gen = utils.make_generator(seed, device)
    x_T = torch.randn(n, 1, 28, 28, generator=gen, device=device)
    known = to_model(image).expand(n, 1, 28, 28).to(device)
    x = utils.inpaint(diffusion, model, x_T, known, ~removed.to(device)[None, None], labels.to(device), w, gen,
                      clip_x0=CLIP, progress=progress)
    return torch.where(removed, to_pixels(x)[:, 0].cpu(), image)


def edit(model, diffusion, image, t0, labels, w, seed, device, progress=False):
    """SDEdit: (n, 28, 28) in [0, 1], `image` noised to step t0 and denoised toward `labels`."""
    gen = utils.make_generator(seed, device)
    x_0 = to_model(image).expand(len(labels), 1, 28, 28).to(device)
    x = utils.sdedit(diffusion, model, x_0, t0, labels.to(device), w, gen, CLIP, progress)
    return to_pixels(x)[:, 0].cpu()


def test_digit_job(args, device):
    """What inpaint and edit both start from: (test image, its label, the target label, model, diffusion)."""
    if not args.out.endswith(".npy"):
        raise utils.UserError(f"--out {args.out}: the samples file must end in .npy")
    utils.ensure_writable_dir(args.out)
    image, own = test_digit(args.data, args.index)
    model, diffusion, _ = load_unet(args.checkpoint, args.T, device)
    return image, own, own if args.label is None else args.label, model, diffusion


def cmd_inpaint(args, device):
    image, own, label, model, diffusion = test_digit_job(args, device)
    x = complete(model, diffusion, image, removed_region(args.mask), torch.full((args.n,), label), args.w,
                 args.seed, device, not args.quiet)
    utils.save_npy(args.out, x.numpy().astype(np.float32))
    print(f"wrote {args.out}: test digit {args.index} (a {own}) without its {args.mask} part, "
          f"completed {args.n} times toward {label} at w={args.w:g}")


def cmd_edit(args, device):
    image, own, label, model, diffusion = test_digit_job(args, device)
    if not 1 <= args.t0 <= diffusion.T:
        raise utils.UserError(f"--t0 {args.t0}: must be between 1 and T = {diffusion.T}")
    x = edit(model, diffusion, image, args.t0, torch.full((args.n,), label), args.w, args.seed, device, not args.quiet)
    utils.save_npy(args.out, x.numpy().astype(np.float32))
    print(f"wrote {args.out}: test digit {args.index} (a {own}) noised to t0 = {args.t0} and denoised "
          f"{args.n} times toward {label} at w={args.w:g}")


PRIOR_DIGITS = 10  # test digits (the first of each label) behind the inpainting and SDEdit numbers
PRIOR_T0 = (0.125, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)  # SDEdit's t0 as shares of T: 25, 50, 100, 125, ..., 200 at T = 200


def cmd_prior(args, device):
    """figures/mnist_inpaint.png and mnist_edit.png with their JSON: the model used as a prior."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    utils.ensure_writable_dir(args.out)
    model, diffusion, _ = load_unet(args.checkpoint, args.T, device)
    clf, _ = load_classifier(args.classifier, device)
    read = lambda x: batched(clf, x[:, None].to(device)).argmax(1).cpu()  # the digit the classifier reads
    images, labels = load_mnist(args.data, "test")
    picks = [int((labels == d).nonzero()[0]) for d in range(PRIOR_DIGITS)]  # the first test digit of each label
    other = lambda d: (d + 5) % 10  # the label the "other" completions and edits ask for
    folder = os.path.dirname(args.out) or "."
    n = args.n

    # 1. inpainting: for each mask, every picked digit completed n times toward its own label and
    # toward another; how often the classifier reads the requested label
    numbers = {"T": diffusion.T, "w": args.w, "n_per_digit": n, "digits": picks, "by_mask": {}}
    shown = {}
    for k, mask in enumerate(tqdm(MASKS, desc="inpainting", disable=args.quiet)):
        removed = removed_region(mask)
        row = {}
        for mode in ("own", "other"):
            hits, filled_change = [], []
            for j, i in enumerate(picks):
                target = labels[i].item() if mode == "own" else other(labels[i].item())
                x = complete(model, diffusion, images[i, 0], removed, torch.full((n,), target), args.w,
                             args.seed + 100 * k + j, device)
                hits.append((read(x) == target).float().mean().item())
                filled_change.append((x - images[i, 0]).abs()[:, removed].mean().item())
                if j == k:  # one digit per mask goes into the figure
                    shown[(mask, mode)] = (i, target, x)
            row[f"{mode}_label_read_as_requested"] = float(np.mean(hits))
            row[f"{mode}_removed_pixels_mean_abs_change"] = float(np.mean(filled_change))  # against the original digit
        row["removed_share_of_ink"] = float(np.mean([images[i, 0][removed].sum().item() / images[i, 0].sum().item() for i in picks]))
        numbers["by_mask"][mask] = row
    fig, axes = plt.subplots(len(MASKS), 2 + 2 * min(n, 3), figsize=(7.4, 1.05 * len(MASKS) + 0.6))
    for r, mask in enumerate(MASKS):
        i, own_target, own = shown[(mask, "own")]
        _, other_target, moved = shown[(mask, "other")]
        removed = removed_region(mask)
        panels = [(images[i, 0], f"test #{i}:\na {labels[i].item()}"), (torch.where(removed, torch.full_like(images[i, 0], 0.5), images[i, 0]), f"{mask}\nremoved")]
        panels += [(own[c], f"as {own_target}") for c in range(min(n, 3))] + [(moved[c], f"as {other_target}") for c in range(min(n, 3))]
        for ax, (img, title) in zip(axes[r], panels):
            show_digit(ax, img)
            ax.set_title(title, fontsize=9)
    fig.suptitle(f"Inpainting test digits (T={diffusion.T}, w={args.w:g}): the original, what is kept (removed part grey),\n"
                 "completions toward its own digit and toward another", fontsize=10)
    fig.tight_layout()
    utils.save_figure(fig, os.path.join(folder, "mnist_inpaint.png"))
    utils.save_json(os.path.join(folder, "mnist_inpaint.json"), numbers)

    # 2. SDEdit: every picked digit noised to each t0 and denoised toward its own label and another;
    # the figure shows the first picked digit edited toward every label
    t0s = [max(1, round(share * diffusion.T)) for share in PRIOR_T0]
    numbers = {"T": diffusion.T, "w": args.w, "digits": picks, "t0": t0s, "by_t0": []}
    for t0 in tqdm(t0s, desc="editing", disable=args.quiet):
        entry = {"t0": t0, "alpha_bar": diffusion.alphas_cumprod[t0 - 1].item()}
        for mode in ("own", "other"):
            targets = torch.tensor([labels[i].item() if mode == "own" else other(labels[i].item()) for i in picks])
            x = torch.cat([edit(model, diffusion, images[i, 0], t0, targets[j:j + 1], args.w, args.seed + j, device)
                           for j, i in enumerate(picks)])
            entry[f"{mode}_label_read_as_requested"] = (read(x) == targets).float().mean().item()
            entry[f"{mode}_mean_abs_change"] = (x - images[picks, 0]).abs().mean().item()
        numbers["by_t0"].append(entry)
    i = picks[0]
    fig, axes = plt.subplots(len(t0s), 11, figsize=(7.4, 0.72 * len(t0s) + 0.7))
    for r, t0 in enumerate(t0s):
        x = edit(model, diffusion, images[i, 0], t0, torch.arange(10), args.w, args.seed, device)
        for c, img in enumerate([images[i, 0], *x]):
            show_digit(axes[r, c], img)
            if r == 0:
                axes[r, c].set_title("original" if c == 0 else f"to {c - 1}", fontsize=9.5)
        axes[r, 0].set_ylabel(f"t0={t0}", fontsize=9.5)
    fig.suptitle(f"SDEdit: test digit #{i}, a {labels[i].item()}, noised to step t0 and denoised toward each digit "
                 f"(T={diffusion.T}, w={args.w:g})",
                 fontsize=10)
    fig.tight_layout()
    utils.save_figure(fig, os.path.join(folder, "mnist_edit.png"))
    utils.save_json(os.path.join(folder, "mnist_edit.json"), numbers)
    print(f"wrote mnist_inpaint.png/.json and mnist_edit.png/.json in {folder}")


def cmd_animate(args, device, every=4, hold=8):
    """figures/mnist_forming.gif: one sample of each digit from noise to image, x_t above and the
    predicted clean image below, every `every` steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not args.out.endswith(".gif"):
        raise utils.UserError(f"--out {args.out}: the animation must end in .gif")
    utils.ensure_writable_dir(args.out)
    model, diffusion, _ = load_unet(args.checkpoint, args.T, device)
    T = diffusion.T
    xs, x0_hats = denoise_chain(model, diffusion, torch.arange(10), args.w, args.seed, device, not args.quiet)
    # frames at t = T (no prediction yet), then every `every` steps down to 0; x0_hats[t] is made from x_{t+1}
    frames = [(T, xs[T], None)] + [(t, xs[t], x0_hats[t]) for t in range(T - 1, -1, -1) if t % every == 0]
    fig, axes = plt.subplots(2, 10, figsize=(10, 2.6))
    images = [[show_digit(ax, torch.zeros(28, 28)) for ax in row] for row in axes]
    axes[0, 0].set_ylabel("x_t", fontsize=8)
    axes[1, 0].set_ylabel("predicted x_0", fontsize=8)

    def draw_frame(k):
        t, x_t, x0_hat = frames[min(k, len(frames) - 1)]
        for d in range(10):
            images[0][d].set_data(1 - x_t[d].numpy())
            images[1][d].set_data(np.ones((28, 28)) if x0_hat is None else 1 - x0_hat[d].numpy())  # none yet at t = T
        fig.suptitle(f"Digits forming: t = {t} (T = {T}, w = {args.w:g}, seed {args.seed})", fontsize=9)

    utils.save_animation(fig, draw_frame, len(frames) + hold, args.out, fps=10)
    print(f"wrote {args.out}")


def cmd_progress(args, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    utils.ensure_writable_dir(args.out)
    ckpt = utils.load_checkpoint(args.checkpoint, KIND, TRAIN_COMMAND)
    if args.T is not None and ckpt["T"] != args.T:
        raise utils.UserError(f"{args.checkpoint} was trained with T={ckpt['T']}, not --T {args.T}")
    history = ckpt["train"].get("history", {})
    if not history.get("snapshots"):
        raise utils.UserError(f"{args.checkpoint} holds no training snapshots (it was trained before they were "
                              f"recorded); retrain with `{TRAIN_COMMAND}`")
    epochs, snaps = history["snapshot_epochs"], torch.stack(history["snapshots"]).float() / 255
    fig, ax = plt.subplots(figsize=(5.2, 0.55 * len(epochs) + 0.9))
    image_grid(ax, snaps.reshape(-1, 28, 28).numpy(), len(epochs))
    ax.set_yticks([30 * k + 15 for k in range(len(epochs))], [str(e) for e in epochs], fontsize=9)
    ax.set_xticks([30 * k + 15 for k in range(10)], [str(k) for k in range(10)], fontsize=9)
    ax.set_ylabel("after epoch")
    ax.set_xlabel("requested digit")
    ax.set_title(f"The same noise denoised during training (w = 0, {SNAPSHOT_STEPS} DDIM steps)", fontsize=9)
    utils.save_figure(fig, args.out)
    print(f"wrote {args.out} ({len(epochs)} snapshots, epochs {', '.join(map(str, epochs))})")


def image_grid(ax, images, nrow):
    """Show (n, 28, 28) images in [0, 1] on one axis as a grid with nrow rows, ink dark on white."""
    n = images.shape[0]
    ncol = math.ceil(n / nrow)
    canvas = np.zeros((nrow * 30, ncol * 30), dtype=np.float32)  # ink values; a blank 1-pixel margin per digit
    for k in range(n):
        r, c = divmod(k, ncol)
        canvas[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = images[k]
    show_digit(ax, canvas, interpolation="nearest")


def show_digit(ax, image, **kwargs):
    """Show an image in [0, 1] (a tensor or array: one digit, or a grid of them) with ink dark on
    white and no ticks; returns the AxesImage (so an animation can change its data)."""
    shown = ax.imshow(1 - np.asarray(image), cmap="gray", vmin=0, vmax=1, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def cmd_grid(args, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    utils.ensure_writable_dir(args.out)
    model, diffusion, _ = load_unet(args.checkpoint, args.T, device)
    t0 = time.perf_counter()
    labels = torch.arange(10).repeat_interleave(10)
    x = draw(model, diffusion, labels, args.w, args.seed, device, not args.quiet)
    seconds = time.perf_counter() - t0
    fig, ax = plt.subplots(figsize=(6, 6))
    image_grid(ax, x.numpy(), 10)
    ax.set_yticks([30 * k + 15 for k in range(10)], [str(k) for k in range(10)])
    ax.set_ylabel("requested digit")
    ax.set_title(f"MNIST samples, T={diffusion.T}, w={args.w:g}, 10 per digit (seed {args.seed})")
    utils.save_figure(fig, args.out)

    # the same starting noise and the same z at every w: two samples per digit for each w
    labels = torch.arange(10).repeat_interleave(2)
    fig, axes = plt.subplots(1, len(args.ws), figsize=(2 * len(args.ws), 6.4))
    for ax, w in zip(np.atleast_1d(axes), args.ws):
        image_grid(ax, draw(model, diffusion, labels, w, args.seed, device, not args.quiet).numpy(), 10)
        ax.set_title(f"w = {w:g}")
    fig.suptitle(f"Same x_T and z, several guidance strengths w (T={diffusion.T})")
    base, ext = os.path.splitext(args.out)
    utils.save_figure(fig, f"{base}_w{ext}")
    print(f"wrote {args.out} (100 samples in {seconds:.1f} s) and {base}_w{ext}")


SETTLE_TOL = 0.1  # a pixel has settled once the predicted clean image stays within 0.1 of its final value


def formation(x0_hats, final):
    """When does each pixel of the digit get decided?

    x0_hats: (T, n, 28, 28) predicted clean images in [0, 1], [k] made at paper step k + 1;
    final: (n, 28, 28) the samples. A pixel's settle step is the highest t from which the
    prediction stays within SETTLE_TOL of the final value down to the end (0 if it never
    settles before the last step). Returns (settle (n, 28, 28) int64, settled_share (T + 1,)
    where [t] is the share of pixels already settled at step t).
    """
    T = x0_hats.shape[0]
    close = (x0_hats - final[None]).abs() <= SETTLE_TOL  # (T, n, 28, 28)
    # stays[k]: close at every index 0..k, i.e. at paper steps k + 1 down to 1 (the end of the chain)
    stays = torch.cummin(close.int(), dim=0).values.bool()
    settle = stays.sum(0)  # the highest step from which the prediction stays close
    share = torch.stack([(settle >= t).float().mean() for t in range(T + 1)])
    return settle, share


def denoise_chain(model, diffusion, labels, w, seed, device, progress=False):
    """The whole DDPM chain for the given digits, in pixel units [0, 1] on the CPU:
    xs (T + 1, n, 28, 28) with [t] = x_t, and x0_hats (T, n, 28, 28) with [k] the prediction
    made from x_{k+1}. x_T and every z come from one generator seeded with `seed`."""
    gen = utils.make_generator(seed, device)
    x = torch.randn(len(labels), 1, 28, 28, generator=gen, device=device)
    xs, x0_hats = [to_pixels(x)[:, 0].cpu()], []
    with torch.no_grad():
        for x, x0_hat in diffusion.p_sample_loop_progressive(model, x, labels.to(device), w, gen, progress, CLIP):
            xs.append(to_pixels(x)[:, 0].cpu())
            x0_hats.append(to_pixels(x0_hat)[:, 0].cpu())
    return torch.stack(xs[::-1]), torch.stack(x0_hats[::-1])


def cmd_trajectory(args, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    utils.ensure_writable_dir(args.out)
    model, diffusion, _ = load_unet(args.checkpoint, args.T, device)
    T = diffusion.T
    # n samples, digits 0-9 in turn, the shown one first
    xs, x0_hats = denoise_chain(model, diffusion, (torch.arange(args.n) + args.label) % 10, args.w, args.seed,
                                device, not args.quiet)
    final = xs[0]

    # figure 1: one trajectory, x_t above and the predicted clean image below
    frames = list(range(T, -1, -max(1, T // 8)))
    if frames[-1] != 0:
        frames.append(0)
    fig, axes = plt.subplots(2, len(frames), figsize=(7.4, 2.35))
    for col, t in enumerate(frames):
        pred = x0_hats[t - 1, 0] if t > 0 else final[0]
        for row, img in enumerate((xs[t, 0], pred)):
            show_digit(axes[row, col], img)
        axes[0, col].set_title(f"t={t}", fontsize=8.5)
    axes[0, 0].set_ylabel("x_t", fontsize=8.5)
    axes[1, 0].set_ylabel("predicted\nx_0", fontsize=8.5)
    fig.suptitle(f"Digit {args.label} from noise (T={T}, w={args.w:g}, seed {args.seed})", fontsize=10)
    utils.save_figure(fig, args.out)

    # figure 2: when pixels settle, over all n samples
    settle, share = formation(x0_hats, final)
    ink = final > 0.5
    ink_settle = settle[ink].float()
    per_sample_iqr = [float(np.subtract(*np.percentile(settle[k][ink[k]].numpy(), [75, 25]))) for k in range(args.n) if ink[k].any()]
    share_ink = [(settle[ink] >= t).float().mean().item() for t in range(T + 1)]
    share_bg = [(settle[~ink] >= t).float().mean().item() for t in range(T + 1)]
    fig = plt.figure(figsize=(7.4, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    a1, a2, a3 = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    a1.plot(range(T + 1), share_ink, label="ink pixels (final > 0.5)")
    a1.plot(range(T + 1), share_bg, label="background pixels")
    a1.invert_xaxis()
    a1.set_xlabel("step t (denoising runs from t=T on the left to t=0)")
    a1.set_ylabel("share settled")
    a1.set_title(f"Share of pixels settled (|x0_hat - x_0| <= {SETTLE_TOL})", fontsize=9)
    a1.legend(fontsize=8)
    im = a2.imshow(settle[0].numpy(), cmap="viridis", vmin=0, vmax=T)
    a2.set_title(f"Settle step of each pixel, sample 1 (digit {args.label})", fontsize=9)
    a2.set_xticks([])
    a2.set_yticks([])
    fig.colorbar(im, ax=a2, fraction=0.046)
    a3.hist(ink_settle.numpy(), bins=40, range=(0, T), color="C0")
    a3.set_xlabel("settle step of ink pixels")
    a3.set_ylabel("pixels")
    a3.set_title(f"Ink pixels of {args.n} samples", fontsize=9)
    folder, name = os.path.split(os.path.splitext(args.out)[0])
    ext = os.path.splitext(args.out)[1]
    formation_base = os.path.join(folder, name.replace("trajectory", "formation") if "trajectory" in name else name + "_formation")
    utils.save_figure(fig, formation_base + ext)
    q = np.percentile(ink_settle.numpy(), [10, 25, 50, 75, 90]).tolist()
    stats = {"T": T, "w": args.w, "n": args.n, "seed": args.seed, "tolerance": SETTLE_TOL,
             "ink_settle_step_percentiles_10_25_50_75_90": q,
             "median_within_sample_iqr_of_ink_settle_steps": float(np.median(per_sample_iqr)),
             "share_settled_ink": share_ink, "share_settled_background": share_bg, "share_settled_all": share.tolist()}
    utils.save_json(formation_base + ".json", stats)
    print(f"wrote {args.out}, {formation_base + ext} and {formation_base}.json; ink pixels settle at steps "
          f"{q[1]:.0f}-{q[3]:.0f} (25-75%), median within-sample spread {stats['median_within_sample_iqr_of_ink_settle_steps']:.0f} steps")


# ----------------------------------------------------------------------------------
# The classifier and the evaluation
# ----------------------------------------------------------------------------------
class Classifier(nn.Module):
    """A small CNN: two conv-conv-pool stages, a 128-d feature layer, then 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def features(self, images):
        """images (B, 1, 28, 28) or (B, 28, 28) in [0, 1] -> (B, 128)."""
        return self.body(images.reshape(-1, 1, 28, 28) - 0.5)

    def forward(self, images):
        return self.head(self.features(images))


@torch.no_grad()
@torch.no_grad()
def batched(fn, x, size=1000):
    """fn applied to x in batches of `size` (inference only), concatenated."""
    return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)])


def augment(images, gen, degrees=10.0, scale=0.1, shift=2.0):
    """Each image (B, 1, 28, 28) in [0, 1] turned by up to `degrees` about its centre, scaled
    by 1 +- `scale` and moved by up to `shift` pixels along each axis of the turned and scaled
    frame (so up to 1.1 (cos 10 + sin 10) 2 = 2.5 pixels along the image's own axes at the
    defaults), independently and uniformly at random (bilinear, blank outside the frame): the
    ways real handwriting varies, so the classifier learns to ignore them."""
    b = len(images)
    u = lambda: 2 * torch.rand(b, generator=gen) - 1  # uniform in [-1, 1]
    angle, zoom = u() * math.radians(degrees), 1 + u() * scale
    tx, ty = u() * shift * 2 / 28, u() * shift * 2 / 28  # affine_grid measures the frame as [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def cmd_classifier(args, device):
    utils.ensure_writable_dir(args.out)
    precision = utils.announce_precision(args.precision, device)
    images, labels = load_mnist(args.data, "train")
    test_x, test_y = load_mnist(args.data, "test")
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    torch.manual_seed(args.seed)
    clf = Classifier().to(device)
    optimizer = torch.optim.Adam(clf.parameters(), lr=1e-3)
    gen = utils.make_generator(args.seed)
    batch, start = 128, time.perf_counter()
    steps = args.epochs * math.ceil(len(images) / batch)
    step = 0
    for epoch in range(args.epochs):
        clf.train()
        order = torch.randperm(len(images), generator=gen)
        bar = tqdm(range(0, len(images), batch), desc=f"classifier epoch {epoch + 1}/{args.epochs}", disable=args.quiet)
        for i in bar:
            idx = order[i:i + batch]
            x = augment(images[idx], gen).to(device)
            for group in optimizer.param_groups:
                group["lr"] = utils.cosine_lr(step, steps, 1e-3, warmup=100)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(clf(x).float(), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
    clf.eval()
    acc = (batched(clf, test_x.to(device)).argmax(1).cpu() == test_y).float().mean().item()
    utils.save_checkpoint(args.out, {"kind": CLASSIFIER_KIND, "model": clf.state_dict(),
                                     "train": {"seed": args.seed, "epochs": args.epochs, "images": len(images),
                                               "precision": precision, "test_accuracy": acc,
                                               "seconds": round(time.perf_counter() - start, 1)}})
    print(f"wrote {args.out}: test accuracy {acc:.4f}")


def load_classifier(path, device):
    ckpt = utils.load_checkpoint(path, CLASSIFIER_KIND, CLASSIFIER_COMMAND)
    clf = Classifier()
    with utils.checkpoint_format(path):
        clf.load_state_dict(ckpt["model"])
    return clf.to(device).eval(), ckpt


FLOOR_DRAWS = 5


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two feature sets (n, d):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017)."""
    from scipy import linalg
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # with n near d, S_a S_b is close to singular; the check below handles it
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular covariances (few samples): regularise slightly
        offset = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def mean_pairwise_distance(f):
    """Mean Euclidean distance between distinct rows of f (n, d)."""
    d = torch.cdist(f.double(), f.double())
    n = f.shape[0]
    return (d.sum() / (n * (n - 1))).item()


def per_class(images, labels, n, gen=None):
    """n images of each digit, in digit order: (10 n, 28, 28) and labels. The first n of each
    digit, or n drawn at random without replacement if a generator is given."""
    idx = []
    for k in range(10):
        of_k = torch.nonzero(labels == k)[:, 0]
        idx.append(of_k[:n] if gen is None else of_k[torch.randperm(len(of_k), generator=gen)[:n]])
    idx = torch.cat(idx)
    return images[idx], labels[idx]


def cmd_evaluate(args, device):
    utils.ensure_writable_dir(args.out)
    figure = os.path.splitext(args.out)[0] + ".png"
    if args.replot:  # the figure again from the saved numbers, with no sampling
        try:
            with open(args.out) as f:
                written = plot_evaluation(json.load(f), figure)
        except FileNotFoundError:
            raise utils.UserError(f"{args.out} not found; make it with `python mnist_ddpm.py evaluate --out {args.out}`") from None
        except (ValueError, KeyError, TypeError):
            raise utils.UserError(f"{args.out} is not an evaluation file of `python mnist_ddpm.py evaluate`") from None
        print(f"wrote {' and '.join(written)} from {args.out}")
        return
    model, diffusion, ckpt = load_unet(args.checkpoint, args.T, device)
    utils.check_steps(args.steps, diffusion)
    check_guided_steps(args.guided_steps, args.steps or diffusion.T)
    clf, clf_ckpt = load_classifier(args.classifier, device)
    feats = lambda x: batched(clf.features, x.to(device)).cpu()
    predict = lambda f: batched(clf.head, f.to(device)).argmax(1).cpu()  # digits from features
    gen = utils.make_generator(args.seed)
    test_x, test_y = per_class(*load_mnist(args.data, "test"), args.n, gen)
    f_test = feats(test_x)
    # The floor: real training digits against the same test digits, at the same n. The
    # training set is not in random order (its first 100 of each digit score about twice
    # a random 100), so the floor averages FLOOR_DRAWS random draws.
    train = load_mnist(args.data, "train")
    floors = [frechet_distance(feats(per_class(*train, args.n, gen)[0]), f_test) for _ in range(FLOOR_DRAWS)]
    real_div = [mean_pairwise_distance(f_test[test_y == k]) for k in range(10)]
    # what real digits score: a sampler that drew exactly from the data would score about this
    real_accuracy = (predict(f_test) == test_y).float().mean().item()
    result = {"checkpoint": args.checkpoint, "T": diffusion.T, "n_per_digit": args.n, "seed": args.seed,
              "model": model_fingerprint(ckpt), "classifier_test_accuracy": clf_ckpt["train"]["test_accuracy"],
              "frechet_floor_train_vs_test": float(np.mean(floors)), "frechet_floor_draws": floors,
              "real_test_accuracy": real_accuracy,
              "real_diversity_per_digit": real_div, "by_w": []}
    if args.guided_steps is not None:  # (absent: every step guided)
        result["guided_steps"] = args.guided_steps
    if not args.clip:  # (absent: clipped)
        result["clip_x0"] = False
    steps = args.steps or diffusion.T
    # An earlier run into the same file with the same model (its training record), n, seed, guided
    # steps, clipping, classifier and data (the floor fingerprints them) keeps its entries: only new
    # (w, sampler, steps, eta) settings are sampled.
    kept = {}
    if os.path.exists(args.out):
        try:
            with open(args.out) as f:
                earlier = json.load(f)
            if same_evaluation(earlier, result):
                kept = {entry_key(e, diffusion.T): e for e in earlier["by_w"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        if not kept:
            print(f"{args.out} holds no results of this model and settings; it will be replaced", flush=True)
    print(f"real test digits: {real_accuracy:.3f} classified as their label; "
          f"Frechet floor {result['frechet_floor_train_vs_test']:.2f}", flush=True)
    labels = torch.arange(10).repeat_interleave(args.n)
    todo = [(w, args.sampler, steps, args.eta) for w in args.ws]
    result["by_w"] = list(kept.values())  # (all of them until replaced, so an interrupted run loses none)
    for w, sampler, steps, eta in todo:
        if "misread" in kept.get((w, sampler, steps, eta), {}):  # (entries from before the misreads were kept: sampled again)
            entry = kept[(w, sampler, steps, eta)]
            print(f"w={w:g}, {sampler} {steps} steps: kept from {args.out}")
        else:
            t0 = time.perf_counter()
            x = draw(model, diffusion, labels, w, args.seed, device, not args.quiet, sampler, steps, args.eta,
                     args.guided_steps, args.clip)
            seconds = time.perf_counter() - t0
            f = feats(x)
            pred = predict(f)
            div = [mean_pairwise_distance(f[labels == k]) for k in range(10)]
            entry = {"w": w, "sampler": sampler, "steps": steps, "eta": args.eta, "sampling_seconds": round(seconds, 1),
                     "accuracy": (pred == labels).float().mean().item(),
                     "accuracy_per_digit": [(pred[labels == k] == k).float().mean().item() for k in range(10)],
                     "frechet_distance": frechet_distance(f, f_test),
                     "diversity_per_digit": div,
                     "diversity_ratio": float(np.mean(div) / np.mean(real_div)),
                     "misread": misread_samples(x, labels, pred)}
        result["by_w"] = [e for e in result["by_w"] if entry_key(e, diffusion.T) != (w, sampler, steps, eta)] + [entry]
        result["by_w"].sort(key=lambda e: (entry_key(e, diffusion.T)[1], -entry_key(e, diffusion.T)[2], e["w"]))
        utils.save_json(args.out, result)  # after every setting, so a long run keeps what it has
        print(f"w={w:g}, {sampler} {steps} steps: accuracy {entry['accuracy']:.3f}, Frechet {entry['frechet_distance']:.2f} "
              f"(floor {result['frechet_floor_train_vs_test']:.2f}), diversity {entry['diversity_ratio']:.2f} of real, "
              f"{entry['sampling_seconds']:.0f} s", flush=True)
    print(f"wrote {' and '.join([args.out] + plot_evaluation(result, figure))}")


def same_evaluation(earlier, result):
    """Whether an earlier evaluation file was made with the same model (its training record), n, seed,
    guided steps and clipping, and the same classifier and data, which the Frechet floor fingerprints. The
    floor is compared to a millionth: its last digits change with the CPU's floating-point kernels."""
    same = ("checkpoint", "T", "n_per_digit", "seed", "model", "guided_steps", "clip_x0")
    return (isinstance(earlier, dict) and all(earlier.get(k) == result.get(k) for k in same)
            and math.isclose(earlier["frechet_floor_train_vs_test"], result["frechet_floor_train_vs_test"], rel_tol=1e-6))


MISREAD_KEPT = 40  # the most misread samples an evaluation entry keeps the pixels of


def misread_samples(images, labels, pred, limit=MISREAD_KEPT):
    """The first `limit` samples read as another digit than asked, for the figure of them:
    [{"index", "asked", "read", "pixels"}], index the sample's place in the evaluated batch and
    pixels its 28 x 28 grey levels in [0, 1] as bytes 0-255 (ink 255), row by row, in hex."""
    wrong = torch.nonzero(pred != labels)[:limit, 0]
    return [{"index": int(i), "asked": int(labels[i]), "read": int(pred[i]),
             "pixels": to_grey_levels(images[i]).numpy().tobytes().hex()} for i in wrong]


def misread_image(sample):
    """The (28, 28) float image in [0, 1] of one entry of misread_samples."""
    return np.frombuffer(bytes.fromhex(sample["pixels"]), dtype=np.uint8).reshape(28, 28) / 255.0


def most_evaluated(settings, keys):
    """The (sampler, steps) setting among `settings` that the most entry keys have."""
    return max(settings, key=lambda s: sum(k[1:3] == s for k in keys))


def plot_misreads(result, out, per_row=10):
    """The samples read as another digit, one group of rows per w (of the most evaluated sampler
    setting), each titled 'asked → read'. Evaluations from before the misreads were kept draw nothing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [entry_key(e, result["T"]) for e in result["by_w"]]
    keyed = [(k, e) for k, e in zip(keys, result["by_w"]) if "misread" in e]
    if not keyed:
        return None
    setting = most_evaluated({k[1:3] for k, _ in keyed}, keys)
    entries = sorted((e for k, e in keyed if k[1:3] == setting), key=lambda e: e["w"])
    n = 10 * result["n_per_digit"]
    rows = [max(1, math.ceil(len(e["misread"]) / per_row)) for e in entries]
    fig, axes = plt.subplots(sum(rows), per_row + 1, figsize=(0.62 * (per_row + 1), 0.78 * sum(rows) + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    row = 0
    for e, r in zip(entries, rows):
        wrong = round(n * (1 - e["accuracy"]))
        shown = f"first {len(e['misread'])} shown" if len(e["misread"]) < wrong else ""
        axes[row, 0].text(1.0, 0.5, f"w = {e['w']:g}\n{wrong} of {n}\n{shown}", ha="right", va="center", fontsize=7.5,
                          transform=axes[row, 0].transAxes)
        for j, sample in enumerate(e["misread"]):
            ax = axes[row + j // per_row, 1 + j % per_row]
            ax.imshow(misread_image(sample), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{sample['asked']} → {sample['read']}", fontsize=8, pad=2)
        row += r
    fig.suptitle(f"Samples read as another digit than asked (asked → read), {setting[0].upper()} {setting[1]} steps, "
                 f"seed {result['seed']}", fontsize=9)
    fig.tight_layout(pad=0.3)
    utils.save_figure(fig, out)
    return out


def misread_figure(figure):
    """Where the figure of the misread samples goes, beside the evaluation's figure."""
    return os.path.splitext(figure)[0] + "_misread.png"


def entry_key(entry, T):
    """(w, sampler, steps, eta) of an evaluation entry; entries without a sampler are full DDPM."""
    return entry["w"], entry.get("sampler", "ddpm"), entry.get("steps", T), entry.get("eta", 0.0)


# ----------------------------------------------------------------------------------
# heldout: the loss on digits the model never saw, against digits it trained on
# ----------------------------------------------------------------------------------
def noise_errors(model, diffusion, x_0, y, seed, device, progress=None, batch=500):
    """(t, squared noise error) of each image noised once, label kept: t uniform over the T steps and
    the noise drawn from `seed`, so that two sets of the same size get the same steps and the same
    noise and differ only in their images."""
    gen = utils.make_generator(seed)
    ts, errors = [], []
    with torch.no_grad():
        for start in range(0, len(x_0), batch):
            x, labels = x_0[start:start + batch], y[start:start + batch]
            t = torch.randint(0, diffusion.T, (len(x),), generator=gen)
            noise = torch.randn(x.shape, generator=gen)
            eps = model(diffusion.q_sample(x, t, noise).to(device), t.to(device), labels.to(device)).float().cpu()
            ts.append(t)
            errors.append((eps - noise).square().flatten(1).mean(1))
            if progress is not None:
                progress.update(len(x))
    return torch.cat(ts), torch.cat(errors)


def heldout_comparison(t, train, test, diffusion, gamma, prediction="eps"):
    """Training against test digits, noised at the same steps t with the same noise (example i of each
    set): the mean loss of each, plain and weighted as the run was trained (Min-SNR with its gamma,
    and the weight of v for a v-predicting run; eps without gamma: plain), over all steps and over the
    noisy half of the chain (paper steps T/2 + 1 to T), and test / train with its standard error (delta
    method on the pairs, which share t and noise)."""
    plain = gamma is None and prediction == "eps"
    weight = (torch.ones(diffusion.T) if plain else diffusion.min_snr_weights(gamma, prediction))[t]
    noisy = t >= diffusion.T // 2
    result = {}
    for name, keep, w in (("plain", slice(None), 1.0), ("weighted", slice(None), weight),
                          ("plain_noisy_half", noisy, 1.0), ("weighted_noisy_half", noisy, weight[noisy])):
        a, b = w * train[keep], w * test[keep]
        ratio = (b.mean() / a.mean()).item()
        se = ((b - ratio * a).std() / len(a) ** 0.5 / a.mean()).item()
        result[name] = {"train": a.mean().item(), "test": b.mean().item(), "test_over_train": ratio,
                        "standard_error": se}
    return result


def cmd_heldout(args, device):
    if args.out:
        utils.ensure_writable_dir(args.out)
    start = time.perf_counter()
    model, diffusion, ckpt = load_unet(args.checkpoint, args.T, device)
    gamma, prediction = ckpt["train"].get("min_snr"), ckpt["model_config"].get("prediction", "eps")
    trained_on = ckpt["train"].get("data", DEFAULT_DATA)
    if os.path.abspath(args.data) != os.path.abspath(trained_on):
        print(f"note: {args.checkpoint} was trained on {trained_on}, not {args.data}: its 'training digits' here "
              "may be digits it never saw", file=sys.stderr)
    train, test = load_mnist(args.data, "train"), load_mnist(args.data, "test")
    seen = min(len(train[0]), ckpt["train"].get("images", len(train[0])))  # --limit N trains on the first N
    n = min(args.n, seen, len(test[0]))
    # the first n test digits, and n of the training digits the run saw, drawn at random (that split is
    # not in random order), with a generator of their own so that the choice is independent of the noise
    pick = torch.randperm(seen, generator=utils.make_generator(args.seed + 1))[:n]
    splits = {"train": [a[pick] for a in train], "test": [a[:n] for a in test]}
    steps, errors = {}, {}
    with tqdm(total=2 * n, desc="noised digits", unit="img", disable=args.quiet) as bar:
        for split, (images, labels) in splits.items():
            steps[split], errors[split] = noise_errors(model, diffusion, to_model(images), labels, args.seed, device, bar)
    assert torch.equal(steps["train"], steps["test"])  # the pairs share their step (and their noise)
    result = {"checkpoint": args.checkpoint, "model": model_fingerprint(ckpt), "n": n, "seed": args.seed,
              "min_snr": gamma, "prediction": prediction,
              "losses": heldout_comparison(steps["train"], errors["train"], errors["test"], diffusion, gamma, prediction),
              "seconds": round(time.perf_counter() - start, 1)}
    for name, r in result["losses"].items():
        print(f"{name:>19}: train {r['train']:.5f}, test {r['test']:.5f}, "
              f"test / train {r['test_over_train']:.3f} +- {r['standard_error']:.3f}")
    if args.out:
        utils.save_json(args.out, result)
        print(f"wrote {args.out}")


def model_fingerprint(ckpt):
    """What tells one training run of the diffusion model from another: its training record."""
    return {k: ckpt["train"][k] for k in ("seed", "epochs_done", "seconds", "final_loss")}


def plot_evaluation(result, out):
    """Accuracy, Frechet distance (with the floor) and diversity against w, one line per sampler setting;
    and beside it the samples read as another digit, where the results keep them. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [entry_key(e, result["T"]) for e in result["by_w"]]
    # the w values evaluated at three or more step counts get a panel against the steps
    ws_with_steps = sorted({k[0] for k in keys if len({j[2] for j in keys if j[0] == k[0]}) > 2})
    fig, axes = plt.subplots(2, 2, figsize=(7.4, 6.4))
    axes = axes.flat
    settings = sorted({key[1:3] for key in keys}, key=lambda s: (s[0], -s[1]))
    for sampler, steps in settings:
        entries = sorted((e for e in result["by_w"] if entry_key(e, result["T"])[1:3] == (sampler, steps)), key=lambda e: e["w"])
        if len(entries) == 1 and entries[0]["w"] in ws_with_steps:
            continue  # a single point, shown in the panel against the number of steps
        ws = [e["w"] for e in entries]
        label = f"{sampler.upper()}, {steps} steps"
        axes[0].plot(ws, [100 * e["accuracy"] for e in entries], "-o", label=label)
        axes[1].plot(ws, [e["frechet_distance"] for e in entries], "-o", label=label)
        axes[2].plot(ws, [100 * e["diversity_ratio"] for e in entries], "-o", label=label)
    axes[0].axhline(99.5, color="grey", ls=":", lw=1, label="target 99.5%")
    if "real_test_accuracy" in result:
        axes[0].axhline(100 * result["real_test_accuracy"], color="k", ls="--", lw=1, label="real test digits")
    axes[1].axhline(result["frechet_floor_train_vs_test"], color="k", ls="--", lw=1, label="floor: real train vs test")
    axes[1].axhline(1.15 * result["frechet_floor_train_vs_test"], color="grey", ls=":", lw=1, label="target: 1.15 x floor")
    axes[2].axhline(90, color="grey", ls=":", lw=1, label="target 90%")
    if ws_with_steps:  # Frechet distance against the number of sampling steps, at each w that has several
        for w in ws_with_steps:
            for sampler in utils.SAMPLERS:
                points = sorted((k[2], e["frechet_distance"]) for k, e in zip(keys, result["by_w"]) if k[:2] == (w, sampler))
                if points:
                    axes[3].plot(*zip(*points), "-o", label=f"{sampler.upper()}, w = {w:g}",
                                 color="C0" if sampler == "ddim" else "C1")
        axes[3].axhline(result["frechet_floor_train_vs_test"], color="k", ls="--", lw=1, label="floor")
        axes[3].set_xscale("log")
        axes[3].minorticks_off()
        steps = sorted({k[2] for k in keys})
        axes[3].set_xticks(steps, [str(k) for k in steps])
        axes[3].set_xlabel("sampling steps")
        axes[3].set_title("Frechet distance against sampling steps", fontsize=9)
        axes[3].legend(fontsize=7.5)
    else:  # which digits go wrong: the share read as asked, digit by digit, at each w
        most = most_evaluated(settings, keys)
        for key, e in sorted(zip(keys, result["by_w"]), key=lambda ke: ke[1]["w"]):
            if key[1:3] == most:
                axes[3].plot(range(10), [100 * a for a in e["accuracy_per_digit"]], "-o", ms=3.5, label=f"w = {e['w']:g}")
        axes[3].axhline(99.5, color="grey", ls=":", lw=1)
        axes[3].set_xticks(range(10))
        axes[3].set_xlabel("requested digit")
        axes[3].set_title(f"classified as requested, per digit (%), {most[0].upper()} {most[1]} steps", fontsize=9)
        axes[3].legend(fontsize=7.5)
    titles = ("classified as the requested digit (%)", "Frechet distance to real test digits",
              "within-class diversity, % of real")
    for ax, title in zip(axes[:3], titles):
        ax.set_xlabel("guidance strength w")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7.5)
    fig.suptitle(f"MNIST samples, {result['n_per_digit']} per digit (T={result['T']}, seed {result['seed']})", fontsize=10)
    fig.tight_layout()
    utils.save_figure(fig, out)
    return [out] + [p for p in [plot_misreads(result, misread_figure(out))] if p]


# The design study of REPORT.md (Problem 5, continued), in the order the runs were made: the stem of
# each run's evaluations in figures/mnist_study/ (<stem>_eval.json at seed 0, <stem>_eval_seed1.json
# at seed 1, 100 samples per digit, DDPM with 200 steps) and a short name for the figure.
DESIGN_RUNS = [
    ("bias_22_epochs", "bias (first model), 22 epochs"),
    ("scale_shift_24_epochs", "scale-shift, 24 epochs"),
    ("min_snr_24_epochs", "+ Min-SNR 5, 24 epochs"),
    ("min_snr_5_40_epochs", "+ Min-SNR 5, 40 epochs (shipped first)"),
    ("min_snr_1_40_epochs", "scale-shift + Min-SNR 1, 40 epochs"),
    ("channels_8_32_96_96_32_epochs", "Min-SNR 5, channels 8/32/96/96, 32 epochs"),
    ("min_snr_1_sampled_40_epochs", "Min-SNR 1, steps drawn by weight"),
    ("channels_16_48_96_96_min_snr_1_28_epochs", "Min-SNR 1, channels 16/48/96/96, 28 epochs"),
    ("v_min_snr_5_40_epochs", "Min-SNR 5, predicting v"),
    ("min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs", "Min-SNR 1, lr 2e-3, 5% unlabelled (reference)"),
    ("two_residual_layers_min_snr_1_lr_2e-3_p_uncond_0.05_28_epochs", "reference + 2 residual layers, 28 epochs"),
    ("min_snr_1_lr_4e-3_p_uncond_0.05_30_epochs", "reference at lr 4e-3, 30 epochs"),
    ("min_snr_1_lr_4e-3_p_uncond_0.05_40_epochs", "reference at lr 4e-3"),
    ("embedding_layers_2_min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs", "reference + 2-layer embedding"),
    ("embedding_layers_2_res_layers_1_1_2_2_36_epochs", "2-layer embedding, res. layers 1/1/2/2, 36 epochs"),
    ("batch_128_lr_3e-3_min_snr_1_p_uncond_0.05_40_epochs", "reference, batch 128 at lr 3e-3"),
    ("min_snr_1_lr_2e-3_p_uncond_0.02_40_epochs", "reference, 2% unlabelled"),
    ("min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs_seed_1", "reference recipe, training seed 1"),
    ("min_snr_0.5_lr_2e-3_p_uncond_0.05_40_epochs", "reference recipe at Min-SNR 0.5"),
    ("min_snr_1_lr_2e-3_p_uncond_0.05_80_epochs", "reference recipe, 80 epochs"),
    ("channels_32_32_64_64_32_epochs", "reference, channels 32/32/64/64, 32 epochs"),
    ("ema_0.9995_40_epochs", "reference recipe, EMA 0.9995"),
    ("ema_0.9998_40_epochs", "reference recipe, EMA 0.9998"),
    ("embedding_layers_2_ema_0.9995_40_epochs", "2-layer embedding, EMA 0.9995"),
    ("embedding_layers_2_ema_0.9998_40_epochs", "2-layer embedding, EMA 0.9998 (plain-target model)"),
    ("embedding_layers_2_dropout_0.1_40_epochs", "2-layer embedding, dropout 0.1"),
    ("embedding_layers_2_dropout_0.1_ema_0.9998_40_epochs", "2-layer embedding, dropout 0.1, EMA 0.9998"),
    ("embedding_layers_2_seed_1_40_epochs", "2-layer embedding, training seed 1"),
    ("embedding_layers_2_ema_0.9998_seed_1_40_epochs", "2-layer embedding, EMA 0.9998, training seed 1"),
    ("embedding_layers_2_embedding_token_40_epochs", "2-layer embedding, embedding token"),
    ("embedding_layers_2_embedding_token_ema_0.9998_40_epochs", "2-layer embedding, embedding token, EMA 0.9998"),
    ("model_guidance_0.2_32_epochs", "plain-target recipe + model guidance 0.2, 32 epochs (shipped)"),
]
# The reference of the study's comparisons, shipped while the later runs were made; the best run on the
# plain target, shipped next (the plain-target model); and the run shipped now, that recipe trained with
# model guidance (checkpoints/mnist_T200.pt is that run's checkpoint).
REFERENCE_RUN = "min_snr_1_lr_2e-3_p_uncond_0.05_40_epochs"
PLAIN_TARGET_RUN = "embedding_layers_2_ema_0.9998_40_epochs"
SHIPPED_RUN = "model_guidance_0.2_32_epochs"
W0_TARGET = 98.7  # % classified as asked without guidance (issue: the classifier's 99.7% less 1 point)


class DesignPoint(NamedTuple):
    """One design run at one seed, full DDPM at w = 0."""
    accuracy: float  # % classified as asked
    frechet_ratio: float  # Frechet distance / its floor (real train vs real test digits)
    samples: int
    real_accuracy: float  # % of the real test digits classified right
    misread: Optional[frozenset]  # indices of the samples read as another digit; None if not all were kept


def misread_indices(result, entry):
    """The indices of every sample an evaluation entry read as another digit, or None where the entry did
    not keep them all (evaluations from before misreads were kept, or more than MISREAD_KEPT of them)."""
    wrong = round(10 * result["n_per_digit"] * (1 - entry["accuracy"]))
    if "misread" not in entry or len(entry["misread"]) != wrong:
        return None
    return frozenset(m["index"] for m in entry["misread"])


def design_points(folder):
    """For each design run and seed: its DesignPoint, or None where that seed was not evaluated at w = 0
    with full DDPM. A run with no evaluation at all is a UserError."""
    if not os.path.isdir(folder):
        raise utils.UserError(f"study folder {folder} not found")
    points = []
    for stem, _ in DESIGN_RUNS:
        row = []
        for suffix in ("", "_seed1"):
            path = os.path.join(folder, f"{stem}_eval{suffix}.json")
            if not os.path.exists(path):
                row.append(None)
                continue
            try:
                with open(path) as f:
                    result = json.load(f)
                found = [e for e in result["by_w"] if entry_key(e, result["T"])[:3] == (0.0, "ddpm", result["T"])]
                row.append(DesignPoint(100 * found[-1]["accuracy"],
                                       found[-1]["frechet_distance"] / result["frechet_floor_train_vs_test"],
                                       result["n_per_digit"] * 10, 100 * result["real_test_accuracy"],
                                       misread_indices(result, found[-1])) if found else None)
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                raise utils.UserError(f"{path} is not an evaluation written by `python mnist_ddpm.py evaluate`") from None
        if row == [None, None]:
            raise utils.UserError(f"{folder} holds no evaluation at w = 0 of the design run {stem}: expected "
                                  f"{stem}_eval.json (and {stem}_eval_seed1.json), written by `python mnist_ddpm.py "
                                  f"evaluate --checkpoint <that run's checkpoint> --ws 0 [--seed 1] --out <file>`")
        points.append(row)
    return points


def design_run_index(stem):
    """The position of a run (by its file stem) in DESIGN_RUNS, and so in design_points' rows."""
    return [name for name, _ in DESIGN_RUNS].index(stem)


def shared_misreads(points, reference=REFERENCE_RUN):
    """For each design run and seed (from design_points): (misreads, how many of them the reference run also
    misreads, how many the two would share by chance), or None where either run's misreads were not all kept.
    At one seed every evaluation draws sample i, of digit i // n_per_digit, from the same starting noise and
    the same noise at each step, so a shared index is a sample both networks got wrong from the same noise.
    By chance: were each run's misreads of a digit a random subset of that digit's n samples, the two would
    share sum over digits of a_d b_d / n."""
    ref = points[design_run_index(reference)]
    shared = []
    for row in points:
        cells = []
        for p, r in zip(row, ref):
            if p is None or r is None or p.misread is None or r.misread is None or p.samples != r.samples:
                cells.append(None)
                continue
            n = p.samples // 10
            per_digit = [[sum(i // n == d for i in s) for d in range(10)] for s in (p.misread, r.misread)]
            cells.append((len(p.misread), len(p.misread & r.misread), sum(a * b for a, b in zip(*per_digit)) / n))
        shared.append(cells)
    return shared


def cmd_study(args, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    utils.ensure_writable_dir(args.out)
    points = design_points(args.study_dir)
    shared = shared_misreads(points)
    rows = np.arange(len(DESIGN_RUNS))[::-1]  # the first run at the top
    legend_rows = 3  # empty rows below the last run, where the legends go, so that they cover no point
    fig, (acc, dist, wrong) = plt.subplots(1, 3, figsize=(8.4, 0.23 * (len(rows) + legend_rows) + 1.4), sharey=True,
                                           gridspec_kw={"width_ratios": [1.6, 1, 0.9]})
    reference, shipped = (rows[design_run_index(stem)] for stem in (REFERENCE_RUN, SHIPPED_RUN))
    for seed, (marker, offset) in enumerate((("o", 0.14), ("s", -0.14))):
        have = [(r, p[seed]) for r, p in zip(rows, points) if p[seed] is not None]
        y = np.array([r for r, _ in have]) + offset
        a = np.array([p.accuracy for _, p in have])
        se = 100 * np.sqrt(a / 100 * (1 - a / 100) / np.array([p.samples for _, p in have]))  # binomial standard error
        acc.errorbar(a, y, xerr=se, fmt=marker, ms=4, lw=0.8, capsize=0, color=f"C{seed}", label=f"sampling seed {seed}")
        dist.plot([p.frechet_ratio for _, p in have], y, marker, ms=4, color=f"C{seed}")
        counted = [(r, c[seed]) for r, c in zip(rows, shared) if c[seed] is not None]
        y = np.array([r for r, _ in counted]) + offset
        wrong.barh(y, [c[0] for _, c in counted], height=0.26, color=f"C{seed}", alpha=0.35, lw=0)
        also = [(r, c) for r, c in counted if r != reference]
        wrong.barh(np.array([r for r, _ in also]) + offset, [c[1] for _, c in also], height=0.26, color=f"C{seed}", lw=0)
    for ax in (acc, dist, wrong):
        ax.axhspan(reference - 0.45, reference + 0.45, color="0.88", zorder=0)
        ax.axhspan(shipped - 0.45, shipped + 0.45, color="#d5ecd0", zorder=0)
        ax.grid(axis="x", color="0.9", lw=0.6)
    acc.axvline(W0_TARGET, color="grey", ls=":", lw=1, label=f"target {W0_TARGET}%")
    real = {round(p.real_accuracy, 1) for row in points for p in row if p is not None}
    if len(real) == 1:  # every evaluation compared with the same real test digits
        real = real.pop()
        acc.axvline(real, color="k", ls="--", lw=1, label=f"real test digits {real:.1f}%")
    dist.axvline(1.0, color="k", ls="--", lw=1, label="floor (real\ntrain vs test)")
    dist.axvline(1.15, color="grey", ls=":", lw=1, label="target 1.15")
    acc.set_yticks(rows, [name for _, name in DESIGN_RUNS], fontsize=8.5)
    acc.set_ylim(-0.6 - legend_rows, len(rows) - 0.4)
    acc.set_xlabel("classified as asked (%),\nwith one standard error", fontsize=9)
    dist.margins(x=0.1)  # room for the markers at either end
    dist.set_xlabel("Frechet distance\nover its floor", fontsize=9)
    wrong.set_xlabel("misread, of 1,000\n(dark: also by\nthe reference)", fontsize=9)
    unkept = [r for r, row in zip(rows, shared) if row == [None, None]]
    if unkept:  # evaluations from before the misread samples were kept
        wrong.text(0.5, np.mean(unkept), "misread samples\nnot kept", transform=wrong.get_yaxis_transform(), ha="center",
                   va="center", fontsize=7.5, color="0.4")
    acc.legend(fontsize=7, loc="lower left")
    dist.legend(fontsize=7, loc="lower right")
    fig.suptitle("MNIST design study: each run's samples without guidance\n(100 per digit, DDPM 200 steps; "
                 "shaded: the reference, grey, and the shipped model, green)", fontsize=10)
    fig.tight_layout()
    utils.save_figure(fig, args.out)
    numbers = os.path.splitext(args.out)[0] + ".json"
    utils.save_json(numbers, {
        "reference": REFERENCE_RUN, "shipped": SHIPPED_RUN,
        "runs": [{"stem": stem, "name": name, "seeds": [
            None if p is None else {"seed": seed, "samples": p.samples, "accuracy_percent": p.accuracy,
                                    "frechet_over_floor": p.frechet_ratio,
                                    **({} if c is None else {"misread": c[0], "also_misread_by_reference": c[1],
                                                             "expected_shared_by_chance": c[2]})}
            for seed, (p, c) in enumerate(zip(row, shared_row))]}
            for (stem, name), row, shared_row in zip(DESIGN_RUNS, points, shared)]})
    print(f"wrote {args.out} and {numbers} ({len(DESIGN_RUNS)} runs from {args.study_dir})")


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------
digit = utils.number_type(int, lambda v: 0 <= v <= 9, "a digit 0-9")


_gamma = utils.number_type(float, lambda v: v > 0, "a positive number or 'off'")


def min_snr_gamma(text):
    """--min-snr: a positive number, or 'off' (None: the plain, unweighted loss)."""
    return None if text.lower() == "off" else _gamma(text)


def build_parser():
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=utils.ArgumentParser)

    def common(q, checkpoint=True):
        if checkpoint:
            q.add_argument("--checkpoint", default=DEFAULT_CKPT, help=f"diffusion checkpoint (default {DEFAULT_CKPT})")
            q.add_argument("--T", type=utils.positive_int, default=None, help="diffusion steps; if given, must match the checkpoint's T")
        utils.add_common_flags(q)
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    def test_digit_flags(q, what):
        """The flags inpaint and edit share: which test digit, toward which label, how many, where to."""
        q.add_argument("--index", type=int, required=True, help="which digit of the test split (0-9999)")
        q.add_argument("--label", type=digit, default=None, help="the digit to aim for (default: the test digit's own label)")
        q.add_argument("--n", type=utils.positive_int, default=8, help=f"number of {what} (default 8)")
        q.add_argument("--w", type=utils.guidance_strength, default=DEFAULT_W, help=f"guidance strength (default {DEFAULT_W})")
        q.add_argument("--data", default=DEFAULT_DATA, help=f"npz with the test digits (default {DEFAULT_DATA})")
        q.add_argument("--out", required=True, help="output .npy file")
        common(q)


    q = sub.add_parser("train", help="train the diffusion UNet", description="Train the class-conditional UNet on MNIST; "
                       "after every epoch the EMA checkpoint (--out) and a resume file (--out + .resume.pt) are written.")
    q.add_argument("--T", type=utils.positive_int, default=200, help="diffusion steps (default 200)")
    q.add_argument("--epochs", type=utils.positive_int, default=32, help="passes over the training images (default 32)")
    q.add_argument("--batch-size", type=utils.positive_int, default=64, help="images per step (default 64)")
    q.add_argument("--lr", type=utils.positive_float, default=2e-3, help="peak Adam learning rate, warm-up then cosine decay (default 2e-3)")
    q.add_argument("--p-uncond", type=utils.fraction, default=0.05, help="probability of dropping the label, for classifier-free guidance (default 0.05)")
    q.add_argument("--ema", type=utils.fraction, default=0.9998,
                   help="EMA decay of the weights used for sampling: 0.9998 averages over about the last 5,000 steps, "
                        "5 epochs (default 0.9998)")
    q.add_argument("--extra-ema", type=utils.fraction, nargs="+", default=[], metavar="DECAY",
                   help="further EMA decays kept during the same run, each written beside --out as "
                        "<name>_ema<DECAY>.pt, a checkpoint like --out's (compares averaging lengths for the cost "
                        "of one run; the snapshots use --ema's weights; default: none)")
    utils.add_precision_flag(q, "training")
    q.add_argument("--res-layers", type=utils.positive_int, nargs="+", default=[1], metavar="N",
                   help="residual layers in each block: one number for every block, or four for the blocks at 28, "
                        "14, 7 and 7 pixels, mirrored on the up path (default 1)")
    q.add_argument("--embedding", choices=["bias", "scale-shift"], default="scale-shift",
                   help="how the step-and-class embedding enters each residual layer: an added bias, or a scale "
                        "and shift of the normalised features (default scale-shift)")
    q.add_argument("--embedding-layers", type=utils.positive_int, default=2, metavar="N",
                   help="linear layers, each followed by SiLU, that turn the step and the class into that embedding: "
                        "1 adds a projection of each; every further layer mixes the two once more (default 2)")
    q.add_argument("--embedding-token", action="store_true",
                   help="also give every attention layer the embedding as one more key and value, which each pixel "
                        "attends to as much as its query asks (default: the embedding enters the residual layers only)")
    q.add_argument("--min-snr", type=min_snr_gamma, default=1.0, metavar="GAMMA",
                   help="weight each example's loss by min(SNR, GAMMA) / SNR, which lowers the weight of the "
                        "nearly clean steps (Min-SNR weighting; default 1; 'off' for the plain loss)")
    q.add_argument("--min-snr-mode", choices=["weight", "sample"], default="weight",
                   help="how the Min-SNR weight is applied: 'weight' draws t uniformly and weights each "
                        "example's loss; 'sample' draws t in proportion to the weight, unweighted (the same "
                        "expected loss, with few examples spent on nearly ignored steps; no effect with --min-snr off; "
                        "default weight)")
    q.add_argument("--prediction", choices=["eps", "v"], default="eps",
                   help="what the network predicts: the noise eps, or v = sqrt(abar) eps - sqrt(1 - abar) x_0, "
                        "whose loss weighs the clean image's error at least as much as at every step, the noisiest "
                        "included (with --min-snr GAMMA the weight of the image error is min(1 + SNR, GAMMA)); "
                        "default eps")
    q.add_argument("--model-guidance", type=utils.fraction, default=0.2, metavar="M",
                   help="model guidance: train each labelled example toward eps + M (eps(x_t, y) - eps(x_t, none)), "
                        "the network's own two predictions held fixed, so that it learns the guided prediction of "
                        "w = M / (1 - M) and draws like that without guidance, at one pass per step (one more "
                        "forward pass per batch in training; 0 trains the plain target; default 0.2, which learns w = 0.25)")
    q.add_argument("--dropout", type=utils.fraction, default=0.0, metavar="P",
                   help="in training only, the probability of zeroing each activation (channel and pixel) entering the "
                        "second conv of every residual layer; the kept ones are scaled by 1 / (1 - P), the masks "
                        "come from the generator --seed seeds, and the training loss printed includes them "
                        "(default 0: no dropout)")
    q.add_argument("--channels", type=utils.positive_int, nargs=4, default=[16, 32, 64, 64], metavar="C",
                   help="features of the four blocks, multiples of 8 (default 16 32 64 64)")
    q.add_argument("--data", default=DEFAULT_DATA, help=f"npz with x_train, y_train, x_test, y_test (default {DEFAULT_DATA})")
    q.add_argument("--limit", type=utils.positive_int, default=None, help="train on the first N images only (for quick trials)")
    q.add_argument("--out", default=DEFAULT_CKPT, help=f"checkpoint path (default {DEFAULT_CKPT})")
    q.add_argument("--resume", action="store_true", help="continue from <out>.resume.pt with the same settings")
    common(q, checkpoint=False)

    q = sub.add_parser("classifier", help="train the MNIST classifier used by evaluate",
                       description="Train a small CNN classifier on the MNIST training split (for evaluate), "
                                   "each image randomly turned (up to 10 degrees), scaled (up to 10%) and moved "
                                   "(about 2 pixels) at every step; the test accuracy is printed and stored.")
    q.add_argument("--epochs", type=utils.positive_int, default=20, help="passes over the training images (default 20)")
    utils.add_precision_flag(q, "training")
    q.add_argument("--data", default=DEFAULT_DATA, help=f"npz with the MNIST arrays (default {DEFAULT_DATA})")
    q.add_argument("--limit", type=utils.positive_int, default=None, help="train on the first N images only (for quick trials)")
    q.add_argument("--out", default=DEFAULT_CLASSIFIER, help=f"classifier path (default {DEFAULT_CLASSIFIER})")
    common(q, checkpoint=False)

    q = sub.add_parser("sample", help="save samples of one digit as a .npy array",
                       description="Save float32 (N, 28, 28) samples in [0, 1] (ink = 1) of one digit.")
    q.add_argument("--label", type=digit, required=True, help="the digit to draw, 0-9")
    q.add_argument("--n", type=utils.positive_int, default=16, help="number of samples (default 16)")
    q.add_argument("--w", type=utils.guidance_strength, default=DEFAULT_W,
                   help=f"classifier-free guidance strength: 0 the conditional model as trained (a model trained with "
                        f"--model-guidance M is already guided at M / (1 - M) there; the shipped one at 0.25, which "
                        f"-0.2 undoes), larger is more typical and less varied, -1 unconditional (default {DEFAULT_W:g})")
    q.add_argument("--out", required=True, help="output .npy file")
    utils.add_sampler_flags(q)
    add_guided_steps_flag(q)
    add_clip_flag(q)
    common(q)

    q = sub.add_parser("grid", help="draw the 10 x 10 grid and the guidance comparison",
                       description="figures/mnist_grid.png: 10 samples of each digit, one digit per row, at --w; "
                                   "figures/mnist_grid_w.png: the same starting noise at each of --ws.")
    q.add_argument("--w", type=utils.guidance_strength, default=DEFAULT_W, help=f"guidance strength of the main grid (default {DEFAULT_W})")
    q.add_argument("--ws", type=utils.guidance_strength, nargs="+", default=[0.0, 1.0, 3.0, 6.0], help="guidance strengths to compare (default 0 1 3 6)")
    q.add_argument("--out", default=os.path.join("figures", "mnist_grid.png"), help="main grid file; the comparison goes beside it with _w added")
    common(q)

    q = sub.add_parser("inpaint", help="complete a test digit with part of it removed",
                       description="Save float32 (N, 28, 28) in [0, 1]: test digit --index with the --mask region "
                                   "removed, filled in N times by the model toward --label (replacement: after every "
                                   "step the kept pixels are set to a noised copy of the original). Pixels outside "
                                   "the mask equal the original.")
    q.add_argument("--mask", choices=MASKS, required=True, help="the part removed: a half (top, bottom, left, right) "
                                                                "or the central 14 x 14 square (centre)")
    test_digit_flags(q, "completions")

    q = sub.add_parser("edit", help="SDEdit: noise a test digit part way and denoise it, possibly toward another digit",
                       description="Save float32 (N, 28, 28) in [0, 1]: test digit --index noised to step --t0 and "
                                   "denoised N times toward --label. Small t0 keeps the image, t0 = T ignores it.")
    q.add_argument("--t0", type=utils.positive_int, required=True, help="the step to noise to, 1 to T")
    test_digit_flags(q, "edits")

    q = sub.add_parser("prior", help="inpainting and SDEdit figures and numbers",
                       description="figures/mnist_inpaint.png and mnist_edit.png with their JSON: the first test digit "
                                   "of each label completed after each mask and edited by SDEdit at several t0, toward "
                                   "its own label and toward another ((label + 5) mod 10), and how often the "
                                   "classifier reads the requested digit.")
    q.add_argument("--n", type=utils.positive_int, default=4, help="completions per digit, mask and target (default 4)")
    q.add_argument("--w", type=utils.guidance_strength, default=DEFAULT_W, help=f"guidance strength (default {DEFAULT_W})")
    q.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help=f"classifier checkpoint (default {DEFAULT_CLASSIFIER})")
    q.add_argument("--data", default=DEFAULT_DATA, help=f"npz with the test digits (default {DEFAULT_DATA})")
    q.add_argument("--out", default=os.path.join("figures", "mnist_inpaint.png"), help="the inpainting figure; the SDEdit one goes beside it")
    common(q)

    q = sub.add_parser("progress", help="how samples improve during training (from the checkpoint's snapshots)",
                       description="figures/mnist_training.png: the digits 0-9 drawn from the same noise (w = 0, "
                                   f"{SNAPSHOT_STEPS} DDIM steps) after epochs 1, 2, 4, 8, ... and the last, as stored "
                                   "in the checkpoint by train; nothing is sampled here.")
    q.add_argument("--out", default=os.path.join("figures", "mnist_training.png"), help="the figure to write")
    common(q)

    q = sub.add_parser("animate", help="a GIF of one sample of each digit forming from noise",
                       description="figures/mnist_forming.gif: x_t and the predicted clean image for digits 0-9, "
                                   "every 4 steps from t = T to 0.")
    q.add_argument("--w", type=utils.guidance_strength, default=DEFAULT_W, help=f"guidance strength (default {DEFAULT_W})")
    q.add_argument("--out", default=os.path.join("figures", "mnist_forming.gif"), help="the GIF to write")
    common(q)

    q = sub.add_parser("trajectory", help="draw one sample from noise to digit and measure how digits form",
                       description="figures/mnist_trajectory.png: x_t and the predicted clean image at t = T, ..., 0; "
                                   "figures/mnist_formation.png and .json: when each pixel settles, over --n samples.")
    q.add_argument("--label", type=digit, default=3, help="digit of the shown trajectory (default 3)")
    q.add_argument("--w", type=utils.guidance_strength, default=DEFAULT_W, help=f"guidance strength (default {DEFAULT_W})")
    q.add_argument("--n", type=utils.positive_int, default=100, help="samples for the formation statistics (default 100)")
    q.add_argument("--out", default=os.path.join("figures", "mnist_trajectory.png"), help="trajectory figure; the formation figure and JSON go beside it")
    common(q)

    q = sub.add_parser("study", help="the design study's runs side by side, from their saved evaluations",
                       description="figures/mnist_study.png: for every run of the design study (DESIGN_RUNS in this "
                                   "file), the share of samples classified as asked and the Frechet distance over its "
                                   "floor without guidance, at both sampling seeds, and how many of its misread "
                                   "samples the shipped model misreads too (from the same noise), from the JSON files "
                                   "that evaluate wrote into --study-dir; the counts go to a JSON file beside the "
                                   "figure. Nothing is sampled here.")
    q.add_argument("--study-dir", default=os.path.join("figures", "mnist_study"),
                   help="folder of the runs' <stem>_eval.json and <stem>_eval_seed1.json (default figures/mnist_study)")
    q.add_argument("--out", default=os.path.join("figures", "mnist_study.png"), help="the figure to write (PNG; the counts go beside it as .json)")
    q.add_argument("--quiet", action="store_true", help="print only the files written, not the settings first")
    q.set_defaults(device="cpu")

    q = sub.add_parser("heldout", help="the noise loss on test digits against training digits",
                       description="Does the model know its training digits better than digits in general? The "
                                   "noise-prediction loss of --n of the training digits the run saw, drawn at random, "
                                   "and of the first --n test digits, labels always kept, each noised once: example i "
                                   "of both sets at the same step with the same noise (--seed chooses the digits, the "
                                   "steps and the noise). Plain, and weighted as the run was trained (Min-SNR), over "
                                   "all steps and over the noisy half of the chain (paper steps T/2 + 1 to T; with "
                                   "gamma <= 1 every weight there is 1, so the two agree). A ratio test / train near 1 "
                                   "means the model does as well on digits it never saw.")
    q.add_argument("--n", type=utils.positive_int, default=10000,
                   help="digits of each split, at most the split's size (default 10000, all the test digits)")
    q.add_argument("--data", default=DEFAULT_DATA, help=f"npz with the MNIST arrays (default {DEFAULT_DATA})")
    q.add_argument("--out", default=None, help="also save the numbers here (JSON)")
    common(q)
    q = sub.add_parser("evaluate", help="accuracy, Frechet distance and diversity of the samples",
                       description="For --n samples of each digit at each --ws: share classified as the requested digit, "
                                   "Frechet distance to real test digits in the classifier's feature space (beside the "
                                   "real-train vs real-test floor), and within-class diversity; saved as JSON.")
    q.add_argument("--ws", type=utils.guidance_strength, nargs="+", default=[0.0, DEFAULT_W],
                   help=f"guidance strengths; with 200 DDPM steps each costs about 5 (w = 0) or 10 minutes on 2 CPU cores, "
                        f"with 50 DDIM steps 1 or 2 minutes (default 0 {DEFAULT_W:g})")
    q.add_argument("--n", type=utils.positive_int, default=100, help="samples per digit (default 100)")
    q.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help=f"classifier checkpoint (default {DEFAULT_CLASSIFIER})")
    q.add_argument("--data", default=DEFAULT_DATA, help=f"npz with the real digits (default {DEFAULT_DATA})")
    q.add_argument("--out", default=os.path.join("figures", "mnist_eval.json"),
                   help="where the results go (JSON; the figure goes beside it as .png, the misread samples as "
                        "<name>_misread.png). Settings already in this file from the same model, n, seed, guided steps, "
                        "clipping and classifier are kept, not sampled again, unless they were saved without their "
                        "misread samples")
    q.add_argument("--replot", action="store_true", help="only redraw the figure from the results already in --out")
    common(q)
    utils.add_sampler_flags(q)
    add_guided_steps_flag(q)
    add_clip_flag(q)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "train" and any(c % 8 for c in args.channels):
        p.error(f"--channels {' '.join(map(str, args.channels))}: each must be a multiple of 8 (GroupNorm groups)")
    if args.command == "evaluate" and args.n < 2:
        p.error("--n must be at least 2 (diversity compares pairs of samples)")
    if args.command == "heldout" and args.n < 2:
        p.error("--n must be at least 2 (a standard error needs two pairs)")
    if args.command in ("grid", "trajectory") and os.path.splitext(args.out)[1] not in (".png", ".pdf", ".svg"):
        p.error(f"--out {args.out}: the figure must end in .png, .pdf or .svg")
    if args.command in ("evaluate", "heldout") and args.out is not None and not args.out.endswith(".json"):
        p.error(f"--out {args.out}: the results file must end in .json")
    if getattr(args, "eta", 0) and args.sampler != "ddim":
        p.error("--eta applies to --sampler ddim only")
    return args


def main():
    args = parse_args()
    device = utils.pick_device(args.device)
    if not args.quiet:
        print("settings:", vars(args), "device:", device, flush=True)
    COMMANDS[args.command](args, device)


COMMANDS = {"train": cmd_train, "classifier": cmd_classifier, "sample": cmd_sample, "grid": cmd_grid,
            "trajectory": cmd_trajectory, "evaluate": cmd_evaluate, "animate": cmd_animate, "progress": cmd_progress,
            "inpaint": cmd_inpaint, "edit": cmd_edit, "prior": cmd_prior, "study": cmd_study,
            "heldout": cmd_heldout}

if __name__ == "__main__":
    utils.run_main(main)
