"""A short training run learns: its validation loss falls toward the oracle floor."""
import argparse

import torch

import train


def test_tiny_training_run_lowers_the_validation_loss(tmp_path):
    args = train.parse_args(["--T", "10", "--steps", "300", "--batch-size", "256", "--channels", "16", "32",
                             "--log-every", "50", "--quiet", "--out", str(tmp_path / "m.pt")])
    path = train.train_one(10, args, torch.device("cpu"))
    ckpt = torch.load(path, weights_only=True)
    meta = ckpt["train"]
    val = meta["record"]["val_loss"]
    floor = meta["oracle_val_loss"]
    # untrained network for reference: same seed, same architecture
    model, diffusion, _ = train.load_model(path)
    torch.manual_seed(args.seed)
    fresh = train.ddpm.build_model(ckpt["model_config"], diffusion.alphas_cumprod)
    data, _ = train.validation_set(diffusion, train.TwoPixelGMM())
    untrained = train.validation_loss(fresh, data)
    assert val[-1] < 0.5 * untrained
    assert val[-1] < val[0]
    assert val[-1] - floor < 0.25 * (untrained - floor)
