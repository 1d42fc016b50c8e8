"""Measure cost and quality on this machine; print a table and save it as figures/benchmark.json.

    python benchmark.py              # everything (about 12 minutes on 2 CPU cores)
    python benchmark.py --skip-train --skip-mnist   # only two-pixel quality and sampling time

First the machine: CPU model, torch's CPU capability, whether bfloat16 is native (and so what
--precision auto picks), threads. Timings differ between machines and from hour to hour, so
compare the numbers of one run with each other (ratios), not with another run's.
Two-pixel, for T = 5, 10, 25, 50:
  - seconds to train with train.py's defaults (into a scratch directory; same seed, so the
    same weights as the shipped checkpoint; target <= 30 s),
  - energy distance to 5000 fresh ground-truth points of 5000 samples from the shipped
    checkpoint and of 5000 from the same sampler driven by the exact oracle, over several
    seeds, with their ratio (target <= 1.2) and the share of samples nearest class 1,
  - the share of conditional samples (--label y, w = 0) nearest their own class (target >= 99%),
  - seconds to draw 5000 samples at T = 50 (best of 5; target <= 0.5 s).
MNIST, side by side in float32 and bfloat16: seconds per training epoch of the shipped recipe
and of the same network on the plain target (timed on 100 batches each), seconds to sample
the 100-digit grid at T = 200 at the default w and, in float32, with guidance (target <= 60 s
in float32), one guided sampling step run in several ways taking turns (in chunks of several
sizes, channels-last, with the attention windows all at once instead of in groups, as a
frozen TorchScript graph, and with --compile through
torch.compile), ten inpaintings and ten SDEdits of a test digit, the cost of full attention,
and seconds per epoch and per guided sampling step of each design-study configuration.
"""
import copy
import functools
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
    p.add_argument("--mnist-checkpoint", default=os.path.join("checkpoints", "mnist_T200.pt"),
                   help="MNIST checkpoint whose network is timed (default checkpoints/mnist_T200.pt); "
                        "only its configuration matters for the times")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile on a guided MNIST step, and its compile time (needs a C++ compiler)")
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


