"""Measure cost and quality on this machine; print a table and save it as figures/benchmark.json.

    python benchmark.py              # everything (about 10 minutes on 2 CPU cores)
    python benchmark.py --skip-train --skip-mnist   # only two-pixel quality and sampling time

Two-pixel, for T = 5, 10, 25, 50:
  - seconds to train with train.py's defaults (into a scratch directory; same seed, so the
    same weights as the shipped checkpoint),
  - energy distance to 5000 fresh ground-truth points of 5000 samples from the shipped
    checkpoint and of 5000 from the same sampler driven by the exact oracle, over several
    seeds, with their ratio (target <= 1.5) and the share of samples nearest class 1,
  - the share of conditional samples (--label y, w = 0) nearest their own class (target >= 99%),
  - seconds to draw 5000 samples at T = 50 (best of 5; target <= 0.5 s).
MNIST: seconds per training epoch (timed on 100 batches) and seconds to sample the
100-digit grid at T = 200 with guidance (target <= 60 s).
"""
import os
import statistics
import tempfile
import time

import torch

import train
import utils
import visualize
from gmm import TwoPixelGMM


def build_parser():
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=utils.positive_int, default=3, help="sampling seeds averaged for the quality numbers (default 3)")
    p.add_argument("--skip-train", action="store_true", help="do not time two-pixel training")
    p.add_argument("--skip-mnist", action="store_true", help="do not time MNIST training and sampling")
    p.add_argument("--out", default=os.path.join("figures", "benchmark.json"), help="where the table goes (default figures/benchmark.json)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device to measure (default cpu)")
    return p


def time_training(T, device):
    with tempfile.TemporaryDirectory() as tmp:
        args = train.parse_args(["--T", str(T), "--quiet", "--out", os.path.join(tmp, "m.pt")])
        start = time.perf_counter()
        train.train_one(T, args, device)
        return time.perf_counter() - start


