"""What a bias costs in torch's CPU layers: the part of the eager gap to the limit no fold can close.

A BN folded into a bias-free layer leaves its shift as that layer's bias. For layers shaped like
those in ``models/`` this times, interleaved, the layer without a bias (baseline), with one, and
without one followed by a separate broadcast add.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from benchmarks.timing import interleaved

# (label, layer without bias, input shape)
PROBES = (
    ("Conv2d 8→8 3×3, 1×8×32×32", lambda: nn.Conv2d(8, 8, 3, padding=1, bias=False), (1, 8, 32, 32)),
    ("Conv2d 8→8 3×3, 8×8×32×32", lambda: nn.Conv2d(8, 8, 3, padding=1, bias=False), (8, 8, 32, 32)),
    ("depthwise Conv2d 32 3×3, 1×32×16×16", lambda: nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
     (1, 32, 16, 16)),
    ("ConvTranspose2d 32→32 4×4 s2, groups 4, 8×32×8×8",
     lambda: nn.ConvTranspose2d(32, 32, 4, 2, 1, groups=4, bias=False), (8, 32, 8, 8)),
    ("ConvTranspose2d 32→32 4×4 s2, groups 1, 8×32×8×8",
     lambda: nn.ConvTranspose2d(32, 32, 4, 2, 1, bias=False), (8, 32, 8, 8)),
    ("Linear 32→64, 1×32", lambda: nn.Linear(32, 64, bias=False), (1, 32)),
)


def run_bias_cost(*, rounds: int, min_block_s: float, quick: bool = False) -> list[dict]:
    """One row per layer: ratios of 'with bias' and 'no bias + add' to 'no bias'."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for label, make, shape in PROBES[:1] if quick else PROBES:
        plain = make().eval()
        biased = copy.deepcopy(plain)
        channels = plain.out_channels if hasattr(plain, "out_channels") else plain.out_features
        biased.bias = nn.Parameter(torch.randn(channels, generator=generator), requires_grad=False)
        x = torch.randn(*shape, generator=generator)
        shift = biased.bias.detach().reshape(-1, *([1] * (len(shape) - 2))) if len(shape) > 2 else biased.bias.detach()
        with torch.inference_mode():
            timings = interleaved(
                {
                    "no_bias": lambda p=plain, x=x: p(x),
                    "bias": lambda b=biased, x=x: b(x),
                    "no_bias_add": lambda p=plain, x=x, s=shift: p(x) + s,
                },
                baseline="no_bias", rounds=rounds, min_block_s=min_block_s,
            )
        rows.append({"layer": label, **{name: t.to_dict() for name, t in timings.items()}})
        print(f"  bias {label}: bias {timings['bias'].ratio:.3f}, add {timings['no_bias_add'].ratio:.3f}", flush=True)
    return rows
