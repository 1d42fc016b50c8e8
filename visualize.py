"""Sample from the shipped two-pixel checkpoints and draw the figures.

    python visualize.py --task all          # every two-pixel figure, then the report
    python visualize.py --task all --n 500  # a quick draft in figures/draft: 500 samples per figure
    python visualize.py --task handout      # the handout's four figures below
    python visualize.py --task trajectory   # figures/twopixel_trajectory.png (T = 50)
    python visualize.py --task tsweep       # figures/twopixel_tsweep.png and _oracle.png (T = 5, 10, 25, 50)
    python visualize.py --task guidance     # figures/twopixel_guidance.png
    python visualize.py --task loss         # figures/twopixel_loss.png
    python visualize.py --task studies      # the four studies below
    python visualize.py --task fast         # figures/twopixel_fast_sampling.png (T = 200: strided DDPM, DDIM)
    python visualize.py --task classifier   # figures/twopixel_classifier_guidance.png (T = 50)
    python visualize.py --task schedules    # figures/twopixel_schedules.png (cosine against linear)
    python visualize.py --task inpaint      # figures/twopixel_inpaint.png: one pixel given the other (T = 50)
    python visualize.py --task animate      # figures/twopixel_flow.gif: the point cloud from noise to data
    python visualize.py --task report       # figures/report.pdf: REPORT.md typeset, one problem per part
    python visualize.py --task samples --T 50 --n 5000 --seed 0 --out samples.npy [--known-left V]

Each figure's numbers are saved beside it as JSON. Densities are 2-D histograms
(smoothed by one bin) of the points, drawn with fixed axes and colour scales wherever
panels are compared.
"""
import os
import time

import numpy as np
import torch

import train
import utils
from gmm import TwoPixelGMM

TASKS = ("samples", "trajectory", "tsweep", "guidance", "loss", "fast", "classifier", "schedules", "inpaint", "animate", "report",
         "all", "handout", "studies")
SWEEP_T = (5, 10, 25, 50)
DRAFTS = os.path.join("figures", "draft")  # where figures drawn with --n go unless --figures says otherwise
DATA_BOX = (-0.15, 1.25)  # the pixel-value window of every panel that shows x_0
# Every two-pixel chain clips its predicted clean point x0_hat to this box, 7.5 standard
# deviations beyond the outermost class mean, so it never touches real data. Without it, a
# few guided chains that start in the far tails of x_T diverge (1 in 2000 at w = 1, 23 in
# 2000 at w = 4, some to |x| > 100): guidance multiplies the network's error there.
CLIP_X0 = (-0.5, 1.5)


