"""The two-block conditional 1-D UNet that predicts the noise in a two-pixel image, as the handout specifies it.

Shapes: x_t (B, 1, 2) (one channel, two pixels), t int64 (B,) step indices in [0, T-1],
y int64 (B,) labels with NULL_LABEL (-1) for "no label", or None for no labels at all.
Output: the predicted noise, (B, 1, 2).

    x_t (B,1,2) -- enc1: Conv1d k=2 -> (B,c1,1) -- enc2: Conv1d k=1 -> (B,c2,1)
                                 |                                 |
                                 |            dec1: ConvTranspose1d k=1 -> (B,c1,1)
                                 +---- concat ----+
                                       dec2: ConvTranspose1d k=2 -> (B,1,2) = eps_pred

Every block but the last adds a Dense projection of the embedding (step + class) to its
features, then GroupNorm (4, 32, 4 groups) and SiLU. The handout gives the last layer
kernel 1, but after enc1 the sequence has length 1 and a kernel-1 transposed convolution
keeps length 1; kernel 2 is the smallest change that returns to two pixels
(output length = (1 - 1) * stride + kernel = 2), and it mirrors enc1.
"""
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from utils import NULL_LABEL


class GaussianFourierProjection(nn.Module):
    """[sin(2 pi w_i s), cos(2 pi w_i s)]_i with w_i ~ N(0, scale^2) fixed at init (Tancik et al.
    2020), for a time s in (0, 1]. The weights are a buffer, so they are saved but never trained."""

    def __init__(self, dim, scale):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, s):
        proj = 2 * math.pi * s[:, None] * self.W[None, :]
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class StepAndClassEmbedding(nn.Module):
    """emb(t, y) = SiLU(Linear(Fourier((t + 1) / T)) + Linear(onehot(y))); a NULL_LABEL gives the zero one-hot.

    The step index t in [0, T-1] is mapped to the time s = (t + 1) / T in (0, 1], so the
    embedding scale means the same thing whatever T is. With layers > 1, each further layer
    is emb <- SiLU(Linear(emb)), so that step and class can combine in more than one sum.
    """

    def __init__(self, T, dim, num_classes, fourier_scale, layers=1):
        super().__init__()
        self.T, self.num_classes = T, num_classes
        self.fourier = GaussianFourierProjection(dim, fourier_scale)
        self.time_proj = nn.Linear(dim, dim)
        self.class_proj = nn.Linear(num_classes, dim, bias=False)
        self.hidden = nn.ModuleList([nn.Linear(dim, dim) for _ in range(layers - 1)])

    def forward(self, t, y):
        emb = self.time_proj(self.fourier((t.float() + 1) / self.T))
        if y is not None:
            onehot = nn.functional.one_hot(y.clamp(min=0), self.num_classes).float()
            onehot = onehot * (y != NULL_LABEL).float()[:, None]
            emb = emb + self.class_proj(onehot)
        emb = nn.functional.silu(emb)
        for layer in self.hidden:
            emb = nn.functional.silu(layer(emb))
        return emb


@dataclass
class TwoPixelUNetConfig:
    """Everything needed to rebuild the network; stored inside every checkpoint."""
    T: int = 50                 # number of diffusion steps (to turn step indices into times)
    num_classes: int = 2
    channels: tuple = (64, 128)  # features of encoding 1 and encoding 2
    embed_dim: int = 128
    fourier_scale: float = 4.0  # std of the Fourier frequencies w_i, for times in (0, 1]
    data_mean: float = 0.5      # input preconditioning: x_t is centred on sqrt(abar) * data_mean ...
    data_std: float = 0.25      # ... and divided by its std sqrt(abar * data_std^2 + 1 - abar)


def precondition(x_t, abar, data_mean, data_std):
    """Input preconditioning: x_t at about zero mean and unit scale at every step, for data of
    the given mean and std per pixel: (x_t - sqrt(abar) mean) / sqrt(abar std^2 + 1 - abar)."""
    return (x_t - abar.sqrt() * data_mean) / (abar * data_std**2 + 1 - abar).sqrt()