def two_pixel(args, device):
    gmm = TwoPixelGMM()
    rows = []
    for T in visualize.SWEEP_T:
        model, diffusion, ckpt = train.load_model(train.default_checkpoint(T), T, device)
        runs = [visualize.sample_quality(model, diffusion, seed, 5000, device)[0] for seed in range(args.seeds)]
        row = {"T": T}
        for key in ("energy_distance_learned", "energy_distance_oracle", "energy_distance_floor",
                    "class1_share_learned", "class1_share_oracle"):
            row[key] = statistics.mean(r[key] for r in runs)
        row["ratio_learned_to_oracle"] = row["energy_distance_learned"] / row["energy_distance_oracle"]
        row["ratio_per_seed"] = [r["ratio_learned_to_oracle"] for r in runs]
        for label in (0, 1):
            x = visualize.draw_samples(model, diffusion, 5000, 0, label, 0.0, device)
            row[f"own_class_share_label{label}"] = (gmm.nearest_class(x) == label).float().mean().item()
        row["val_loss"], row["oracle_val_loss"] = ckpt["train"]["val_loss"], ckpt["train"]["oracle_val_loss"]
        row["train_seconds"] = None if args.skip_train else time_training(T, device)
        rows.append(row)
    model, diffusion, _ = train.load_model(train.default_checkpoint(50), 50, device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        visualize.draw_samples(model, diffusion, 5000, 0, device=device)
        times.append(time.perf_counter() - start)
    return rows, min(times)


def mnist(device):
    import mnist_ddpm
    model, diffusion, ckpt = mnist_ddpm.load_unet(mnist_ddpm.DEFAULT_CKPT, None, device)
    # training throughput of the shipped configuration, on 100 batches of real digits, in the
    # precision the shipped model was trained in and in the other one
    images, labels = mnist_ddpm.load_mnist(mnist_ddpm.DEFAULT_DATA, "train")
    batch = ckpt["train"]["batch_size"]
    epoch_seconds = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = mnist_ddpm.build_unet(ckpt["model_config"]).to(device)
        ema = utils.make_ema(net, 0.999)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        gen = utils.make_generator(0, device)
        start = time.perf_counter()
        for i in range(100):
            x = mnist_ddpm.to_model(images[i * batch:(i + 1) * batch]).to(device)
            utils.train_step(net, ema, opt, diffusion, x, labels[i * batch:(i + 1) * batch].to(device), gen, 1e-4,
                             bf16=precision == "bf16")
        epoch_seconds[precision] = (time.perf_counter() - start) / 100 * len(images) / batch
    precision = ckpt["train"].get("precision", "fp32")
    start = time.perf_counter()
    mnist_ddpm.draw(model, diffusion, torch.arange(10).repeat_interleave(10), mnist_ddpm.DEFAULT_W, 0, device)
    grid_seconds = time.perf_counter() - start
    # the cost of attention: the same network with 7 x 7 windows (shipped) and with full attention
    attention = {}
    for window in (7, 28):
        config = dict(ckpt["model_config"], attn_window=window)
        net = mnist_ddpm.build_unet(config).to(device)
        x = mnist_ddpm.to_model(images[:batch]).to(device)
        t = torch.randint(0, diffusion.T, (batch,), generator=utils.make_generator(0)).to(device)
        times = []
        for _ in range(6):
            start = time.perf_counter()
            net(x, t, labels[:batch].to(device)).square().mean().backward()
            times.append(time.perf_counter() - start)
        attention[f"window_{window}_seconds_per_batch"] = min(times[1:])
    return {"epoch_seconds_measured": epoch_seconds[precision], "precision": precision,
            "epoch_seconds_fp32": epoch_seconds["fp32"], "epoch_seconds_bf16": epoch_seconds["bf16"],
            "epochs_trained": ckpt["train"]["epochs_done"],
            "train_seconds_recorded": ckpt["train"]["seconds"], "grid_seconds_T200_guided": grid_seconds,
            "T": diffusion.T, "w": mnist_ddpm.DEFAULT_W, "batch_size": batch, **attention}


def main():
    args = build_parser().parse_args()
    device = utils.pick_device(args.device)
    utils.ensure_writable_dir(args.out)
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    rows, sample_seconds = two_pixel(args, device)
    result["two_pixel"] = rows
    result["two_pixel_sample_seconds_T50_n5000"] = sample_seconds
    print(f"\n{'T':>3} {'train s':>8} {'ED learned':>11} {'ED oracle':>10} {'ratio':>6} {'class1 l/o':>12} "
          f"{'own class y=0/1':>16} {'val loss / floor':>17}")
    for r in rows:
        train_s = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}"
        print(f"{r['T']:>3} {train_s:>8} {r['energy_distance_learned']:>11.5f} {r['energy_distance_oracle']:>10.5f} "
              f"{r['ratio_learned_to_oracle']:>6.2f} {r['class1_share_learned']:>5.3f}/{r['class1_share_oracle']:.3f} "
              f"{r['own_class_share_label0']:>7.4f}/{r['own_class_share_label1']:.4f} "
              f"{r['val_loss']:>8.4f}/{r['oracle_val_loss']:.4f}")
    print(f"floor (two ground-truth samples): {rows[0]['energy_distance_floor']:.5f}")
    print(f"5000 samples at T=50: {sample_seconds:.2f} s")
    if not args.skip_mnist:
        result["mnist"] = mnist(device)
        m = result["mnist"]
        print(f"MNIST: {m['epoch_seconds_fp32']:.0f} s per epoch in fp32, {m['epoch_seconds_bf16']:.0f} s in bf16 "
              f"(the shipped model: {m['precision']}); 100-digit grid at T={m['T']} with w={m['w']:g}: "
              f"{m['grid_seconds_T200_guided']:.1f} s")
        print(f"MNIST forward + backward on a batch of {m['batch_size']}: {m['window_7_seconds_per_batch']:.3f} s with "
              f"7 x 7 attention windows, {m['window_28_seconds_per_batch']:.3f} s with full 28 x 28 attention")
    utils.save_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    utils.run_main(main)