def build_parser():
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True,
                   help="what to make: a figure (trajectory, tsweep, guidance, loss; studies: fast, classifier, schedules, inpaint), "
                        "animate (GIF), report (REPORT.md typeset as figures/report.pdf), handout (its four figures), "
                        "studies (the four studies), all (every two-pixel figure, then the report; "
                        "python reproduce.py remakes the MNIST figures too), or samples (an (n, 2) float32 array of pixel values)")
    p.add_argument("--figures", default=None,
                   help=f"directory for figures and their JSON (default figures, or {DRAFTS} with --n, so that a draft "
                        "never replaces a shipped figure)")
    p.add_argument("--checkpoint-dir", default="checkpoints", help="folder of the twopixel_T{T}.pt checkpoints (default checkpoints)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--n", type=utils.positive_int, default=None,
                   help="number of samples: for --task samples (default 5000); for the figures, the model's samples "
                        "or chains each one draws (per label or per case where it draws them separately), for a quick, "
                        f"noisier draft written to {DRAFTS} (default: each figure's own, 1000 to 10000, as shipped; "
                        "its JSON records the count; the exact references keep theirs)")
    g = p.add_argument_group("sampling (--task samples)")
    g.add_argument("--T", type=utils.positive_int, default=50, help="diffusion steps of the model; picks checkpoints/twopixel_T{T}.pt (default 50)")
    g.add_argument("--checkpoint", default=None, help="another checkpoint to sample from; its T must match --T")
    g.add_argument("--label", type=int, choices=(0, 1), default=None,
                   help="class to sample: 0 = left pixel darker, 1 = left pixel lighter (default: no label, the whole mixture)")
    g.add_argument("--w", type=utils.guidance_strength, default=0.0,
                   help="classifier-free guidance strength with --label: 0 plain conditional, >0 pushes harder toward the class, "
                        "-1 ignores the label (unconditional); values below -1 are refused (default 0)")
    g.add_argument("--out", default=None, help="where --task samples writes its .npy file")
    utils.add_sampler_flags(p, "sampler (--task samples)")
    g = p.add_argument_group("inpainting (--task samples): fix one pixel, let the model fill in the other")
    g.add_argument("--known-left", type=float, default=None, metavar="V",
                   help="the left pixel is V in every sample (column 0 of the output equals V exactly)")
    g.add_argument("--known-right", type=float, default=None, metavar="V", help="the right pixel is V (column 1)")
    g.add_argument("--inpaint", choices=utils.INPAINT_METHODS, default=None,
                   help="replace: overwrite the known pixel with a noised copy of V after every step; repaint: "
                        "the same with RePaint's resampling (default replace)")
    g.add_argument("--resample", type=utils.positive_int, default=None,
                   help="repaint: times each stretch of --jump steps is run (default 10)")
    g.add_argument("--jump", type=utils.positive_int, default=None, help="repaint: steps gone back up before each rerun (default 5)")
    utils.add_common_flags(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.task == "samples" and args.out is None:
        p.error("--task samples needs --out FILE.npy")
    if args.w != 0 and args.label is None:
        p.error("--w needs --label: guidance pushes toward a class")
    if args.eta and args.sampler != "ddim":
        p.error("--eta applies to --sampler ddim only")
    if args.task != "samples" and (args.sampler != "ddpm" or args.steps is not None):
        p.error("--sampler and --steps apply to --task samples only; the figures fix their own samplers")
    if args.known_left is not None and args.known_right is not None:
        p.error("give --known-left or --known-right, not both: with both pixels known there is nothing to fill in")
    known = args.known_left if args.known_left is not None else args.known_right
    if known is not None and (args.task != "samples" or args.sampler != "ddpm" or args.steps is not None):
        p.error("--known-left/--known-right apply to --task samples with the full DDPM sampler")
    if known is not None and not np.isfinite(known):
        p.error(f"--known-left/--known-right: expected a finite pixel value, got {known}")
    if known is None and (args.inpaint or args.resample or args.jump):
        p.error("--inpaint, --resample and --jump need --known-left or --known-right")
    if args.inpaint != "repaint" and (args.resample or args.jump):
        p.error("--resample and --jump apply to --inpaint repaint only")
    if args.task in ("loss", "report") and args.n is not None:
        p.error(f"--n: --task {args.task} draws no samples")
    if args.task not in ("samples", "loss", "report") and args.n == 1:
        p.error("--n: a figure needs at least 2 samples, for their spread")
    if args.task == "samples" and args.n is None:
        args.n = 5000
    if args.figures is None:
        args.figures = DRAFTS if args.n is not None and args.task != "samples" else "figures"
    args.inpaint = args.inpaint or "replace"
    args.resample, args.jump = args.resample or 10, args.jump or 5
    return args


def draw_samples(model, diffusion, n, seed, label=None, w=0.0, device="cpu", sampler="ddpm", steps=None, eta=0.0):
    """n samples (n, 2) float32 in pixel units. The starting noise x_T and every z come from
    one generator seeded with `seed`, so the same arguments give the same samples."""
    gen = utils.make_generator(seed, device)
    x_T = torch.randn(n, 1, 2, generator=gen, device=device)
    y = None if label is None else torch.full((n,), label, dtype=torch.int64, device=device)
    x_0 = utils.sample(diffusion, model, x_T, y, w, gen, sampler, steps, eta, clip_x0=CLIP_X0)
    return x_0.reshape(n, 2).float().cpu()


def inpaint_samples(model, diffusion, n, seed, known, value, resample=1, jump=1, label=None, w=0.0, device="cpu"):
    """n samples (n, 2) float32 whose pixel `known` (0 left, 1 right) is exactly `value` and whose
    other pixel the model fills in (utils.inpaint; resample = 1 is plain replacement)."""
    gen = utils.make_generator(seed, device)
    x_T = torch.randn(n, 1, 2, generator=gen, device=device)
    mask = torch.zeros(1, 1, 2, dtype=torch.bool, device=device)
    mask[..., known] = True
    fixed = torch.full((n, 1, 2), float(value), device=device)
    y = None if label is None else torch.full((n,), label, dtype=torch.int64, device=device)
    x_0 = utils.inpaint(diffusion, model, x_T, fixed, mask, y, w, gen, resample, jump, clip_x0=CLIP_X0)
    return x_0.reshape(n, 2).float().cpu()


def task_samples(args, device):
    if not args.out.endswith(".npy"):
        raise utils.UserError(f"--out {args.out}: the samples file must end in .npy")
    utils.ensure_writable_dir(args.out)
    path = args.checkpoint or train.default_checkpoint(args.T, args.checkpoint_dir)
    model, diffusion, _ = train.load_model(path, args.T, device)
    utils.check_steps(args.steps, diffusion)
    if args.known_left is None and args.known_right is None:
        x = draw_samples(model, diffusion, args.n, args.seed, args.label, args.w, device, args.sampler, args.steps, args.eta)
    else:
        known, value = (0, args.known_left) if args.known_left is not None else (1, args.known_right)
        resample, jump = (args.resample, args.jump) if args.inpaint == "repaint" else (1, 1)
        x = inpaint_samples(model, diffusion, args.n, args.seed, known, value, resample, jump, args.label, args.w, device)
    utils.save_npy(args.out, x.numpy().astype(np.float32))
    print(f"wrote {args.out}: {args.n} samples from {path}")


# ----------------------------------------------------------------------------------
# Shared drawing pieces
# ----------------------------------------------------------------------------------
def needed_checkpoints(tasks):
    needs = {"trajectory": (50,), "tsweep": SWEEP_T, "guidance": (50,), "loss": SWEEP_T, "fast": (FAST_T, *SWEEP_T),
             "classifier": (50,), "schedules": SWEEP_T, "animate": (50,), "inpaint": (50,)}
    return sorted({T for task in tasks for T in needs.get(task, ())})


def density(points, box, bins=80):
    """A 2-D histogram density of points (N, 2) on a square box (lo, hi), smoothed by one bin:
    (bins, bins) with rows = right pixel (for imshow with origin='lower')."""
    from scipy.ndimage import gaussian_filter
    lo, hi = box
    h, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=bins, range=[[lo, hi], [lo, hi]], density=True)
    return gaussian_filter(h.T, sigma=1.0)


def true_density(gmm, box, alpha_bar=1.0, bins=80):
    lo, hi = box
    centres = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    return gmm.density_grid(centres, centres, alpha_bar)


def show_density(ax, dens, box, vmax, cmap="viridis"):
    ax.imshow(dens, origin="lower", extent=(*box, *box), cmap=cmap, vmin=0, vmax=vmax, aspect="equal")
    ax.set_xlim(box)
    ax.set_ylim(box)


