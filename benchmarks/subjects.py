"""The models the benchmarks run, and the norm-free limit of each.

Every ``models.REGISTRY`` model that has BatchNorm, plus three real ``transformers`` CNNs
(ResNetModel, MobileNetV2Model, RegNetModel) built offline from small configs, their norm
affines randomized and BN running stats calibrated by a few train-mode batches, as after
training. The *norm-free limit* of a model is the same network with every BN that normsurgeon
folded replaced by ``nn.Identity``: no folding can make the network cheaper than that.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import models
from models.calibrate import prepare, seeded

REGISTRY_WITH_BN = (
    "resnet18", "resnet50", "mobilenetv2", "preact_resnet", "mlp", "token_mlp",
    "convtranspose_decoder", "convtranspose1d_decoder",
)
HF_IMAGE = 64  # transformers CNNs run on 64x64 images


@dataclass(frozen=True)
class Subject:
    """One benchmarked model: how to build it (eval mode, trained-looking) and feed it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    source: str  # "models" or "transformers"


def _registry_subject(name: str) -> Subject:
    return Subject(name, lambda: models.build(name), lambda batch: models.example_inputs(name, batch), "models")


def _hf_images(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    generator = generator or torch.Generator().manual_seed(1234)
    return (torch.randn(batch, 3, HF_IMAGE, HF_IMAGE, generator=generator),)


def _hf_model(kind: str) -> nn.Module:
    import transformers

    if kind == "hf_resnet":
        config = transformers.ResNetConfig(
            embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], layer_type="basic"
        )
        cls = transformers.ResNetModel
    elif kind == "hf_mobilenetv2":
        config = transformers.MobileNetV2Config(depth_multiplier=0.5, image_size=HF_IMAGE)
        cls = transformers.MobileNetV2Model
    else:
        config = transformers.RegNetConfig(
            embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 2, 1], groups_width=16
        )
        cls = transformers.RegNetModel
    config.return_dict = False  # plain tuples: comparable outputs in eager, fx and ONNX
    with seeded(0):
        model = cls(config)
    return prepare(model, lambda g: _hf_images(8, g), seed=0)


def _hf_subject(kind: str) -> Subject:
    return Subject(kind, lambda: _hf_model(kind), _hf_images, "transformers")


def subjects(*, quick: bool = False, include_transformers: bool = True) -> list[Subject]:
    """The benchmark's models; ``quick``: the single smallest one (the smoke test's)."""
    if quick:
        return [_registry_subject("mlp")]
    chosen = [_registry_subject(name) for name in REGISTRY_WITH_BN]
    if include_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            pass
        else:
            chosen += [_hf_subject(kind) for kind in ("hf_resnet", "hf_mobilenetv2", "hf_regnet")]
    return chosen


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm modules still in ``model`` (each counted once)."""
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def called_batchnorms(graph_module: torch.fx.GraphModule) -> int:
    """BatchNorm modules an fx GraphModule still calls."""
    modules = dict(graph_module.named_modules())
    targets = {
        node.target for node in graph_module.graph.nodes
        if node.op == "call_module" and isinstance(modules.get(node.target), _BatchNorm)
    }
    return len(targets)


def norm_free_limit(model: nn.Module, folded_paths: list[str]) -> nn.Module:
    """A copy of ``model`` with the BNs at ``folded_paths`` replaced by ``nn.Identity``."""
    limit = copy.deepcopy(model)
    for path in folded_paths:
        limit.set_submodule(path, nn.Identity())
    return limit.eval()


BIAS_VALUE = 1e-3  # not zero: torch.onnx's optimizer drops a Conv bias that is all zeros


def with_biases(model: nn.Module, paths: list[str]) -> nn.Module:
    """A copy of ``model`` where the layers at ``paths`` that have no bias get one (every entry 1e-3).

    Folding a BN into a bias-free conv must add a bias; this is the cheapest net any fold can
    produce (the norm-free limit plus those biases), which tells the bias's cost from the fold's.
    The value only has to survive export: a zero bias is removed by ``torch.onnx.export``'s
    optimizer, which made the ONNX *limit + biases* the bare limit again.
    """
    biased = copy.deepcopy(model)
    for path in set(paths):
        layer = biased.get_submodule(path)
        if getattr(layer, "bias", "absent") is None:
            size = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
            layer.bias = nn.Parameter(torch.full((size,), BIAS_VALUE, dtype=layer.weight.dtype), requires_grad=False)
    return biased


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each tensor counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def flat_outputs(outputs) -> list[torch.Tensor]:
    """The tensors of a model's output, in pytree order."""
    leaves, _ = torch.utils._pytree.tree_flatten(outputs)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def max_rel_diff(expected, got) -> float:
    """max |got - expected| / max |expected| over all output tensors (inf when shapes differ)."""
    worst = 0.0
    for e, g in zip(flat_outputs(expected), flat_outputs(got), strict=True):
        e, g = torch.as_tensor(e).float(), torch.as_tensor(g).float()
        if e.shape != g.shape:
            return float("inf")
        worst = max(worst, float((g - e).abs().max() / e.abs().max().clamp_min(1e-12)))
    return worst
