"""The pure tensor maths of folding a per-channel affine map into a conv or linear layer.

Test-time BatchNorm is an affine map per channel c:

    BN(x)_c = (x_c - mean_c) / sqrt(var_c + eps) * gamma_c + beta_c = s_c * x_c + t_c,
    s = gamma / sqrt(var + eps),   t = beta - mean * s.

Folded into the layer that *produces* x (conv, conv-transpose, linear; W' and b' per output channel):

    W'[c, ...] = W[c, ...] * s_c,   b' = b * s + t.

Folded into the layer that *consumes* BN(x) (conv without zero padding, linear), per input channel:

    W'[o, c, ...] = W[o, c, ...] * s_c,   b'_o = b_o + sum_{c, k} W[o, c, k] * t_c.

Weights are laid out (rows, cols, *kernel); the channel a factor applies to is either the row
(``channel_dim=0``) or, for grouped layouts, ``group(row) * cols + col`` (``channel_dim=1``):
that covers a conv's output (0) and input (1) channels, a conv-transpose's output channels (1),
and a linear's output (0) and input (1) features. All arithmetic is float64, cast back once,
and done in row chunks (32K elements) so the extra memory stays small however large the weight.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 15  # 256 KiB of float64 per chunk: peak extra memory stays tiny


def batchnorm_scale_shift(
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (s, t) of test-time BatchNorm as float64 vectors; missing affine means gamma=1, beta=0."""
    s = torch.rsqrt(var.detach().double() + eps)
    if weight is not None:
        s = s * weight.detach().double()
    t = -mean.detach().double() * s
    if bias is not None:
        t = t + bias.detach().double()
    return s, t


def channel_factors(
    factor: torch.Tensor, weight_shape: torch.Size, rows: slice, *, channel_dim: int, groups: int = 1
) -> torch.Tensor:
    """``factor`` (one value per channel) arranged to broadcast against ``weight[rows]``."""
    kernel_dims = len(weight_shape) - 2
    if channel_dim == 0:
        return factor[rows].reshape(-1, *([1] * (len(weight_shape) - 1)))
    rows_per_group = weight_shape[0] // groups
    group = torch.arange(rows.start, rows.stop, device=factor.device) // rows_per_group
    per_row = factor.reshape(groups, weight_shape[1])[group]
    return per_row.reshape(*per_row.shape, *([1] * kernel_dims))


def _row_chunks(weight: torch.Tensor) -> list[slice]:
    rows = weight.shape[0]
    per_row = max(1, weight[0].numel()) if rows else 1
    step = max(1, _CHUNK_ELEMENTS // per_row)
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def scale_channels_(weight: torch.Tensor, scale: torch.Tensor, *, channel_dim: int, groups: int = 1) -> None:
    """In place: multiply each weight element by the scale of its channel (float64, cast back)."""
    with torch.no_grad():
        for rows in _row_chunks(weight):
            factor = channel_factors(scale, weight.shape, rows, channel_dim=channel_dim, groups=groups)
            chunk = weight[rows]
            chunk.copy_(chunk.double().mul_(factor.to(chunk.device)))  # float64 weights: in place


def input_shift_contribution(weight: torch.Tensor, shift: torch.Tensor, *, groups: int = 1) -> torch.Tensor:
    """Per output row o: sum over input channels c and kernel taps of W[o, c, ...] * shift_c (float64)."""
    parts = []
    with torch.no_grad():
        for rows in _row_chunks(weight):
            factor = channel_factors(shift, weight.shape, rows, channel_dim=1, groups=groups)
            chunk = weight[rows].to(torch.float64, copy=True).mul_(factor.to(weight.device))
            parts.append(chunk.reshape(chunk.shape[0], -1).sum(dim=1))
    return torch.cat(parts) if parts else weight.new_zeros(0, dtype=torch.float64)


# ------------------------------------------------------------------------------- merging conv kernels
# Parallel convs of one input, summed, are one conv (structural reparameterization, RepVGG):
#     sum_i conv(x, W_i, b_i) = conv(x, sum_i W_i', sum_i b_i)
# when they share stride and dilation and their kernels line up once zero-padded to a common size
# (:func:`pad_kernel`), and each is written with the common number of groups (:func:`regroup_kernel`).


def regroup_kernel(weight: torch.Tensor, groups: int, to_groups: int) -> torch.Tensor:
    """The kernel of a conv with ``groups`` groups, written for ``to_groups`` groups (a divisor of ``groups``).

    ``weight`` is (out, in / groups, *kernel); the result is (out, in / to_groups, *kernel) with zeros
    where an output channel did not read an input channel. Exact.
    """
    if groups % to_groups:
        raise ValueError(f"{to_groups} groups cannot hold a conv with {groups} groups")
    if to_groups == groups:
        return weight
    out_channels, per_group, *kernel = weight.shape
    columns = per_group * groups // to_groups
    rows = torch.arange(out_channels, device=weight.device)
    source = rows // (out_channels // groups)  # the input block each output channel reads
    target = rows // (out_channels // to_groups)  # the input block it is written into
    channel = target[:, None] * columns + torch.arange(columns, device=weight.device)[None, :]
    local = channel - source[:, None] * per_group
    inside = (local >= 0) & (local < per_group)
    spread = (out_channels, columns, *([1] * len(kernel)))
    index = local.clamp(0, per_group - 1).reshape(spread).expand(out_channels, columns, *kernel)
    return weight.gather(1, index) * inside.reshape(spread).to(weight.dtype)


def pad_kernel(weight: torch.Tensor, pads: tuple[int, ...]) -> torch.Tensor:
    """``weight`` (out, in, *kernel) with ``pads[d]`` zero taps on both sides of spatial dim ``d``."""
    flat = [p for pad in reversed(pads) for p in (pad, pad)]  # F.pad lists the last dim first
    return torch.nn.functional.pad(weight, flat) if any(pads) else weight