def label_axes(ax, left=True, bottom=True):
    if bottom:
        ax.set_xlabel("left pixel")
    if left:
        ax.set_ylabel("right pixel")


def panel_box(diffusion, t):
    """The window that holds x_t: around sqrt(abar_t) * data centre, 3.5 standard deviations wide.
    At t = 0 it is DATA_BOX."""
    if t == 0:
        return DATA_BOX
    gmm = TwoPixelGMM()
    mean = gmm.weights @ gmm.means  # mixture mean of each pixel
    var = gmm.std ** 2 + gmm.weights @ (gmm.means - mean) ** 2  # mixture variance of each pixel
    centre, spread = mean.mean().item(), var.max().sqrt().item()  # about 0.57 and 0.22
    abar = diffusion.alphas_cumprod[t - 1].item()
    centre = abar ** 0.5 * centre
    half = 3.5 * (abar * spread ** 2 + 1 - abar) ** 0.5
    return (round(centre - half, 2), round(centre + half, 2))


def load_fig_model(args, T, device):
    model, diffusion, _ = train.load_model(train.default_checkpoint(T, args.checkpoint_dir), T, device)
    return model, diffusion


def ground_truth_reference(gmm, n, seed):
    """n fresh ground-truth points to measure samples against, and the energy distance between
    them and a second such sample (the floor no sampler can beat at this n)."""
    ref, _ = gmm.sample(n, utils.make_generator(10_000 + seed))
    other, _ = gmm.sample(n, utils.make_generator(20_000 + seed))
    return ref, utils.energy_distance(other, ref)


def sample_quality(model, diffusion, seed, n=5000, device="cpu"):
    """Energy distance to fresh ground truth for the learned model and the exact oracle run
    with the same sampler, x_T and z, next to the floor between two ground-truth samples,
    with class-1 shares and per-class statistics. Returns (stats dict, learned, oracle)."""
    gmm = TwoPixelGMM()
    oracle = gmm.oracle(diffusion.alphas_cumprod)
    learned = draw_samples(model, diffusion, n, seed, device=device)
    exact = draw_samples(oracle, diffusion, n, seed)  # the oracle runs on the CPU
    ref, floor = ground_truth_reference(gmm, n, seed)
    stats = {"seed": seed, "n": n,
             "energy_distance_learned": utils.energy_distance(learned, ref),
             "energy_distance_oracle": utils.energy_distance(exact, ref),
             "energy_distance_floor": floor,
             "class1_share_learned": (gmm.nearest_class(learned) == 1).float().mean().item(),
             "class1_share_oracle": (gmm.nearest_class(exact) == 1).float().mean().item(),
             "class1_share_truth": 0.65,
             "per_class_learned": class_stats(gmm, learned), "per_class_oracle": class_stats(gmm, exact)}
    stats["ratio_learned_to_oracle"] = stats["energy_distance_learned"] / stats["energy_distance_oracle"]
    return stats, learned, exact


def class_stats(gmm, x):
    """Mean and per-pixel std of the points nearest each class mean (truth: means of the mixture, std 0.1)."""
    near = gmm.nearest_class(x)
    return [{"class": k, "mean": x[near == k].mean(0).tolist(), "std": x[near == k].std(0).tolist(),
             "true_mean": gmm.means[k].tolist(), "true_std": gmm.std} for k in range(gmm.num_classes)]


