"""Train the two-pixel conditional DDPM: `python train.py --T 50` writes checkpoints/twopixel_T50.pt.

Training data are drawn fresh from the ground-truth mixture at every step (the data
distribution is known exactly, so there is no fixed training set to overfit). The
checkpoint holds the EMA weights, the model config, T, the schedule and the training
record; a separate resume file (not shipped) holds what `--resume` needs.
"""
import os
import time

import torch
from tqdm import tqdm

import ddpm
import utils
from gmm import TwoPixelGMM

KIND = "twopixel"
VAL_SIZE = 20_000
VAL_SEED = 1234  # the validation set is the same for every run, so losses compare across runs


def default_checkpoint(T, folder="checkpoints"):
    return os.path.join(folder, f"twopixel_T{T}.pt")


def build_parser():
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("diffusion")
    g.add_argument("--T", type=utils.positive_int, nargs="+", default=[50],
                   help="number of diffusion steps; several values train several models, e.g. --T 5 10 25 50 (default 50)")
    g.add_argument("--schedule", choices=utils.SCHEDULES, default="cosine", help="noise schedule (default cosine)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=utils.positive_int, default=2500, help="optimiser steps per model (default 2500; fewer leave the T = 50 model measurably short of the oracle)")
    g.add_argument("--batch-size", type=utils.positive_int, default=1024, help="fresh ground-truth samples per step (default 1024)")
    g.add_argument("--lr", type=utils.positive_float, default=3e-3, help="peak learning rate of Adam, reached after a short warm-up and decayed to 0 on a cosine (default 3e-3)")
    g.add_argument("--loss", choices=utils.LOSSES, default="l2", help="distance between true and predicted noise (default l2)")
    g.add_argument("--p-uncond", type=utils.fraction, default=0.1, help="probability of replacing a label by 'no label' during training, for classifier-free guidance (default 0.1)")
    g.add_argument("--ema", type=utils.fraction, default=0.995, help="decay of the exponential moving average of the weights used for sampling (default 0.995)")
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=utils.positive_int, nargs=2, default=[64, 128], metavar=("C1", "C2"),
                   help="features of encoding blocks 1 and 2; C1 a multiple of 4, C2 of 32 (GroupNorm groups) (default 64 128)")
    g.add_argument("--fourier-scale", type=utils.positive_float, default=4.0, help="std of the Gaussian Fourier frequencies of the step embedding (default 4)")
    g = p.add_argument_group("files and run")
    g.add_argument("--checkpoint-dir", default="checkpoints", help="folder for the checkpoints twopixel_T{T}.pt (default checkpoints)")
    g.add_argument("--out", default=None, help="checkpoint path instead of <checkpoint-dir>/twopixel_T{T}.pt (only with a single --T)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its resume file (<out>.resume.pt)")
    g.add_argument("--log-every", type=utils.positive_int, default=100, help="steps between validation-loss records and resume-file saves (default 100)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    utils.add_common_flags(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.out is not None and len(args.T) > 1:
        p.error("--out names one file, so it needs a single --T")
    c1, c2 = args.channels
    if c1 % 4 or c2 % 32:
        p.error(f"--channels {c1} {c2}: C1 must be a multiple of 4 and C2 of 32")
    return args


def validation_set(diffusion, gmm):
    """A fixed set of (x_t, t, y, noise) for comparing runs, and the oracle's loss on it (the floor)."""
    gen = utils.make_generator(VAL_SEED)
    x_0, y = gmm.sample(VAL_SIZE, gen)
    x_0 = x_0[:, None]
    t = torch.randint(0, diffusion.T, (VAL_SIZE,), generator=gen)
    noise = torch.randn(x_0.shape, generator=gen)
    x_t = diffusion.q_sample(x_0, t, noise)
    floor = utils.noise_loss(gmm.oracle(diffusion.alphas_cumprod)(x_t, t, y), noise).item()
    return (x_t, t, y, noise), floor


@torch.no_grad()
def validation_loss(model, val):
    x_t, t, y, noise = val
    return utils.noise_loss(model(x_t, t, y), noise).item()


def train_one(T, args, device):
    out = args.out or default_checkpoint(T, args.checkpoint_dir)
    resume_path = out + ".resume.pt"
    utils.ensure_writable_dir(out)
    gmm = TwoPixelGMM()
    diffusion = utils.Diffusion(T, args.schedule)
    config = ddpm.TwoPixelUNetConfig(T=T, channels=tuple(args.channels), fourier_scale=args.fourier_scale)

    # Build model, EMA and optimiser from the seed, or restore them from the resume file.
    torch.manual_seed(args.seed)  # initial weights and Fourier frequencies
    model = ddpm.TwoPixelUNet(config, diffusion.alphas_cumprod).to(device)
    ema = utils.make_ema(model, args.ema)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    data_gen = utils.make_generator(args.seed)  # ground-truth draws, on the CPU
    gen = utils.make_generator(args.seed + 1, device)  # steps, noise and label dropout, on the device
    run = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "loss": args.loss, "p_uncond": args.p_uncond, "ema_decay": args.ema, "device": str(device),
           "schedule": args.schedule, "T": T}
    record = {"step": [], "loss": [], "val_loss": []}
    step, seconds, losses = 0, 0.0, []
    if args.resume:
        state = utils.load_checkpoint(resume_path, KIND + "-resume", f"python train.py --T {T} --out {out}")
        if state["run"] != run or state["model_config"] != ddpm.config_to_dict(config):
            raise utils.UserError(f"{resume_path} was made with other settings; resume with the same flags or rerun without --resume")
        utils.restore_training_state(state, model, ema, optimizer, data=data_gen, noise=gen)
        step, seconds, record, losses = state["step"], state["seconds"], state["record"], state["losses"]

    val, floor = validation_set(diffusion, gmm)
    val = tuple(v.to(device) for v in val)

    def snapshot():
        return {"kind": KIND + "-resume", "model_config": ddpm.config_to_dict(config), "run": run,
                **utils.training_state(model, ema, optimizer, data=data_gen, noise=gen),
                "step": step, "seconds": seconds, "record": record, "losses": losses}

    bar = tqdm(total=args.steps, initial=step, desc=f"T={T}", unit="step", disable=args.quiet)
    start = time.perf_counter() - seconds
    with utils.StopOnInterrupt() as interrupt:
        while step < args.steps and not interrupt.requested:
            # 1. a fresh batch from the ground truth, 2. one optimiser step with label dropout
            x_0, y = gmm.sample(args.batch_size, data_gen)
            lr = utils.cosine_lr(step, args.steps, args.lr, warmup=min(100, args.steps // 10 + 1))
            loss = utils.train_step(model, ema, optimizer, diffusion, x_0[:, None].to(device), y.to(device),
                                    gen, lr, args.p_uncond, args.loss)
            losses.append(loss)
            step += 1
            bar.update(1)
            # 3. every log_every steps: record losses and refresh the resume file
            if step % args.log_every == 0 or step == args.steps:
                seconds = time.perf_counter() - start
                record["step"].append(step)
                record["loss"].append(sum(losses) / len(losses))
                record["val_loss"].append(validation_loss(ema.module, val))
                losses = []
                bar.set_postfix(loss=f"{record['loss'][-1]:.4f}", val=f"{record['val_loss'][-1]:.4f}", floor=f"{floor:.4f}")
                if step < args.steps:
                    utils.save_checkpoint(resume_path, snapshot())
    bar.close()
    seconds = time.perf_counter() - start
    if step < args.steps:  # Ctrl-C: the step in flight was finished; keep everything up to it
        utils.save_checkpoint(resume_path, snapshot())
        raise utils.UserError(f"interrupted at step {step}/{args.steps}; continue with "
                              f"`python train.py --T {T} --out {out} --resume`")

    ckpt = {
        "kind": KIND, "T": T, "schedule": args.schedule,
        "model_config": ddpm.config_to_dict(config),
        "model": ema.module.state_dict(),
        "train": {**run, "seconds": round(seconds, 2), "final_loss": record["loss"][-1],
                  "val_loss": record["val_loss"][-1], "oracle_val_loss": floor, "record": record},
    }
    utils.save_checkpoint(out, ckpt)
    if os.path.exists(resume_path):
        os.remove(resume_path)
    print(f"T={T}: wrote {out} in {seconds:.1f} s; validation loss {record['val_loss'][-1]:.4f} "
          f"(oracle floor {floor:.4f})")
    return out


def load_model(path, T=None, device="cpu", schedule=None):
    """Load a two-pixel checkpoint: (EMA model in eval mode, Diffusion, checkpoint dict).

    T and schedule, when given, must match the checkpoint's.
    """
    make = (f"python train.py --T {T or 50}" + ("" if schedule is None else f" --schedule {schedule}")
            + ("" if path == default_checkpoint(T or 50) else f" --out {path}"))
    ckpt = utils.load_checkpoint(path, KIND, make)
    if T is not None and ckpt["T"] != T:
        raise utils.UserError(f"{path} was trained with T={ckpt['T']}, not --T {T}; "
                              f"pass --T {ckpt['T']} or another checkpoint")
    if schedule is not None and ckpt["schedule"] != schedule:
        raise utils.UserError(f"{path} uses the {ckpt['schedule']} schedule, not {schedule}")
    with utils.checkpoint_format(path):
        diffusion = utils.Diffusion(ckpt["T"], ckpt["schedule"])
        model = ddpm.build_model(ckpt["model_config"], diffusion.alphas_cumprod)
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), diffusion, ckpt


def main():
    args = parse_args()
    device = utils.pick_device(args.device)
    print("settings:", {k: v for k, v in vars(args).items()}, "device:", device)
    for T in args.T:
        train_one(T, args, device)


if __name__ == "__main__":
    utils.run_main(main)
