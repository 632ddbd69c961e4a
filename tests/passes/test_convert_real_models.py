"""LayerNorm -> RMSNorm by centring the residual stream on real pre-norm transformers (small configs, random
weights): exact where the maths allows, checked against the original on fresh inputs (atol = rtol = 1e-5),
and every LayerNorm left is listed with its reason."""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
from torch import nn

from normsurgeon.errors import UsageError
from normsurgeon.passes.convert import convert_norms
from tests.hf_models import causal_lm, prenorm_inputs, prenorm_model


def _outputs(model: nn.Module, inputs: tuple | dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _layernorms(model: nn.Module, only: str = "*") -> set[str]:
    return {path for path, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) and any(fnmatch.fnmatchcase(path, p) for p in only.split(","))}


def _convert(name: str, model: nn.Module, **options):
    """Convert; the outputs match the original's on fresh inputs; every selected LayerNorm left is listed with
    its reason. Returns the report, the converted norms and the reasons of those left."""
    original = copy.deepcopy(model)
    before = _layernorms(model, options.get("only", "*"))
    report = convert_norms(model, prenorm_inputs(name), to="rmsnorm", **options)
    assert report.check.passed
    fresh = prenorm_inputs(name, seed=1, batch=3)
    for new, old in zip(_outputs(model, fresh), _outputs(original, fresh), strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    left = _layernorms(model, options.get("only", "*"))
    converted = {c.module for c in report.changed("converted")}
    assert converted == before - left
    reasons = {s.module: s.detail for s in report.skipped} | {item.module: item.detail for item in report.left_out}
    assert left <= reasons.keys(), left - reasons.keys()
    return report, converted, {path: reasons[path] for path in left}


# ------------------------------------------------------------------------------- exact everywhere


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_tied_causal_lm_converts_every_layernorm_with_untie(name):
    model = causal_lm(name, tie=True)
    embedding = model.get_input_embeddings()
    report, converted, kept = _convert(name, model, untie=True)
    assert not kept and len(converted) == 5
    assert model.lm_head.weight is not embedding.weight and not model.config.tie_word_embeddings
    assert embedding.weight.double().mean(1).abs().max() < 1e-6  # the embedding rows are centred, the head's not
    assert model.lm_head.weight.double().mean(1).abs().max() > 1e-3
    assert any("untied" in note and "own copy" in note for note in report.notes)


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_tied_causal_lm_without_untie_is_refused_naming_the_option(name):
    model = causal_lm(name, tie=True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError, match=r"shares its weight with lm_head .*pass untie=True \(CLI: --untie\)"):
        convert_norms(model, prenorm_inputs(name), to="rmsnorm")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_phi_parallel_blocks_convert_though_the_rotary_embedding_reads_the_stream():
    model = prenorm_model("phi")
    report, converted, kept = _convert("phi", model)
    assert not kept and len(converted) == 3
    centred = {c.module for c in report.changed("centred")}
    assert {"model.layers.0.self_attn.dense", "model.layers.0.mlp.fc2", "model.embed_tokens"} <= centred


# ------------------------------------------------------------------------------- encoders: all but the output norm


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_vision_encoders_centre_the_class_token_and_position_embeddings(name):
    model = prenorm_model(name)
    report, converted, kept = _convert(name, model)
    assert len(converted) == 4
    assert kept.keys() == {"layernorm"} and "kept as LayerNorm" in kept["layernorm"]
    assert "model's output" in kept["layernorm"]  # last_hidden_state: its bias has nowhere to go
    centred = {c.module for c in report.changed("centred")}
    assert {"embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection"} <= centred
    assert model.embeddings.cls_token.double().mean(-1).abs().max() < 1e-6


def test_dinov2_layer_scales_are_folded_into_the_branch_writers_first():
    model = prenorm_model("dinov2")
    report, _, _ = _convert("dinov2", model)
    folded = {c.module: c.into for c in report.changed("folded")}
    assert folded["encoder.layer.0.layer_scale1"] == "encoder.layer.0.attention.o_proj"
    assert folded["encoder.layer.1.layer_scale2"] == "encoder.layer.1.mlp.fc2"
    assert all(torch.equal(m.lambda1, torch.ones_like(m.lambda1)) for m in model.modules() if hasattr(m, "lambda1"))


def test_whisper_decoder_converts_and_the_encoder_is_refused_for_its_gelu():
    model = prenorm_model("whisper")
    with pytest.raises(UsageError, match=r"model\.encoder\.layers\.0\.self_attn_layer_norm.*gelu\(\) writes to the "
                       r"residual stream.*--approximate"):
        convert_norms(copy.deepcopy(model), prenorm_inputs("whisper"), to="rmsnorm", untie=True)
    report, converted, kept = _convert("whisper", model, untie=True, only="model.decoder.*")
    assert not kept and len(converted) == 7  # 2 layers x (self-attn, cross-attn, MLP) + the final norm into proj_out
    assert "model.decoder.embed_tokens" in {c.module for c in report.changed("centred")}
    assert isinstance(model.model.encoder.layer_norm, nn.LayerNorm)


def test_swin_second_stage_converts_and_the_first_is_refused_for_its_embedding_norm():
    model = prenorm_model("swin")
    with pytest.raises(UsageError, match=r"not exact for embeddings\.norm.*its output starts the residual stream"):
        convert_norms(copy.deepcopy(model), prenorm_inputs("swin"), to="rmsnorm")
    report = convert_norms(copy.deepcopy(model), prenorm_inputs("swin"), to="rmsnorm", approximate=True)
    stage0 = {i.module: i.detail for i in report.left_out if i.module.startswith("encoder.layers.0.")}
    assert len(stage0) == 3 and all("embeddings.norm (LayerNorm) writes to the residual stream" in d for d in stage0.values())
    _, converted, kept = _convert("swin", model, only="encoder.layers.1.*,layernorm")
    assert converted == {"encoder.layers.1.blocks.0.layernorm_after"}
    assert "pad()" in kept["encoder.layers.1.blocks.0.layernorm_before"]  # the window padding reads it
    assert "pooler" in kept["layernorm"]
    assert {"embeddings.norm", "encoder.layers.0.downsample.norm"} <= _layernorms(model)  # not selected
