"""A short training run learns: its validation loss falls toward the oracle floor."""
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


def test_the_same_seed_trains_the_same_weights(tmp_path):
    # a full-size batch, so that the CPU kernels run on several threads
    weights = []
    for name in ("a", "b"):
        args = train.parse_args(["--T", "5", "--steps", "20", "--batch-size", "1024", "--quiet",
                                 "--out", str(tmp_path / f"{name}.pt")])
        weights.append(torch.load(train.train_one(5, args, torch.device("cpu")), weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