# ----------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------
def task_trajectory(args, device, T=50, n=10_000, times=(50, 40, 30, 20, 10, 0)):
    """Problem 2: p_theta(x_t) from n chains (top) against the exact q(x_t) (bottom), one chain drawn."""
    import matplotlib.pyplot as plt
    model, diffusion = load_fig_model(args, T, device)
    gmm = TwoPixelGMM()
    gen = utils.make_generator(args.seed, device)
    x_T = torch.randn(n, 1, 2, generator=gen, device=device)
    traj = diffusion.sample_trajectory(model, x_T, None, 0.0, gen, clip_x0=CLIP_X0).reshape(T + 1, n, 2).cpu().numpy()
    path = traj[:, 0]  # the drawn chain: x_T ... x_0 of the first starting point
    # two bands of three steps; in each band the learned density sits above the exact one
    cols = 3
    bands = -(-len(times) // cols)
    fig, axes = plt.subplots(2 * bands, cols, figsize=(7.4, 5.0 * bands))
    numbers = {"T": T, "n_chains": n, "seed": args.seed, "panels": []}
    for k, t in enumerate(times):
        band, col = divmod(k, cols)
        box = panel_box(diffusion, t)
        learned = density(traj[t], box)
        exact = true_density(gmm, box, 1.0 if t == 0 else diffusion.alphas_cumprod[t - 1].item())
        vmax = max(learned.max(), exact.max())  # one colour scale per step, for both panels
        for row, dens in enumerate((learned, exact)):
            ax = axes[2 * band + row, col]
            show_density(ax, dens, box, vmax)
            ax.plot(path[t:, 0], path[t:, 1], "-", color="white", lw=1.0, alpha=0.9)
            ax.plot(path[t, 0], path[t, 1], "o", color="red", ms=4)
            label_axes(ax, left=col == 0, bottom=row == 1)
            ax.tick_params(labelsize=8)
        axes[2 * band, col].set_title(f"learned p(x_t), t={t}" if t else "learned p(x_0) (samples)", fontsize=9)
        axes[2 * band + 1, col].set_title(f"exact q(x_t), t={t}" if t else "ground truth q(x_0)", fontsize=9)
        # the chains at step t against the true forward process: 5000 fresh x_0 noised to step t
        x_0, _ = gmm.sample(5000, utils.make_generator(args.seed + 1))
        exact_t = x_0 if t == 0 else diffusion.q_sample(
            x_0[:, None], torch.full((5000,), t - 1), torch.randn(5000, 1, 2, generator=utils.make_generator(args.seed + 2)))
        exact_t = exact_t.reshape(5000, 2)
        numbers["panels"].append({"t": t, "box": list(box),
                                  "mean_chains": traj[t].mean(0).tolist(), "std_chains": traj[t].std(0).tolist(),
                                  "mean_exact": exact_t.mean(0).tolist(), "std_exact": exact_t.std(0).tolist(),
                                  "energy_distance_chains_to_exact": utils.energy_distance(torch.from_numpy(traj[t][:5000]), exact_t)})
    fig.suptitle(f"T={T}: density of {n} chains at step t above the exact noised marginal;\n"
                 "each step has its own axes and one colour scale for both panels. "
                 "White: one chain from x_T up to step t, red: its x_t", fontsize=9)
    fig.tight_layout()
    out = os.path.join(args.figures, "twopixel_trajectory.png")
    utils.save_figure(fig, out)
    utils.save_json(out.replace(".png", ".json"), numbers)


def task_tsweep(args, device, n=5000):
    """Problem 3: samples of the models for T = 5, 10, 25, 50, and the same sampler with the oracle."""
    import matplotlib.pyplot as plt
    gmm = TwoPixelGMM()
    truth = true_density(gmm, DATA_BOX)
    vmax = truth.max() * 1.3  # one colour scale for every density panel of both figures
    rows = {}
    for T in SWEEP_T:
        model, diffusion = load_fig_model(args, T, device)
        rows[T] = sample_quality(model, diffusion, args.seed, n, device)
    for which in ("learned", "oracle"):
        fig, axes = plt.subplots(len(SWEEP_T), 2, figsize=(7.2, 3.3 * len(SWEEP_T)))
        for r, T in enumerate(SWEEP_T):
            stats, learned, exact = rows[T]
            x = (learned if which == "learned" else exact).numpy()
            show_density(axes[r, 0], truth, DATA_BOX, vmax, cmap="Greys")
            axes[r, 0].scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, color="C1")
            show_density(axes[r, 1], density(x, DATA_BOX), DATA_BOX, vmax)
            ed = stats[f"energy_distance_{which}"]
            share = stats[f"class1_share_{which}"]
            axes[r, 0].set_title(f"T={T}: {n} samples over the true PDF", fontsize=9)
            axes[r, 1].set_title(f"T={T}: sample PDF (ED {ed:.4f}, class 1 {share:.3f})", fontsize=9)
            label_axes(axes[r, 0], bottom=r == len(SWEEP_T) - 1)
            label_axes(axes[r, 1], left=False, bottom=r == len(SWEEP_T) - 1)
        name = "the trained models" if which == "learned" else "the exact oracle eps* (same sampler, x_T and z)"
        fig.suptitle(f"T-sweep, DDPM sampler driven by {name}\n"
                     "fixed axes and colour scale in every panel; ED = energy distance to the ground truth "
                     f"(floor {rows[50][0]['energy_distance_floor']:.5f}); class 1 share, truth 0.65", fontsize=9)
        fig.tight_layout()
        suffix = "" if which == "learned" else "_oracle"
        utils.save_figure(fig, os.path.join(args.figures, f"twopixel_tsweep{suffix}.png"))
    utils.save_json(os.path.join(args.figures, "twopixel_tsweep.json"),
                    {"n": n, "seed": args.seed, "by_T": {str(T): rows[T][0] for T in SWEEP_T}})


