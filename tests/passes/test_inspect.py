"""inspect: one row per norm, placement from the dataflow, options from the passes' planning, hazards."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import models
from normsurgeon.passes.inspect import inspect_norms
from normsurgeon.render import render_json
from tests.hf_models import hf_inputs, hf_model
from tests.norm_zoo import RMSNorm


def _rows(model: nn.Module, inputs) -> dict[str, dict]:
    return {row.path: row.to_dict() for row in inspect_norms(model, inputs).norms}


def _placements(rows: dict[str, dict]) -> dict[str, str]:
    return {path: row["placement"] for path, row in rows.items()}


REFERENCE = {
    "prenorm_transformer": {"blocks.0.ln1": "pre-norm", "blocks.0.ln2": "pre-norm", "blocks.1.ln1": "pre-norm",
                            "blocks.1.ln2": "pre-norm", "ln_f": "final-norm"},
    "postnorm_transformer": {"ln_emb": "embedding-norm", "blocks.0.ln1": "post-norm", "blocks.0.ln2": "post-norm",
                             "blocks.1.ln1": "post-norm", "blocks.1.ln2": "post-norm"},
    "llama": {"layers.0.input_layernorm": "pre-norm", "layers.0.post_attention_layernorm": "pre-norm",
              "layers.1.input_layernorm": "pre-norm", "layers.1.post_attention_layernorm": "pre-norm",
              "norm": "final-norm"},
}


@pytest.mark.parametrize("name", REFERENCE)
def test_transformer_placement_comes_from_the_dataflow(name):
    rows = _rows(models.build(name), models.example_inputs(name, 2))
    assert _placements(rows) == REFERENCE[name]


HF = {
    "gpt2": ("pre-norm", {"ln_f": "final-norm"}),
    "llama": ("pre-norm", {"norm": "final-norm"}),
    "t5-encoder": ("pre-norm", {"encoder.final_layer_norm": "final-norm"}),
    "bert": ("post-norm", {"embeddings.LayerNorm": "embedding-norm"}),
}


@pytest.mark.parametrize("name", HF)
def test_transformers_blocks_are_pre_norm_or_post_norm(name):
    in_blocks, others = HF[name]
    placements = _placements(_rows(hf_model(name), hf_inputs(name)))
    assert {p: placements[p] for p in others} == others
    block_norms = {p: v for p, v in placements.items() if p not in others}
    assert len(block_norms) == 4 and set(block_norms.values()) == {in_blocks}


def test_convnets_say_where_batchnorm_sits_and_what_folds():
    rows = _rows(models.build("resnet18"), models.example_inputs("resnet18", 1))
    assert {r["placement"] for r in rows.values()} == {"after conv"}
    assert "fold into stem.0 (its producer): normsurgeon fold" in rows["stem.1"]["can"]
    assert "convert to frozen-batchnorm (FrozenBatchNorm) exactly (--to frozen-batchnorm)" in rows["stem.1"]["can"]
    assert any("groupnorm" in c and "approximately" in c for c in rows["stem.1"]["can"])
    preact = _rows(models.build("preact_resnet"), models.example_inputs("preact_resnet", 1))
    assert preact["relu_bn_conv1x1.bn"]["placement"] == "before conv"
    assert any("its consumer" in c for c in preact["relu_bn_conv1x1.bn"]["can"])
    assert any(c.startswith("fold: ") and "zero padding" in c for c in preact["zero_pad.bn"]["cannot"])
    assert _rows(models.build("mlp"), models.example_inputs("mlp", 2))["bn1"]["placement"] == "after linear"


def test_layernorm_options_and_refusals():
    pre = _rows(models.build("prenorm_transformer"), models.example_inputs("prenorm_transformer", 1))
    assert "convert to rmsnorm exactly, by centring the residual stream (--to rmsnorm)" in pre["blocks.0.ln1"]["can"]
    assert any(c.startswith("fold affine into blocks.0.attn.q_proj") for c in pre["blocks.0.ln1"]["can"])
    post = _rows(models.build("postnorm_transformer"), models.example_inputs("postnorm_transformer", 1))
    assert any("exact rmsnorm: it is a post-norm" in c for c in post["blocks.0.ln1"]["cannot"])
    assert any("fold affine" in c and "add()" in c for c in post["blocks.0.ln1"]["cannot"])
    llama = _rows(models.build("llama"), models.example_inputs("llama", 1))
    assert "convert to native (RMSNorm) exactly (--to native)" in llama["norm"]["can"]
    assert llama["norm"]["kind"] == "rmsnorm" and not llama["norm"]["native"] and llama["norm"]["eps"] == 1e-6


def _conv_bn(batch: int = 1) -> tuple[nn.Module, tuple]:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    return model, (torch.randn(batch, 3, 1, 1),)


def test_hazards_of_batchnorm():
    model, inputs = _conv_bn()
    model.train()
    (row,) = inspect_norms(model, inputs).norms
    assert any("in training mode" in h and "σ = 0" in h for h in row.hazards)
    assert any("never updated" in h and "mean 0, var 1" in h for h in row.hazards)
    assert any("scale-invariant" in h for h in row.hazards)
    model.eval()
    with torch.no_grad():
        model[1].running_var[0] = 0.0
        model[1].num_batches_tracked.fill_(10)
    (row,) = inspect_norms(model, inputs).norms
    assert any(h.startswith("running_var ≈ 0 in 1 of 4 channels") for h in row.hazards)
    assert not any("scale-invariant" in h for h in row.hazards)  # weight decay is no hazard of a deployed model
    assert not any("normsurgeon param-groups" in h for h in row.hazards)
    with torch.no_grad():
        model[1].running_mean[1] = float("nan")
    (row,) = inspect_norms(model, inputs).norms
    assert any("NaN or inf" in h for h in row.hazards)
    assert any("fold: running statistics contain NaN or inf" in c for c in row.cannot)


def test_inspect_changes_nothing_even_in_training_mode():
    model, inputs = _conv_bn(batch=4)
    model.train()
    before = copy.deepcopy(model.state_dict())
    inspect_norms(model, inputs)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_look_alikes_are_listed_with_the_reason_and_json_is_complete():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), RMSNorm(8)).eval()
    report = inspect_norms(model, (torch.randn(2, 4),))
    payload = json.loads(render_json(report.to_dict()))
    (norm,) = payload["norms"]
    assert {"path", "kind", "placement", "eps", "affine", "can", "cannot", "hazards"} <= set(norm)
    assert norm["path"] == "1" and norm["kind"] == "layernorm"
    (lookalike,) = payload["unrecognized"]
    assert lookalike["path"] == "2" and "computes no known norm formula" in lookalike["reason"]
    assert payload["facts"]["look-alikes not recognised"] == 1
