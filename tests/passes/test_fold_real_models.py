"""Folding the reference models and real third-party (transformers) models built offline."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from normsurgeon import fold_batchnorm
from tests.helpers import give_realistic_stats

# BNs each reference model must keep, by design of the model (see models/preact_resnet.py).
EXPECTED_KEPT = {"preact_resnet": {"layer1.bn1", "layer2.bn1", "zero_pad.bn", "bn"}}


@pytest.mark.parametrize("name", list(models.REGISTRY))
def test_reference_model_folds_and_matches(name):
    model = models.build(name)
    inputs = models.example_inputs(name, 2)
    original = copy.deepcopy(model)
    report = fold_batchnorm(model, inputs)
    assert {s.module for s in report.skipped} == EXPECTED_KEPT.get(name, set())
    batchnorms = [m for m in original.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(report.changed("folded")) == len(batchnorms) - len(EXPECTED_KEPT.get(name, ()))
    remaining = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(remaining) == len(EXPECTED_KEPT.get(name, ()))
    fresh = models.example_inputs(name, 3)  # inputs the fold never saw
    with torch.no_grad():
        torch.testing.assert_close(model(*fresh), original(*fresh), rtol=1e-4, atol=1e-4)


def _transformers_cnn(kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck")
        return transformers.ResNetModel(config)
    if kind == "mobilenetv2":
        config = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=64)
        return transformers.MobileNetV2Model(config)
    config = transformers.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)
    return transformers.RegNetModel(config)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "mobilenetv2", "regnet"])
def test_transformers_cnn_folds_every_batchnorm(kind):
    x = torch.randn(2, 3, 64, 64)
    model = give_realistic_stats(_transformers_cnn(kind), x)
    original = copy.deepcopy(model)
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    report = fold_batchnorm(model, (x,))
    assert [s.message for s in report.skipped] == []
    assert len(report.changed("folded")) == batchnorms > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    fresh = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = original(fresh), model(fresh)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-4)
