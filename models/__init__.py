"""Small reference architectures for tests, benchmarks and the README.

``REGISTRY`` maps a name to a ``ModelSpec``: ``build()`` returns a deterministic eval-mode
model whose norm layers look trained (calibrated BN running stats, random affines with some
negative scales), and ``example_inputs(batch)`` returns deterministic inputs for it. Every
model builds and runs in well under a second on a laptop CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.decoder import build_decoder, build_decoder1d, decoder1d_inputs, decoder_inputs
from models.hifigan import build_hifigan, hifigan_legacy, mel_inputs
from models.inputs import images
from models.llama import build_llama, llama_inputs
from models.mlp import build_mlp, build_token_mlp, mlp_inputs, token_mlp_inputs
from models.mobilenet import build_mobilenetv2
from models.preact_resnet import build_preact_resnet
from models.resnet import build_resnet
from models.transformer import build_postnorm_transformer, build_prenorm_transformer, token_inputs
from models.unet import build_unet


@dataclass(frozen=True)
class ModelSpec:
    """How to build one reference model and feed it."""

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    description: str


_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "resnet18",
        functools.partial(build_resnet, 18, width=8),
        images,
        "ResNet-18 (BasicBlock), width 8, Conv→BN→ReLU; 32x32 input. Bundled as an example.",
    ),
    ModelSpec(
        "resnet50",
        functools.partial(build_resnet, 50, width=8),
        images,
        "ResNet-50 (Bottleneck), width 8; 32x32 input.",
    ),
    ModelSpec(
        "mobilenetv2",
        build_mobilenetv2,
        images,
        "MobileNetV2 inverted residuals: depthwise convs, ReLU6, BN after every conv.",
    ),
    ModelSpec(
        "preact_resnet",
        build_preact_resnet,
        images,
        "Pre-activation ResNet plus BNs foldable only forward (1x1 conv, replicate padding) "
        "and one before a zero-padded conv that must stay.",
    ),
    ModelSpec(
        "mlp",
        build_mlp,
        mlp_inputs,
        "Linear→BatchNorm1d→ReLU MLP on (B, 32); a bias-free Linear→BN1d(affine=False).",
    ),
    ModelSpec(
        "token_mlp",
        build_token_mlp,
        token_mlp_inputs,
        "Linear on (B, T, C), then BatchNorm1d over C via transpose(1, 2); input (B, 8, 16).",
    ),
    ModelSpec(
        "convtranspose_decoder",
        build_decoder,
        decoder_inputs,
        "ConvTranspose2d→BN2d decoder (grouped, bias-free); input (B, 16, 4, 4).",
    ),
    ModelSpec(
        "convtranspose1d_decoder",
        build_decoder1d,
        decoder1d_inputs,
        "ConvTranspose1d→BN1d decoder (grouped, bias-free); input (B, 16, 8).",
    ),
    ModelSpec(
        "prenorm_transformer",
        build_prenorm_transformer,
        token_inputs,
        "GPT-2-like pre-norm encoder with nn.LayerNorm and a final LN; token ids (B, 16).",
    ),
    ModelSpec(
        "postnorm_transformer",
        build_postnorm_transformer,
        token_inputs,
        "BERT-like post-norm encoder with nn.LayerNorm; token ids (B, 16).",
    ),
    ModelSpec(
        "llama",
        build_llama,
        llama_inputs,
        "Llama-style decoder: hand-written RMSNorm, SwiGLU, RoPE, causal; token ids (B, 16).",
    ),
    ModelSpec(
        "hifigan",
        build_hifigan,
        mel_inputs,
        "HiFi-GAN-style generator, convs weight-normed via parametrizations (not picklable).",
    ),
    ModelSpec(
        "hifigan_legacy",
        hifigan_legacy,
        mel_inputs,
        "The hifigan generator with the deprecated weight_norm hook API (picklable).",
    ),
    ModelSpec(
        "groupnorm_unet",
        build_unet,
        images,
        "U-Net with Conv→GroupNorm→SiLU, strided down, ConvTranspose up, skips; 32x32 input.",
    ),
)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def _spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def build(name: str) -> nn.Module:
    """Build the named reference model (eval mode, deterministic)."""
    return _spec(name).build()


def example_inputs(name: str, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs for the named model, with the given batch size."""
    return _spec(name).example_inputs(batch)


__all__ = ["REGISTRY", "ModelSpec", "build", "example_inputs"]
