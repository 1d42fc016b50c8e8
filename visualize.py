"""Sample from the shipped two-pixel checkpoints and draw the figures.

    python visualize.py --task samples --T 50 --n 5000 --seed 0 --out samples.npy
"""
import os

import numpy as np
import torch

import train
import utils

TASKS = ("samples",)


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True, help="what to make: samples saves an (n, 2) float32 array of pixel values")
    g = p.add_argument_group("sampling (--task samples)")
    g.add_argument("--T", type=utils.positive_int, default=50, help="diffusion steps of the model; picks checkpoints/twopixel_T{T}.pt (default 50)")
    g.add_argument("--checkpoint", default=None, help="another checkpoint to sample from; its T must match --T")
    g.add_argument("--n", type=utils.positive_int, default=5000, help="number of samples (default 5000)")
    g.add_argument("--label", type=int, choices=(0, 1), default=None,
                   help="class to sample: 0 = left pixel darker, 1 = left pixel lighter (default: no label, the whole mixture)")
    g.add_argument("--w", type=utils.guidance_strength, default=0.0,
                   help="classifier-free guidance strength with --label: 0 plain conditional, >0 pushes harder toward the class, "
                        "-1 ignores the label (unconditional); values below -1 are refused (default 0)")
    g.add_argument("--out", default=None, help="where --task samples writes its .npy file")
    utils.add_common_flags(p)
    args = p.parse_args(argv)
    if args.task == "samples" and args.out is None:
        p.error("--task samples needs --out FILE.npy")
    return args


def draw_samples(model, diffusion, n, seed, label=None, w=0.0, device="cpu"):
    """n samples (n, 2) float32 in pixel units. The starting noise x_T and every z come from
    one generator seeded with `seed`, so the same arguments give the same samples."""
    gen = utils.make_generator(seed, device)
    x_T = torch.randn(n, 1, 2, generator=gen, device=device)
    y = None if label is None else torch.full((n,), label, dtype=torch.int64, device=device)
    x_0 = diffusion.p_sample_loop(model, x_T, y, w, gen)
    return x_0.reshape(n, 2).float().cpu()


def save_npy(path, array):
    """Save an array atomically (never a half-written file)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    utils.atomic_write(path, write)


def task_samples(args, device):
    if not args.out.endswith(".npy"):
        raise utils.UserError(f"--out {args.out}: the samples file must end in .npy")
    utils.ensure_writable_dir(args.out)
    path = args.checkpoint or train.default_checkpoint(args.T)
    model, diffusion, _ = train.load_model(path, args.T, device)
    x = draw_samples(model, diffusion, args.n, args.seed, args.label, args.w, device)
    save_npy(args.out, x.numpy().astype(np.float32))
    print(f"wrote {args.out}: {args.n} samples from {path}")


def main():
    args = parse_args()
    device = utils.pick_device(args.device)
    {"samples": task_samples}[args.task](args, device)


if __name__ == "__main__":
    utils.run_main(main)
