"""Small modules normsurgeon puts into users' models."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """y = x * weight + bias per channel along ``channel_dim``: a test-time BatchNorm with no stats."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, channel_dim={self.channel_dim}"


class MeanOnlyBatchNorm(nn.Module):
    """Mean-only BatchNorm (Salimans & Kingma 2016): y = x - mean_c + bias_c, no division.

    Channels are dim 1, as in BatchNorm. In training it subtracts the per-channel batch mean
    and updates ``running_mean`` like BatchNorm (``momentum=None``: cumulative average); in
    eval it subtracts ``running_mean``. Paired with weight norm, whose ``g`` carries the scale.
    Exports to ONNX as a plain Sub and Add.
    """

    def __init__(self, num_features: int, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[1] = -1
        if self.training:
            reduced = [0] + list(range(2, x.dim()))  # every dim but the channels (TorchScript: no comprehension ifs)
            mean = x.mean(dim=reduced)
            self._track(mean)
        else:
            mean = self.running_mean
        return x - mean.view(shape) + self.bias.view(shape)

    def _track(self, batch_mean: torch.Tensor) -> None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum
            factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
            self.running_mean.lerp_(batch_mean.detach().to(self.running_mean.dtype), factor)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"


class FrozenBatchNorm(nn.Module):
    """Test-time BatchNorm whose statistics and affine are buffers: nothing in it trains.

    Normalizes over channel dim 1 of an input of any rank >= 2 with ``F.batch_norm(training=False)``,
    so it computes exactly what an eval-mode ``nn.BatchNorm*d`` computes, in train mode too, and
    exports as an ONNX BatchNormalization (which exporters fold). Its tensors have the names of a
    BatchNorm's, so a BatchNorm state_dict loads into it (``num_batches_tracked`` is dropped).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        training=False, momentum=0.0, eps=self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over channel dim 1 of (N, C, ...) inputs: moves C last, runs torch's layer_norm,
    moves it back (as ConvNeXt's channels_first LayerNorm; exports as Transpose+LayerNormalization).

    It is an ``nn.LayerNorm`` (``weight``/``bias`` of size C), so state_dicts stay compatible.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = True,
                 *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class _BiasAddedAfterConvTranspose:
    """Mixin: in eager mode, run the transposed conv without its bias and add the bias after.

    torch's CPU ConvTranspose (oneDNN deconvolution) applies a bias slowly for many grouped
    shapes: ``benchmarks/`` measured a grouped ConvTranspose2d 2.2x slower with a bias than
    without, and a separate add at 1.1x. Under ``torch.export`` / ``torch.onnx.export`` the layer
    is the plain op with its bias, so exported graphs keep one node. Same parameters and
    state_dict keys as the torch class; ``isinstance`` checks against it still hold; it can be
    scripted (TorchScript) and traced.
    """

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        dims = len(self.kernel_size)
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation
        )
        bias = self.bias
        if bias is None or _exporting():
            return _conv_transpose(input, self.weight, bias, self.stride, self.padding, output_padding, self.groups,
                                   self.dilation, dims)
        out = _conv_transpose(input, self.weight, None, self.stride, self.padding, output_padding, self.groups,
                              self.dilation, dims)
        return out + bias.view([-1] + [1] * dims)


def _exporting() -> bool:
    if torch.jit.is_scripting():
        return False
    else:
        return torch.compiler.is_exporting()


def _conv_transpose(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
                    padding: list[int], output_padding: list[int], groups: int, dilation: list[int],
                    dims: int) -> torch.Tensor:
    if dims == 1:
        return nn.functional.conv_transpose1d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    if dims == 2:
        return nn.functional.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return nn.functional.conv_transpose3d(input, weight, bias, stride, padding, output_padding, groups, dilation)


class BiasAfterConvTranspose1d(_BiasAddedAfterConvTranspose, nn.ConvTranspose1d):
    """ConvTranspose1d that adds its bias after the convolution in eager mode (see the mixin)."""


class BiasAfterConvTranspose2d(_BiasAddedAfterConvTranspose, nn.ConvTranspose2d):
    """ConvTranspose2d that adds its bias after the convolution in eager mode (see the mixin)."""


class BiasAfterConvTranspose3d(_BiasAddedAfterConvTranspose, nn.ConvTranspose3d):
    """ConvTranspose3d that adds its bias after the convolution in eager mode (see the mixin)."""


BIAS_AFTER_CONV_TRANSPOSE: dict[type[nn.Module], type[nn.Module]] = {
    nn.ConvTranspose1d: BiasAfterConvTranspose1d,
    nn.ConvTranspose2d: BiasAfterConvTranspose2d,
    nn.ConvTranspose3d: BiasAfterConvTranspose3d,
}