def task_guidance(args, device, T=50, ws=(0.0, 1.0, 4.0), n=2000, starts=6):
    """Problem 4: from the same x_T and the same z, trajectories for y = 0, y = 1 and no label;
    several starting points; and how the guidance strength w sharpens the classes."""
    import matplotlib.pyplot as plt
    model, diffusion = load_fig_model(args, T, device)
    gmm = TwoPixelGMM()
    truth_box = (-2.6, 2.6)
    truth = true_density(gmm, DATA_BOX)
    colours = {0: "C0", 1: "C3", None: "white"}

    def chains(x_T, label, w=0.0):
        y = None if label is None else torch.full((x_T.shape[0],), label, device=device)
        # the same seed gives the same z at every step for every label
        gen = utils.make_generator(args.seed + 7, device)
        return diffusion.sample_trajectory(model, x_T, y, w, gen, clip_x0=CLIP_X0).reshape(T + 1, -1, 2).cpu().numpy()

    x_T = torch.randn(starts, 1, 2, generator=utils.make_generator(args.seed, device), device=device)
    runs = {label: chains(x_T, label) for label in (0, 1, None)}
    fig = plt.figure(figsize=(7.4, 7.2))
    grid = fig.add_gridspec(2, 2 * len(ws), height_ratios=(1.35, 1))
    axes = [fig.add_subplot(grid[0, :len(ws)]), fig.add_subplot(grid[0, len(ws):])]
    axes += [fig.add_subplot(grid[1, 2 * k:2 * k + 2]) for k in range(len(ws))]
    ax = axes[0]
    show_density(ax, true_density(gmm, truth_box, bins=160), truth_box, None, cmap="Greys")
    for label, traj in runs.items():
        ax.plot(traj[:, 0, 0], traj[:, 0, 1], "-o", ms=2, lw=1, color=colours[label] if label is not None else "k",
                label=f"y={label}" if label is not None else "no label")
    ax.plot(*x_T[0, 0].cpu().numpy(), "k*", ms=12, label="x_T (shared)")
    ax.set_title(f"One x_T, same z, three labels\n(T={T}, w=0)", fontsize=9)
    ax.legend(fontsize=7.5, loc="lower left")
    label_axes(ax)
    ax = axes[1]
    show_density(ax, truth, DATA_BOX, None, cmap="Greys")
    for label in (0, 1):
        for k in range(starts):
            ax.plot(runs[label][:12, k, 0], runs[label][:12, k, 1], "-", lw=1, color=colours[label], alpha=0.8)
            ax.plot(*runs[label][0, k], "o", ms=4, color=colours[label])
    ax.set_title(f"{starts} starting points, last 12 steps\n(y=0 blue, y=1 red)", fontsize=9)
    label_axes(ax, left=False)
    numbers = {"T": T, "seed": args.seed, "n_per_label": n, "one_start": {
        str(label): {"x_T": runs[label][T, 0].tolist(), "x_0": runs[label][0, 0].tolist()} for label in runs}, "by_w": []}
    for ax, w in zip(axes[2:], ws):
        show_density(ax, truth, DATA_BOX, None, cmap="Greys")
        entry = {"w": w}
        for label in (0, 1):
            x = draw_samples(model, diffusion, n, args.seed + label, label, w, device)
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, color=colours[label])
            near = gmm.nearest_class(x)
            entry[f"label{label}"] = {"share_in_class": (near == label).float().mean().item(),
                                      "mean": x.mean(0).tolist(), "std": x.std(0).tolist()}
        numbers["by_w"].append(entry)
        ax.set_title(f"w={w:g}: std y=0 {np.mean(entry['label0']['std']):.3f},\n"
                     f"y=1 {np.mean(entry['label1']['std']):.3f}", fontsize=9)
        label_axes(ax, left=ax is axes[2])
    fig.suptitle(f"Classifier-free guidance on two pixels, over the ground-truth PDF (true std 0.1 per pixel);\n"
                 f"bottom: {n} samples each of y=0 and y=1 at three guidance strengths w", fontsize=9)
    fig.tight_layout()
    out = os.path.join(args.figures, "twopixel_guidance.png")
    utils.save_figure(fig, out)
    utils.save_json(out.replace(".png", ".json"), numbers)


