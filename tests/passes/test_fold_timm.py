"""``fold`` on real timm CV models (random weights, realistic BatchNorm statistics).

timm builds most of its CNNs from ``BatchNormAct2d`` (a BatchNorm with its activation inside) and
its deployable ones from multi-branch blocks (RepVGG, MobileOne, FastViT). ``fold`` merges the
branches (reparameterize), folds every BatchNorm it can (the activation stays in the norm's place),
and must leave no more BatchNorm-like modules than timm's own ``reparameterize_model`` (which calls
each block's ``fuse()``/``reparameterize()``; a model without one keeps every BN there).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normsurgeon.norms import is_batchnorm_like
from normsurgeon.passes.fold_batchnorm import batchnorms_left, fold_batchnorm
from tests.helpers import give_realistic_stats

TOLERANCE = 1e-4  # max |folded - original| relative to max |original|, on inputs the fold never saw
SHAPE = (2, 3, 64, 64)  # the smallest square input all these models take

FAST = ["efficientnet_b0", "mobilenetv3_large_100", "regnety_002", "cs3darknet_s", "mobileone_s0", "fastvit_t8"]
HEAVY = ["resnetv2_50", "densenet121", "repvgg_a0"]


def _bns(model: nn.Module) -> int:
    return sum(is_batchnorm_like(m) for m in model.modules())


def _relative_error(original: nn.Module, folded: nn.Module) -> float:
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = original(x), folded(x)
    return ((got - want).abs().max() / want.abs().max()).item()


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A timm model with random weights and realistic BN statistics, and its example input."""
    import timm  # after normsurgeon, which lets torchvision (imported by timm) load beside the CPU torch

    x = torch.randn(*SHAPE)
    return give_realistic_stats(timm.create_model(name, pretrained=False), x), x


def _check_fold(name: str, *, frozen: bool = False) -> None:
    from timm.layers import freeze_batch_norm_2d
    from timm.utils.model import reparameterize_model

    model, x = _build(name)
    if frozen:
        model = freeze_batch_norm_2d(model).eval()  # BatchNormAct2d -> FrozenBatchNormAct2d
    by_timm = _bns(reparameterize_model(copy.deepcopy(model)))

    report = fold_batchnorm(model, (x,), inplace=False)

    assert report.passed and report.pass_name == "fold"
    left = _bns(report.model)
    assert left == len(batchnorms_left(report)) and left <= by_timm and left < _bns(model), (name, report.skipped)
    assert _relative_error(model, report.model) < TOLERANCE


@pytest.mark.parametrize("name", FAST)
def test_timm_model_folds_to_no_more_batchnorms_than_timm_leaves(name: str) -> None:
    _check_fold(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_heavier_timm_model_folds_to_no_more_batchnorms_than_timm_leaves(name: str) -> None:
    _check_fold(name)


def test_frozen_batchnorm_act_folds_like_the_trainable_one() -> None:
    """timm's FrozenBatchNormAct2d (buffers only, no torch BatchNorm class) is recognised by behaviour too."""
    _check_fold("regnety_002", frozen=True)


def test_batchnorm_act_keeps_its_activation_and_says_so() -> None:
    model, x = _build("efficientnet_b0")

    report = fold_batchnorm(model, (x,), inplace=False)

    first = report.changed("folded")[0]
    assert (first.module, first.into) == ("bn1", "conv_stem")
    assert first.detail == "BatchNorm+SiLU into its producer; its SiLU takes its place"
    assert type(report.model.bn1) is nn.SiLU and type(model.bn1).__name__ == "BatchNormAct2d"  # the original is kept


def test_batchnorm_act_with_no_producer_says_why_and_becomes_affine_then_act() -> None:
    """resnetv2's pre-activation norms read a residual sum: the norm has no producer, and its ReLU
    comes before the next conv, so it cannot fold into that either; --to-affine keeps the ReLU."""
    model, x = _build("resnetv2_50")
    norm = "stages.0.blocks.1.norm1"

    kept = fold_batchnorm(model, (x,), inplace=False)
    affine = fold_batchnorm(model, (x,), inplace=False, unfoldable="affine")

    skip = next(s for s in kept.skipped if s.module == norm)
    assert skip.detail.startswith("BatchNorm+ReLU: its input comes from add()")
    assert skip.detail.endswith("its ReLU runs after the norm inside the module, so the norm cannot fold into "
                                "the layers that read the module's output")
    replaced = affine.model.get_submodule(norm)
    assert [type(m).__name__ for m in replaced] == ["ChannelAffine", "ReLU"]
    assert affine.passed and batchnorms_left(affine) == [] and _relative_error(model, affine.model) < TOLERANCE