def machine(device):
    """What the timings depend on: the CPU, its vector instructions, bfloat16 support, threads."""
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    native, why = utils.native_bf16(device)
    return {"device": str(device), "cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native, "native_bf16_reason": why, "auto_precision": utils.resolve_precision("auto", device)[0],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def seconds_per_batch(config, diffusion, images, labels, batch, precision, device, n=30, model_guidance=0.0):
    """Mean seconds of a training step (forward, backward, Adam, EMA) over n batches of real
    digits, after two warm-up steps; with model_guidance, the extra unconditional forward pass too."""
    import mnist_ddpm
    torch.manual_seed(0)
    net = mnist_ddpm.build_unet(config).to(device)
    ema = utils.make_ema(net, 0.999)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    gen = utils.make_generator(0, device)
    for i in range(n + 2):
        if i == 2:
            start = time.perf_counter()
        x = mnist_ddpm.to_model(images[i * batch:(i + 1) * batch]).to(device)
        utils.train_step(net, ema, opt, diffusion, x, labels[i * batch:(i + 1) * batch].to(device), gen, 1e-4,
                         bf16=precision == "bf16", model_guidance=model_guidance)
    return (time.perf_counter() - start) / n, sum(p.numel() for p in net.parameters())


def interleaved_step_seconds(ways, repeats=10):
    """Median seconds of one call of each way of running the network, {name: (net, x, t, y)},
    without gradients. The ways take turns, call by call, so that a machine getting faster or
    slower during the measurement affects them all alike."""
    times = {name: [] for name in ways}
    with torch.no_grad():
        for net, *inputs in ways.values():  # warm-up
            net(*inputs)
        for _ in range(repeats):
            for name, (net, *inputs) in ways.items():
                start = time.perf_counter()
                net(*inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def frozen_graph(module, chunk):
    """The module traced into a TorchScript graph with its weights frozen in, on chunks of `chunk`
    images (TorchScript is deprecated in torch 2.13; timed here as an alternative, not shipped)."""
    import warnings
    import mnist_ddpm
    example = (torch.zeros(chunk, 1, 28, 28), torch.zeros(chunk, dtype=torch.int64), torch.zeros(chunk, dtype=torch.int64))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
    return functools.partial(mnist_ddpm.in_chunks, graph, chunk)


# the guided grid's w: the default of the model shipped before, which learnt no guidance (any w other
# than 0 costs the same: two network passes per step, not one)
GUIDED_W = 0.25


def mnist(device, checkpoint, try_compile=False):
    import mnist_ddpm
    model, diffusion, ckpt = mnist_ddpm.load_unet(checkpoint, None, device)
    images, labels = mnist_ddpm.load_mnist(mnist_ddpm.DEFAULT_DATA, "train")
    batch = ckpt["train"]["batch_size"]
    epoch = len(images) / batch
    w = mnist_ddpm.DEFAULT_W
    mg = ckpt["train"].get("model_guidance", 0.0)  # absent from checkpoints trained before the flag existed
    out = {"T": diffusion.T, "w": w, "guided_w": GUIDED_W, "batch_size": batch, "model_config": ckpt["model_config"],
           "model_guidance": mg}
    # 1. training: an epoch of the shipped recipe in both precisions, and of the same network on
    # the plain target (no model guidance, so no unconditional pass), side by side
    for precision in ("fp32", "bf16"):
        for target, m in (("", mg), ("_plain_target", 0.0)):
            step, _ = seconds_per_batch(ckpt["model_config"], diffusion, images, labels, batch, precision, device,
                                        n=100, model_guidance=m)
            out[f"epoch_seconds_{precision}{target}"] = step * epoch
    # 2. sampling: the 100-digit grid at the default w, float32 as shipped, then in bfloat16
    # (autocast) for comparison, and in float32 with guidance (two network passes per step)
    digits = torch.arange(10).repeat_interleave(10)
    for name, precision, strength in (("fp32", "fp32", w), ("bf16", "bf16", w), ("guided_fp32", "fp32", GUIDED_W)):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            mnist_ddpm.draw(model, diffusion, digits, strength, 0, device)
        out[f"grid_seconds_{name}"] = time.perf_counter() - start
    # one guided step of the grid (200 images), run in several ways, taking turns: chunks of 50
    # (shipped), 100 and 200, channels-last memory, attention windows all at once instead of in
    # groups of mnist_ddpm.ATTENTION_GROUP, a frozen TorchScript graph, torch.compile
    x = torch.randn(200, 1, 28, 28, generator=utils.make_generator(0), device=device)
    t = torch.full((200,), diffusion.T // 2, device=device)
    y = torch.cat([digits, torch.full((100,), utils.NULL_LABEL)]).to(device)
    shipped = mnist_ddpm.CHUNK
    ways = {f"chunk_{c}": (functools.partial(model, chunk=c), x, t, y) for c in (shipped, 100, 200)}
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    ways["channels_last"] = (last, x.contiguous(memory_format=torch.channels_last), t, y)
    together = copy.deepcopy(model)  # attention over all the windows of a chunk at once, not in groups
    for layer in together.modules():
        if isinstance(layer, mnist_ddpm.SelfAttention):
            layer.group = 10 ** 9
    ways["windows_at_once"] = (together, x, t, y)
    if device.type == "cpu":
        start = time.perf_counter()
        ways["frozen_graph"] = (frozen_graph(model, shipped), x, t, y)
        out["frozen_graph_build_seconds"] = time.perf_counter() - start
    if try_compile:  # torch.compile needs a C++ compiler; its first call compiles, into an empty cache
        from torch._inductor.utils import fresh_cache
        compiled = torch.compile(model, dynamic=False)
        with fresh_cache(), torch.no_grad():  # a warm cache would hide most of the compile time
            start = time.perf_counter()
            compiled(x, t, y)
            out["compile_seconds"] = time.perf_counter() - start
        ways["compiled"] = (compiled, x, t, y)
    out["guided_step_seconds"] = interleaved_step_seconds(ways)
    # the model as a prior (mnist_ddpm.py inpaint and edit): ten completions of one test digit
    # without its top half, and ten SDEdits from t0 = T / 2, each toward the digit's own label
    test_images, test_labels = mnist_ddpm.load_mnist(mnist_ddpm.DEFAULT_DATA, "test")
    image, own = test_images[0, 0], torch.full((10,), int(test_labels[0]))
    start = time.perf_counter()
    mnist_ddpm.complete(model, diffusion, image, mnist_ddpm.removed_region("top"), own, w, 0, device)
    out["inpaint_seconds_n10"] = time.perf_counter() - start
    start = time.perf_counter()
    mnist_ddpm.edit(model, diffusion, image, diffusion.T // 2, own, w, 0, device)
    out["edit_seconds_n10_half_T"] = time.perf_counter() - start
    # 3. the cost of attention: the same network with 7 x 7 windows (shipped) and full attention
    for window in (7, 28):
        step, _ = seconds_per_batch(dict(ckpt["model_config"], attn_window=window), diffusion, images, labels, batch,
                                    "fp32", device, n=10)
        out[f"window_{window}_seconds_per_batch_fp32"] = step
    # 4. the configurations of the design study
    out["study_precision"] = utils.resolve_precision("auto", device)[0]
    out["study"] = design_study(diffusion, images, labels, batch, out["study_precision"], (x, t, y), device)
    return out


# the MNIST design study's configurations (figures/mnist_study/*.json hold their scores)
# (Min-SNR weighting changes only the loss, so it costs what its network costs.)
STUDY = {"bias": {}, "scale-shift": {"scale_shift": True}, "scale-shift-2layers": {"scale_shift": True, "res_layers": 2},
         "scale-shift-8-32-96-96": {"scale_shift": True, "channels": [8, 32, 96, 96]},
         "scale-shift-2-layer-embedding": {"scale_shift": True, "embed_layers": 2}}


def design_study(diffusion, images, labels, batch, precision, guided_step, device):
    """Per configuration of STUDY: parameters, seconds per training epoch in `precision` and
    seconds of one guided sampling step (float32, on the inputs `guided_step`, the configurations
    taking turns). The weights are fresh: what a step costs does not depend on them."""
    import mnist_ddpm
    base = {"T": diffusion.T, "channels": [16, 32, 64, 64]}
    rows, nets = {}, {}
    for name, extra in STUDY.items():
        config = {**base, **extra}
        step, params = seconds_per_batch(config, diffusion, images, labels, batch, precision, device)
        rows[name] = {"parameters": params, "epoch_seconds": step * len(images) / batch, **extra}
        torch.manual_seed(0)
        nets[name] = (mnist_ddpm.build_unet(config).to(device).eval(), *guided_step)
    for name, seconds in interleaved_step_seconds(nets).items():
        rows[name]["guided_step_seconds"] = seconds
    return rows


def main():
    args = build_parser().parse_args()
    device = utils.pick_device(args.device)
    utils.ensure_writable_dir(args.out)
    result = {"machine": machine(device)}
    print("machine:", ", ".join(f"{k} {v}" for k, v in result["machine"].items()), flush=True)
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
        result["mnist"] = mnist(device, args.mnist_checkpoint, args.compile)
        m = result["mnist"]
        print(f"MNIST training epoch (model guidance {m['model_guidance']:g}): {m['epoch_seconds_fp32']:.0f} s in fp32, "
              f"{m['epoch_seconds_bf16']:.0f} s in bf16 (auto picks {result['machine']['auto_precision']}); on the "
              f"plain target {m['epoch_seconds_fp32_plain_target']:.0f} s and {m['epoch_seconds_bf16_plain_target']:.0f} s")
        print(f"MNIST 100-digit grid, T={m['T']}, w={m['w']:g}: {m['grid_seconds_fp32']:.1f} s in fp32, "
              f"{m['grid_seconds_bf16']:.1f} s in bf16; at w={m['guided_w']:g}: {m['grid_seconds_guided_fp32']:.1f} s in fp32")
        print("one guided step of 200 images, median of turns taken: "
              + ", ".join(f"{v:.3f} s {k}" for k, v in m["guided_step_seconds"].items())
              + (f"; compiling took {m['compile_seconds']:.0f} s" if "compile_seconds" in m else ""))
        print(f"ten inpaintings: {m['inpaint_seconds_n10']:.1f} s; ten SDEdits from t0 = T/2: {m['edit_seconds_n10_half_T']:.1f} s")
        print(f"MNIST training step on a batch of {m['batch_size']} in fp32: {m['window_7_seconds_per_batch_fp32']:.3f} s "
              f"with 7 x 7 attention windows, {m['window_28_seconds_per_batch_fp32']:.3f} s with full 28 x 28 attention")
        for name, row in m["study"].items():
            print(f"study {name}: {row['parameters']:,} parameters, {row['epoch_seconds']:.0f} s per epoch in "
                  f"{m['study_precision']}, {row['guided_step_seconds']:.3f} s per guided step of 200 images")
    utils.save_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    utils.run_main(main)
