"""Weight standardization (timm ``StdConv2d``, ``ScaledStdConv2d``, NFNets, BiT), recognised by behaviour.

Such a conv standardizes its weight at every forward: each output channel's weights are centred and
divided by their standard deviation over the channel's fan-in, and may then be scaled (NFNets'
gain γ and scale s):

    ŵ[o] = γ[o]·s · (w[o] − mean(w[o])) / sqrt(var(w[o]) + eps)

At test time ŵ is a constant, so a plain conv with ŵ as its weight computes the same thing, bit for
bit: ŵ is the very tensor the layer hands to the convolution. It is recognised by what the layer
does, not by its class: a conv subclass whose ``forward()`` is not torch's runs on a small random
input while the convolution it calls is recorded. It is weight-standardized when that convolution's
weight is, per output channel, a multiple of the layer's own weight centred over the fan-in. It can
be replaced by a plain conv when, besides, the convolution reads the layer's input as it is, its
result is what the layer returns, and the weight is the same on a second input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .surgery import eval_mode
from .trace import function_name

_PLAIN_CONVS: dict[str, type[nn.modules.conv._ConvNd]] = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
_TORCH_FORWARDS = frozenset(cls.forward for cls in _PLAIN_CONVS.values())
_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
# max |ŵ - a·(w - mean w)| per channel, relative to max |ŵ|: the rounding of the layer's own arithmetic
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True, eq=False)
class StandardizedConv:
    """A weight-standardized conv: the plain conv that computes the same, or why none can (``why_not``)."""

    module: nn.Module
    conv_type: type[nn.modules.conv._ConvNd]
    weight: torch.Tensor  # ŵ, as the layer computed it
    bias: torch.Tensor | None
    options: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, groups of its conv call
    why_not: str = ""
    probe: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, the layer's output) of the probe

    def describe(self) -> str:
        """``ScaledStdConv2d (weight standardized at every forward)``."""
        return f"{type(self.module).__name__} (weight standardized at every forward)"

    def build(self) -> nn.Module:
        """A plain ``nn.Conv1d/2d/3d`` with ŵ as its weight and the layer's bias, trainable as the layer was."""
        weight, options = self.weight, self.options
        conv = self.conv_type(weight.shape[1] * options["groups"], weight.shape[0], tuple(weight.shape[2:]),
                              bias=self.bias is not None, device=weight.device, dtype=weight.dtype, **options)
        trainable = any(p.requires_grad for p in self.module.parameters())
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.requires_grad_(trainable)
        return conv.train(self.module.training)


def find_standardization(module: nn.Module) -> StandardizedConv | None:
    """The module's :class:`StandardizedConv` when it is a weight-standardized conv, else None."""
    if not _is_candidate(module):
        return None
    x = _probe_input(module, seed=0)
    calls, output = _conv_calls(module, x)
    if len(calls) != 1:
        return None
    conv_type, arguments, result = calls[0]
    weight = arguments["weight"]
    if weight is module.weight or not _is_standardized(module.weight, weight):
        return None
    options = {name: arguments[name] for name in ("stride", "padding", "dilation", "groups")}
    weight, bias = weight.detach().clone(), _detached(arguments["bias"])
    why_not = _why_not_plain(module, x, arguments, result is output, weight, bias)
    return StandardizedConv(module, conv_type, weight, bias, options, why_not, None if why_not else (x, output))


def _is_candidate(module: nn.Module) -> bool:
    """A conv (not transposed) whose forward() is its own, with a plain floating-point weight."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed or type(module).forward in _TORCH_FORWARDS:
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta:
        return False
    weight_normed = hasattr(module, "weight_g") and hasattr(module, "weight_v")  # the hook API: a weight, not a conv
    return not parametrize.is_parametrized(module) and not weight_normed


def _probe_input(module: nn.modules.conv._ConvNd, *, seed: int) -> torch.Tensor:
    """One random sample just larger than the kernel's reach plus one stride, in the layer's dtype."""
    spatial = [d * (k - 1) + s + 2 for k, s, d in zip(module.kernel_size, module.stride, module.dilation)]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, module.in_channels, *spatial, generator=generator, dtype=torch.float64)
    return x.to(device=module.weight.device, dtype=module.weight.dtype)


class _ConvCalls(TorchFunctionMode):
    """Records every conv1d/2d/3d call: (the plain conv type, its arguments by name, its result)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[type[nn.modules.conv._ConvNd], dict[str, Any], Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        conv_type = _PLAIN_CONVS.get(function_name(func))
        if conv_type is not None:
            self.calls.append((conv_type, {**_CONV_DEFAULTS, **dict(zip(_CONV_ARGUMENTS, args)), **kwargs}, result))
        return result


def _conv_calls(module: nn.Module, x: torch.Tensor) -> tuple[list, Any]:
    """The conv calls of one forward() on ``x`` (its hooks not run, in eval mode), and what it returned."""
    recorder = _ConvCalls()
    try:
        with eval_mode(module), torch.no_grad(), recorder:
            output = module.forward(x)
    except Exception:  # a layer that cannot run on a plain sample is not one we can recognise
        return [], None
    return recorder.calls, output


def _is_standardized(weight: torch.Tensor, used: torch.Tensor) -> bool:
    """``used`` is, per output channel, a multiple of ``weight`` centred over the channel's fan-in."""
    if not isinstance(used, torch.Tensor) or used.shape != weight.shape or not used.is_floating_point():
        return False
    w, u = weight.detach().double().flatten(1), used.detach().double().flatten(1)
    centred = w - w.mean(dim=1, keepdim=True)
    power = (centred * centred).sum(dim=1)
    scale = torch.where(power > 0, (u * centred).sum(dim=1) / power.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    residual = (u - scale[:, None] * centred).abs().max()
    return bool(residual <= _TOLERANCE.get(used.dtype, 1e-4) * u.abs().max().clamp_min(1e-30))


def _why_not_plain(module: nn.Module, x: torch.Tensor, arguments: dict[str, Any], returns_the_conv: bool,
                   weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """Why a plain conv with ŵ cannot stand in for this weight-standardized layer ('' when it can)."""
    if arguments["input"] is not x:
        return ("it changes its input before the convolution (e.g. TF-style 'same' padding computed from the "
                "input's size): a plain conv cannot stand in for it")
    if not returns_the_conv:
        return "it changes the convolution's output before returning it: a plain conv cannot stand in for it"
    again, _ = _conv_calls(module, _probe_input(module, seed=1))
    if len(again) != 1 or not torch.equal(again[0][1]["weight"], weight):
        return "the weight it convolves with depends on its input: it cannot be baked"
    other = again[0][1]["bias"]
    if (other is None) != (bias is None) or (other is not None and not torch.equal(other, bias)):
        return "the bias it adds depends on its input: it cannot be baked"
    return ""


def _detached(tensor: Any) -> torch.Tensor | None:
    return tensor.detach().clone() if isinstance(tensor, torch.Tensor) else None
