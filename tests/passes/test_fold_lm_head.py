"""The final norm of every transformers causal LM folds into ``lm_head``, through the token slice
(``hidden_states[:, slice_indices, :]``) and GPT-2's ``view``; a head tied to the input embedding is
refused with the reason, and nothing changes.

Tolerance: the pass's own check (fp32: |diff| <= 1e-5 + 1e-4·max|out|), and here logits on fresh
token ids within atol=rtol=1e-5 of the original model's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normsurgeon.passes.fold_norm_affine import fold_norm_affines
from normsurgeon.report import SkipReason
from tests.hf_models import CAUSAL_LMS, TIED_BY_DEFAULT, causal_lm, hf_inputs

FINAL_NORMS = {"gpt2": "transformer.ln_f", "opt": "model.decoder.final_layer_norm"}  # the others: model.norm
WITH_BIAS = ("gpt2", "opt")  # LayerNorms: the shift becomes lm_head's (new) bias


def _logits(model: nn.Module, seed: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*hf_inputs("llama", seed=seed), **kwargs).logits


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_final_norm_folds_into_lm_head_exactly(name):
    model = causal_lm(name)
    original = copy.deepcopy(model)
    report = fold_norm_affines(model, hf_inputs("llama"))
    final = FINAL_NORMS.get(name, "model.norm")
    assert report.skipped == [] and report.check.passed
    assert (final, "lm_head") in {(c.module, c.into) for c in report.changes}
    assert (model.lm_head.bias is not None) == (name in WITH_BIAS)
    torch.testing.assert_close(_logits(model, seed=1), _logits(original, seed=1), rtol=1e-5, atol=1e-5)


def test_a_head_reading_only_the_last_token_folds_too():
    # logits_to_keep=1: lm_head reads hidden_states[:, -1:, :], a selection along the token axis.
    model = causal_lm("llama")
    original = copy.deepcopy(model)
    ids = hf_inputs("llama")[0]
    report = fold_norm_affines(model, {"input_ids": ids, "logits_to_keep": 1})
    assert ("model.norm", "lm_head") in {(c.module, c.into) for c in report.changes}
    got, want = _logits(model, seed=1, logits_to_keep=1), _logits(original, seed=1, logits_to_keep=1)
    assert got.shape[1] == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TIED_BY_DEFAULT)
def test_a_head_tied_to_the_embedding_is_refused_naming_it(name):
    model = causal_lm(name, tie=True)
    embedding = model.get_input_embeddings()
    assert model.lm_head.weight is embedding.weight
    before = embedding.weight.detach().clone()
    report = fold_norm_affines(model, hf_inputs("llama"))
    final = FINAL_NORMS.get(name, "model.norm")
    (skip,) = report.skipped
    path = next(p for p, m in model.named_modules() if m is embedding)
    assert skip.module == final and skip.reason is SkipReason.SHARED_PARAMETER
    assert skip.detail.startswith(f"lm_head shares its weight with {path} (tied weights")
    assert "tie_word_embeddings=False" in skip.detail
    assert torch.equal(embedding.weight, before) and model.lm_head.weight is embedding.weight
    assert final not in {c.module for c in report.changes}