def task_loss(args, device):
    """Training and validation loss against steps for each T, with the oracle's loss as the floor."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(7.4, 5.6), sharex=True)
    axes = axes.flat
    numbers = {}
    for ax, T in zip(axes, SWEEP_T):
        _, _, ckpt = train.load_model(train.default_checkpoint(T, args.checkpoint_dir), T)
        meta = ckpt["train"]
        rec = meta["record"]
        ax.plot(rec["step"], rec["loss"], label="training (batch mean)")
        ax.plot(rec["step"], rec["val_loss"], label="validation (EMA weights)")
        ax.axhline(meta["oracle_val_loss"], color="k", ls="--", lw=1, label="oracle eps* (floor)")
        ax.set_yscale("log")
        ax.set_xlabel("step" if T in SWEEP_T[2:] else "")
        ax.set_ylabel(f"noise loss ({meta['loss']})" if T in SWEEP_T[::2] else "")
        ax.set_title(f"T={T}: final val {meta['val_loss']:.4f}, floor {meta['oracle_val_loss']:.4f}", fontsize=9)
        numbers[str(T)] = {k: meta[k] for k in ("val_loss", "oracle_val_loss", "final_loss", "steps", "seconds")}
    axes[0].legend(fontsize=7.5)
    fig.tight_layout()
    out = os.path.join(args.figures, "twopixel_loss.png")
    utils.save_figure(fig, out)
    utils.save_json(out.replace(".png", ".json"), numbers)


FAST_T = 200
FAST_STEPS = (2, 5, 10, 25, 50, 200)


def task_fast(args, device, n=5000):
    """Fast sampling: energy distance to the ground truth against the number of sampling steps K
    for the T = 200 model, with strided DDPM and DDIM (eta = 0), each beside the same sampler
    driven by the exact oracle; the T-sweep models (full DDPM at K = T) for comparison."""
    import matplotlib.pyplot as plt
    model, diffusion = load_fig_model(args, FAST_T, device)
    gmm = TwoPixelGMM()
    oracle = gmm.oracle(diffusion.alphas_cumprod)
    ref, floor = ground_truth_reference(gmm, n, args.seed)
    numbers = {"T": FAST_T, "n": n, "seed": args.seed, "steps": list(FAST_STEPS), "by_sampler": {}, "tsweep_models": {}}
    for sampler in utils.SAMPLERS:
        for driver, eps_fn, dev in (("learned", model, device), ("oracle", oracle, "cpu")):
            eds = [utils.energy_distance(draw_samples(eps_fn, diffusion, n, args.seed, device=dev, sampler=sampler, steps=K), ref)
                   for K in FAST_STEPS]
            numbers["by_sampler"][f"{sampler}_{driver}"] = {"energy_distance": eds}
    for T in SWEEP_T:  # each T-sweep model with its own full DDPM chain: K = T
        small, small_diffusion = load_fig_model(args, T, device)
        x = draw_samples(small, small_diffusion, n, args.seed, device=device)
        numbers["tsweep_models"][str(T)] = utils.energy_distance(x, ref)
    numbers["energy_distance_floor"] = floor

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for sampler, colour, name in (("ddpm", "C0", "strided DDPM"), ("ddim", "C3", "DDIM, eta = 0")):
        ax.plot(FAST_STEPS, numbers["by_sampler"][f"{sampler}_learned"]["energy_distance"], "-o", color=colour,
                label=f"{name}, T={FAST_T} model")
        ax.plot(FAST_STEPS, numbers["by_sampler"][f"{sampler}_oracle"]["energy_distance"], "--", color=colour,
                label=f"{name}, oracle eps*")
    ax.plot([int(T) for T in numbers["tsweep_models"]], list(numbers["tsweep_models"].values()), "ks",
            label="T-sweep models, full DDPM (K = T)")
    ax.axhline(numbers["energy_distance_floor"], color="grey", lw=1, ls=":", label="two ground-truth samples (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps K")
    ax.set_ylabel(f"energy distance to the ground truth ({n} samples)")
    ax.set_title("Fewer sampling steps from one model trained with T = 200", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(args.figures, "twopixel_fast_sampling.png")
    utils.save_figure(fig, out)
    utils.save_json(out.replace(".png", ".json"), numbers)


def task_schedules(args, device, n=5000):
    """Linear against cosine schedule at T = 5, 10, 25, 50: energy distance of the learned
    models and of the oracle with the same sampler (linear models in <checkpoint-dir>/linear)."""
    import matplotlib.pyplot as plt
    gmm = TwoPixelGMM()
    truth = true_density(gmm, DATA_BOX)
    numbers = {"n": n, "seed": args.seed, "by_schedule": {}}
    linear_samples = {}
    for schedule, folder in (("cosine", args.checkpoint_dir), ("linear", os.path.join(args.checkpoint_dir, "linear"))):
        rows = {}
        for T in SWEEP_T:
            model, diffusion, _ = train.load_model(train.default_checkpoint(T, folder), T, device, schedule)
            stats, learned, _ = sample_quality(model, diffusion, args.seed, n, device)
            stats["alpha_bar_T"] = diffusion.alphas_cumprod[-1].item()
            rows[str(T)] = {k: v for k, v in stats.items() if not k.startswith("per_class")}
            if schedule == "linear":
                linear_samples[T] = learned.numpy()
        numbers["by_schedule"][schedule] = rows
    fig = plt.figure(figsize=(7.4, 7.4))
    grid = fig.add_gridspec(3, 2, height_ratios=(1.1, 1, 1))
    axes = [fig.add_subplot(grid[0, :])] + [fig.add_subplot(grid[1 + k // 2, k % 2]) for k in range(len(SWEEP_T))]
    for schedule, colour in (("cosine", "C0"), ("linear", "C3")):
        rows = numbers["by_schedule"][schedule]
        axes[0].plot(SWEEP_T, [rows[str(T)]["energy_distance_learned"] for T in SWEEP_T], "-o", color=colour,
                     label=f"{schedule}, learned")
        axes[0].plot(SWEEP_T, [rows[str(T)]["energy_distance_oracle"] for T in SWEEP_T], "--", color=colour,
                     label=f"{schedule}, oracle eps*")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].minorticks_off()
    axes[0].set_xticks(SWEEP_T, [str(T) for T in SWEEP_T])
    axes[0].set_xlabel("T")
    axes[0].set_ylabel("energy distance to the ground truth")
    axes[0].legend(fontsize=7.5, ncol=2)
    axes[0].set_title("DDPM with T steps, two schedules", fontsize=9)
    for ax, T in zip(axes[1:], SWEEP_T):
        show_density(ax, truth, DATA_BOX, None, cmap="Greys")
        x = linear_samples[T]
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, color="C3")
        abar_T = numbers["by_schedule"]["linear"][str(T)]["alpha_bar_T"]
        ax.set_title(f"linear schedule, T={T}: abar_T = {abar_T:.2f}", fontsize=9)
        label_axes(ax, left=ax in axes[1::2], bottom=ax in axes[3:])
    fig.suptitle("Cosine against linear schedule (beta from 1e-4 to 0.02);\n"
                 "below: samples of the linear-schedule models over the true PDF, fixed axes", fontsize=9)
    fig.tight_layout()
    out = os.path.join(args.figures, "twopixel_schedules.png")
    utils.save_figure(fig, out)
    utils.save_json(out.replace(".png", ".json"), numbers)


GUIDANCE_SCALES = (1.0, 2.0, 3.0, 5.0, 9.0)  # classifier-guidance scale s; classifier-free w = s - 1


def task_classifier(args, device, T=50, n=2000, show=5.0):
    """Classifier guidance beside classifier-free guidance, from the same x_T and z: own-class
    share and spread against the strength, for the learned classifier and the exact Bayes one."""
    import matplotlib.pyplot as plt
    import classifier_guidance as cg
    model, diffusion = load_fig_model(args, T, device)
    clf = cg.load_classifier(cg.default_checkpoint(T, args.checkpoint_dir), T, device)
    gmm = TwoPixelGMM()
    abar = diffusion.alphas_cumprod
    methods = {  # name: scale s -> (eps-function, classifier-free w, device it runs on)
        "classifier-free, learned model (w = s - 1)": lambda s: (model, s - 1, device),
        "classifier guidance, learned model and classifier": lambda s: (
            utils.classifier_guided(model, clf.score, abar, s), 0.0, device),
        "classifier guidance, exact eps* and Bayes classifier": lambda s: (  # the oracle runs on the CPU
            utils.classifier_guided(gmm.oracle(abar), cg.exact_score(gmm, abar), abar, s), 0.0, "cpu"),
    }
    numbers = {"T": T, "n_per_label": n, "seed": args.seed, "scales": list(GUIDANCE_SCALES), "by_method": {}}
    shown = {}
    for name, make in methods.items():
        rows = []
        for s in GUIDANCE_SCALES:
            eps_fn, w, dev = make(s)
            xs = [draw_samples(eps_fn, diffusion, n, args.seed + label, label, w, dev) for label in (0, 1)]
            rows.append({"scale": s,
                         "own_class_share": [(gmm.nearest_class(x) == k).float().mean().item() for k, x in enumerate(xs)],
                         "std": [x.std(0).mean().item() for x in xs],
                         "mean": [x.mean(0).tolist() for x in xs]})
            if s == show:
                shown[name] = xs
        numbers["by_method"][name] = rows
    truth = true_density(gmm, DATA_BOX)
    fig = plt.figure(figsize=(7.4, 6.6))
    grid = fig.add_gridspec(2, 6, height_ratios=(1, 1.05))
    axes = [fig.add_subplot(grid[0, 2 * k:2 * k + 2]) for k in range(3)]
    axes += [fig.add_subplot(grid[1, :3]), fig.add_subplot(grid[1, 3:])]
    short = ("classifier-free,\nlearned (w = s - 1)", "classifier guidance,\nlearned model and classifier",
             "classifier guidance,\nexact eps* and Bayes")
    for ax, (name, xs), title in zip(axes, shown.items(), short):
        show_density(ax, truth, DATA_BOX, None, cmap="Greys")
        for label, x in enumerate(xs):
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, color=("C0", "C3")[label])
        ax.set_title(f"{title}, s = {show:g}", fontsize=8)
        label_axes(ax, left=ax is axes[0])
        ax.tick_params(labelsize=7.5)
    for name, rows in numbers["by_method"].items():
        axes[3].plot(GUIDANCE_SCALES, [100 * np.mean(r["own_class_share"]) for r in rows], "-o", label=name)
        axes[4].plot(GUIDANCE_SCALES, [np.mean(r["std"]) for r in rows], "-o", label=name)
    axes[3].set_ylabel("samples nearest their own class mean (%)")
    axes[4].set_ylabel("per-class standard deviation\n(mean of the two classes)")
    axes[4].axhline(gmm.std, color="k", ls=":", lw=1, label="ground truth (0.1)")
    for ax in axes[3:]:
        ax.set_xlabel("guidance scale s")
    handles, names = axes[4].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=7.5, frameon=False)
    fig.suptitle(f"Classifier guidance and classifier-free guidance (T = {T}, {n} samples per label,\n"
                 "same x_T and z); y = 0 blue, y = 1 red", fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    out = os.path.join(args.figures, "twopixel_classifier_guidance.png")
    utils.save_figure(fig, out)
    utils.save_json(out.replace(".png", ".json"), numbers)


def task_animate(args, device, T=50, n=1000, hold=10):
    """figures/twopixel_flow.gif: the point cloud flowing from noise to the mixture, from the same
    x_T and z without a label, with labels at w = 0 and with labels at w = 4."""
    import matplotlib.pyplot as plt
    model, diffusion = load_fig_model(args, T, device)
    gmm = TwoPixelGMM()
    x_T = torch.randn(n, 1, 2, generator=utils.make_generator(args.seed, device), device=device)
    labels = (torch.arange(n, device=device) % 2)
    panels = [("no label", None, 0.0), ("y = 0 blue, y = 1 red, w = 0", labels, 0.0), ("same, w = 4", labels, 4.0)]
    runs = [diffusion.sample_trajectory(model, x_T, y, w, utils.make_generator(args.seed + 1, device), clip_x0=CLIP_X0)
            .reshape(T + 1, n, 2).cpu().numpy() for _, y, w in panels]
    colours = np.where(labels.cpu().numpy()[:, None] == 0, [[0.12, 0.47, 0.71, 1.0]], [[0.84, 0.15, 0.16, 1.0]])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 4.3))

    def draw_frame(k):
        t = max(T - k, 0)
        box = panel_box(diffusion, t)
        background = true_density(gmm, box, 1.0 if t == 0 else diffusion.alphas_cumprod[t - 1].item())
        for ax, (title, y, w), traj in zip(axes, panels, runs):
            ax.clear()
            show_density(ax, background, box, None, cmap="Greys")
            ax.scatter(traj[t, :, 0], traj[t, :, 1], s=2, alpha=0.5, color="C1" if y is None else colours)
            ax.set_title(f"{title}: t = {t}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{n} chains (T = {T}) over the exact q(x_t); the window follows the cloud", fontsize=9)

    utils.save_animation(fig, draw_frame, T + 1 + hold, os.path.join(args.figures, "twopixel_flow.gif"), fps=8)


INPAINT_CASES = ((0, 0.35), (0, 0.55), (0, 1.0), (1, 0.65), (1, 0.55), (1, 0.2))  # (known pixel, its value)
INPAINT_RUNS = (("replace", 1, 1), ("repaint", 10, 5))  # (method, resample, jump)


def task_inpaint(args, device, T=50, n=2000):
    """Fill in one pixel given the other with the unconditional T = 50 model and with the exact
    oracle, by replacement and by RePaint, against the exact conditional p(x_other | x_known = v)."""
    import matplotlib.pyplot as plt
    from scipy import stats
    model, diffusion = load_fig_model(args, T, device)
    gmm = TwoPixelGMM()
    oracle = gmm.oracle(diffusion.alphas_cumprod)
    numbers = {"T": T, "n": n, "seed": args.seed, "cases": []}
    fig, axes = plt.subplots(2, 3, figsize=(7.4, 5.6), sharey="row")
    grid = np.linspace(*DATA_BOX, 300)
    colours = {"replace": "C0", "repaint": "C3"}  # one colour per method; solid learned, dashed oracle
    for ax, (known, v) in zip(axes.flat, INPAINT_CASES):
        other = 1 - known
        weights, means, _ = gmm.conditional(v, known)
        exact = gmm.sample_conditional(20_000, v, known, utils.make_generator(args.seed + 100)).numpy()
        split = means.mean().item()  # halfway between the two modes of the unknown pixel
        first = int(means.argmax())  # the mode above the split

        def summary(x):
            return {"wasserstein": float(stats.wasserstein_distance(x, exact)),
                    "energy_distance": float(stats.energy_distance(x, exact)),
                    f"share_of_class{first}_mode": float(np.mean(x > split))}

        upper = float((weights * (1 - torch.distributions.Normal(means, gmm.std).cdf(torch.tensor(split, dtype=torch.float64)))).sum())
        # the floor: n fresh exact draws scored like a method's samples
        floor = summary(gmm.sample_conditional(n, v, known, utils.make_generator(args.seed + 200)).numpy())
        case = {"known": ("left", "right")[known], "value": v, "posterior_weights": weights.tolist(),
                "modes": means.tolist(), "split": split, f"exact_share_of_class{first}_mode": upper,
                "exact_n_draws": floor, "methods": {}}
        ax.plot(grid, gmm.conditional_density(grid, v, known).numpy(), "k", lw=1.5, label="exact")
        for method, resample, jump in INPAINT_RUNS:
            for driver, eps_fn, dev in (("learned", model, device), ("oracle", oracle, "cpu")):
                x = inpaint_samples(eps_fn, diffusion, n, args.seed, known, v, resample, jump, device=dev)[:, other].numpy()
                case["methods"][f"{method}_{driver}"] = summary(x)
                ax.hist(x, bins=60, range=DATA_BOX, density=True, histtype="step", color=colours[method],
                        ls="-" if driver == "learned" else "--", lw=1.1, label=f"{method}, {driver}")
        numbers["cases"].append(case)
        ax.set_title(f"{('left', 'right')[known]} = {v:g}: {('right', 'left')[known]} pixel\n"
                     f"exact share above {split:.2f}: {100 * upper:.0f}%", fontsize=10)
        ax.set_xlim(*DATA_BOX)
        ax.set_xticks([0, 0.5, 1])
        ax.tick_params(labelsize=9.5)
    for ax in axes[1]:
        ax.set_xlabel("the filled-in pixel", fontsize=10)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=9.5, frameon=False, handlelength=2.5)
    fig.suptitle(f"Inpainting one pixel given the other (T = {T}, {n} samples per method, unconditional model)",
                 fontsize=10.5)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out = os.path.join(args.figures, "twopixel_inpaint.png")
    utils.save_figure(fig, out)
    utils.save_json(out.replace(".png", ".json"), numbers)


REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "REPORT.md")


def task_report(args, device, source=REPORT):
    """figures/report.pdf: REPORT.md typeset by report.py. Each figure is taken from --figures
    when it was made there, else from the repository's own copy."""
    import report
    import reproduce
    here = os.path.dirname(os.path.abspath(source))

    def locate(path):
        made = os.path.join(args.figures, os.path.basename(path))
        return made if os.path.exists(made) else os.path.join(here, path)

    out = os.path.join(args.figures, "report.pdf")
    result = report.render(source, out, locate, reproduce.maker)
    print(f"wrote {out} ({result['pages']} pages)")