class TwoPixelUNet(nn.Module):
    """The conditional two-block UNet of the handout. See the module docstring for the layout."""

    def __init__(self, config: TwoPixelUNetConfig, alphas_cumprod):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        d = config.embed_dim
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float32))
        self.embed = StepAndClassEmbedding(config.T, d, config.num_classes, config.fourier_scale)
        # Encoding 1: Conv1d kernel 2 + Dense + GroupNorm(4)
        self.conv1 = nn.Conv1d(1, c1, kernel_size=2, bias=False)
        self.dense1 = nn.Linear(d, c1)
        self.norm1 = nn.GroupNorm(4, c1)
        # Encoding 2: Conv1d kernel 1 + Dense + GroupNorm(32)
        self.conv2 = nn.Conv1d(c1, c2, kernel_size=1, bias=False)
        self.dense2 = nn.Linear(d, c2)
        self.norm2 = nn.GroupNorm(32, c2)
        # Decoding 1: ConvTranspose1d kernel 1 + Dense + GroupNorm(4)
        self.tconv2 = nn.ConvTranspose1d(c2, c1, kernel_size=1, bias=False)
        self.dense3 = nn.Linear(d, c1)
        self.norm3 = nn.GroupNorm(4, c1)
        # Decoding 2: ConvTranspose1d kernel 2 (length 1 -> 2) on [decoding 1, encoding 1]
        self.tconv1 = nn.ConvTranspose1d(2 * c1, 1, kernel_size=2)
        self.act = nn.SiLU()

    def embeddings(self, t, y):
        """The step-and-class embedding and its three Dense projections, one per block.

        They depend on (t, y) only, and a batch holds few distinct pairs (during sampling,
        one or two), so they are computed once per distinct pair and then gathered.
        """
        key = t * (self.config.num_classes + 1) + (0 if y is None else y + 1)
        key, index = torch.unique(key, return_inverse=True)
        t_u = key // (self.config.num_classes + 1)
        y_u = None if y is None else key % (self.config.num_classes + 1) - 1
        emb = self.embed(t_u, y_u)
        if not torch.is_grad_enabled():
            return [dense(emb)[index] for dense in (self.dense1, self.dense2, self.dense3)]
        # In training, gather each sample's row as a product with a one-hot matrix rather than
        # by indexing: the same values, but the backward pass is a matrix product, which sums
        # in a fixed order, whereas indexing's backward adds rows in whatever order the threads
        # reach them, and training would then differ between runs in the last bits.
        pick = nn.functional.one_hot(index, len(key)).to(emb.dtype)  # (B, distinct pairs)
        return [pick @ dense(emb) for dense in (self.dense1, self.dense2, self.dense3)]

    def forward(self, x_t, t, y=None):
        """The layers above in order. On these lengths every convolution is a single matrix product
        (conv1's kernel covers both pixels; the kernel-1 layers see length 1), so each is computed
        as that product with the layer's own weights: the same function as calling the layers (a
        test checks), and training about 1.16 times faster on a CPU than through the
        convolution routines. Features are (B, channels) inside, the length-1 axis dropped."""
        cfg = self.config
        e1, e2, e3 = self.embeddings(t, y)
        h = precondition(x_t, self.alphas_cumprod[t][:, None, None], cfg.data_mean, cfg.data_std)[:, 0]  # (B, 2)
        h1 = self.act(self.norm1(h @ self.conv1.weight[:, 0].T + e1))  # conv1, weight (c1, 1, 2)
        h2 = self.act(self.norm2(h1 @ self.conv2.weight[..., 0].T + e2))  # conv2, weight (c2, c1, 1)
        h = self.act(self.norm3(h2 @ self.tconv2.weight[..., 0] + e3))  # tconv2, weight (c2, c1, 1)
        out = torch.cat([h, h1], dim=1) @ self.tconv1.weight[:, 0] + self.tconv1.bias  # tconv1, weight (2 c1, 1, 2)
        return out[:, None]  # (B, 1, 2)


def build_model(config_dict, alphas_cumprod):
    """Rebuild a TwoPixelUNet from the plain dict stored in a checkpoint."""
    config = dict(config_dict)
    config["channels"] = tuple(config["channels"])
    return TwoPixelUNet(TwoPixelUNetConfig(**config), alphas_cumprod)


def config_to_dict(config):
    """A plain dict of the config (tuples as lists), safe for torch.load(weights_only=True)."""
    d = asdict(config)
    d["channels"] = list(d["channels"])
    return d
