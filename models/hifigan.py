"""A HiFi-GAN-style generator (Kong et al. 2020) with weight-normed convolutions.

Conv1d pre → [LeakyReLU → ConvTranspose1d upsample → mean of residual blocks of dilated
Conv1d with LeakyReLU] → LeakyReLU → Conv1d post → tanh. Every conv carries weight norm
w = g · v / ‖v‖ with torch's default ``dim=0``, exactly as HiFi-GAN applies it — for
ConvTranspose1d, whose weight is (in, out, k), that normalizes per *input* channel, not per
output channel; weight-norm removal must respect the dim it finds.

``build_hifigan`` uses ``torch.nn.utils.parametrizations.weight_norm``: such a module
cannot be pickled with ``torch.save(model)`` (it travels as a state_dict).
``hifigan_legacy`` uses the deprecated hook API ``torch.nn.utils.weight_norm``
(``weight_g``/``weight_v``), which pickles. Both give identical outputs for the same seed.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from models.calibrate import seeded
from models.inputs import features

LRELU_SLOPE = 0.1


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1: per dilation, x + conv2(lrelu(conv1_dilated(lrelu(x))))."""

    def __init__(self, ch: int, kernel: int, dilations: tuple[int, ...] = (1, 3)) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(ch, ch, kernel, dilation=d, padding=d * (kernel - 1) // 2) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(ch, ch, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(F.leaky_relu(x, LRELU_SLOPE))
            x = x + c2(F.leaky_relu(xt, LRELU_SLOPE))
        return x


class Generator(nn.Module):
    """(B, n_mels, T) mel-like frames → (B, 1, T · prod(upsample_rates)) waveform in [-1, 1]."""

    def __init__(
        self,
        n_mels: int = 8,
        ch: int = 32,
        upsample_rates: tuple[int, ...] = (2, 2),
        resblock_kernels: tuple[int, ...] = (3, 5),
    ) -> None:
        super().__init__()
        self.conv_pre = nn.Conv1d(n_mels, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, rate in enumerate(upsample_rates):
            in_ch, out_ch = ch // 2**i, ch // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(in_ch, out_ch, 2 * rate, rate, rate // 2))
            self.resblocks.extend(ResBlock(out_ch, k) for k in resblock_kernels)
        self.num_kernels = len(resblock_kernels)
        self.conv_post = nn.Conv1d(ch // 2 ** len(upsample_rates), 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


def mel_inputs(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    """A (batch, 8, 16) mel-spectrogram-like tensor."""
    return features(batch, 8, 16, generator=generator)


def _convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]


def _build(seed: int, *, legacy: bool) -> Generator:
    with seeded(seed):
        model = Generator()
    generator = torch.Generator().manual_seed(seed)
    for conv in _convs(model):
        if legacy:
            with warnings.catch_warnings():  # the hook API is deprecated; using it is the point
                warnings.simplefilter("ignore", FutureWarning)
                nn.utils.weight_norm(conv)
            g = conv.weight_g
        else:
            parametrizations.weight_norm(conv)
            g = conv.parametrizations.weight.original0
        with torch.no_grad():  # g ≠ ‖v‖, so dropping g when removing weight norm is caught
            g.mul_(torch.rand(g.shape, generator=generator) + 0.5)
    model.eval()
    if legacy:
        # The hook API caches ``weight`` as a plain attribute, computed with grad when
        # weight_norm() ran (so the module cannot be deepcopied, see pytorch#103001) and
        # stale after g changed. One no-grad forward, as after inference, refreshes it.
        with torch.no_grad():
            model(*mel_inputs(1))
    return model


def build_hifigan(*, seed: int = 0) -> Generator:
    """Eval-mode generator, convs weight-normed with ``nn.utils.parametrizations.weight_norm``."""
    return _build(seed, legacy=False)


def hifigan_legacy(*, seed: int = 0) -> Generator:
    """The same generator with the deprecated hook API ``nn.utils.weight_norm``; picklable."""
    return _build(seed, legacy=True)