FIGURE_TASKS = {"trajectory": task_trajectory, "tsweep": task_tsweep, "guidance": task_guidance,
                "loss": task_loss, "fast": task_fast, "classifier": task_classifier, "schedules": task_schedules,
                "report": task_report, "animate": task_animate, "inpaint": task_inpaint}
SAMPLED_TASKS = ("trajectory", "tsweep", "guidance", "fast", "classifier", "schedules", "animate", "inpaint")  # take n
HANDOUT = ("trajectory", "tsweep", "guidance", "loss")
STUDIES = ("fast", "classifier", "schedules", "inpaint")  # beyond the handout
GROUPS = {"all": HANDOUT + STUDIES + ("report",),  # every two-pixel figure, then the report
          "handout": HANDOUT, "studies": STUDIES}


def main():
    args = parse_args()
    device = utils.pick_device(args.device)
    if args.task == "samples":
        return task_samples(args, device)
    import matplotlib
    matplotlib.use("Agg")
    tasks = list(GROUPS.get(args.task, [args.task]))
    # fail before any work if a needed checkpoint is missing or the figures directory is unwritable
    utils.ensure_writable_dir(os.path.join(args.figures, "x"))
    for T in needed_checkpoints(tasks):
        train.load_model(train.default_checkpoint(T, args.checkpoint_dir), T)
    if "schedules" in tasks:
        for T in SWEEP_T:
            train.load_model(train.default_checkpoint(T, os.path.join(args.checkpoint_dir, "linear")), T, schedule="linear")
    if "classifier" in tasks:
        import classifier_guidance
        classifier_guidance.load_classifier(classifier_guidance.default_checkpoint(50, args.checkpoint_dir), 50)
    start = time.perf_counter()
    from tqdm import tqdm
    for task in tqdm(tasks, desc="figures", unit="figure", disable=args.quiet or len(tasks) == 1):
        if args.n is not None and task in SAMPLED_TASKS:
            FIGURE_TASKS[task](args, device, n=args.n)  # a draft with fewer (or more) samples than the figure's own
        else:
            FIGURE_TASKS[task](args, device)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    utils.run_main(main)
