"""Folding LayerNorm/RMSNorm affines into the linear layers that read them: exact, or refused with the reason.

Tolerance: the pass's own check (fp32: |diff| <= 1e-5 + 1e-4·max|out|), and here outputs on fresh
inputs within atol=rtol=1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models
from normsurgeon.errors import PreconditionError
from normsurgeon.passes.fold_norm_affine import fold_norm_affines
from normsurgeon.report import SkipReason
from tests.hf_models import causal_lm, hf_inputs, hf_model


def _fold(model: nn.Module, inputs: tuple):
    original = copy.deepcopy(model)
    report = fold_norm_affines(model, inputs)
    assert report.check.passed
    return report, original


def _assert_same(model, original, inputs):
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), original(*inputs), rtol=1e-5, atol=1e-5)


def test_prenorm_transformer_every_layernorm_folds_into_its_linears():
    model = models.build("prenorm_transformer")
    report, original = _fold(model, models.example_inputs("prenorm_transformer", 2))
    assert report.skipped == []
    into = {(c.module, c.into) for c in report.changed("folded-affine")}
    assert {("blocks.0.ln1", f"blocks.0.attn.{p}_proj") for p in "qkv"} <= into
    assert ("blocks.1.ln2", "blocks.1.mlp.fc1") in into and ("ln_f", "head") in into
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(n.weight is None and n.bias is None and not n.elementwise_affine for n in norms)
    _assert_same(model, original, models.example_inputs("prenorm_transformer", 3))


def test_llama_hand_written_rmsnorm_keeps_its_class_with_a_frozen_unit_weight():
    model = models.build("llama")
    report, original = _fold(model, models.example_inputs("llama", 2))
    assert report.skipped == [] and len(report.changes) == 2 * (3 + 2) + 1
    norm = model.layers[0].input_layernorm
    assert type(norm).__name__ == "LlamaRMSNorm"
    assert torch.equal(norm.weight, torch.ones(32)) and not norm.weight.requires_grad
    assert model.layers[0].self_attn.q_proj.bias is None  # no shift to fold, no bias added
    _assert_same(model, original, models.example_inputs("llama", 3))


def test_postnorm_layernorms_feeding_the_residual_are_refused_with_the_reason():
    model = models.build("postnorm_transformer")
    report, original = _fold(model, models.example_inputs("postnorm_transformer", 2))
    reasons = {s.module: s for s in report.skipped}
    assert set(reasons) == {"ln_emb", "blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1"}
    assert all(s.reason is SkipReason.NO_FOLDABLE_NEIGHBOUR for s in reasons.values())
    assert "its output also goes to add()" in reasons["blocks.0.ln1"].detail
    assert [(c.module, c.into) for c in report.changes] == [("blocks.1.ln2", "head")]
    _assert_same(model, original, models.example_inputs("postnorm_transformer", 3))


class TiedHead(nn.Module):
    """Embedding -> LayerNorm -> head whose weight is the embedding's (tied)."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(20, 8), nn.LayerNorm(8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)

    def forward(self, ids):
        return self.head(self.ln(self.emb(ids)))


class SideReader(nn.Module):
    """The norm's output goes to a linear and is also returned."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.ln(x)
        return self.fc(y), y


class SharedLinear(nn.Module):
    """The linear after the norm is also called on the raw input."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.ln(x)) + self.fc(x)


REFUSALS = {
    "tied-weight": (TiedHead, (torch.randint(0, 20, (2, 5)),), SkipReason.SHARED_PARAMETER, "head shares its weight"),
    "output-also-returned": (SideReader, (torch.randn(2, 8),), SkipReason.NO_FOLDABLE_NEIGHBOUR, "the model's output"),
    "linear-reads-other-inputs": (SharedLinear, (torch.randn(2, 8),), SkipReason.NO_FOLDABLE_NEIGHBOUR, "fc also reads other inputs"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusals_name_the_reason_and_change_nothing(case):
    build, inputs, reason, detail = REFUSALS[case]
    model = build().eval()
    before = copy.deepcopy(model.state_dict())
    report = fold_norm_affines(model, inputs)
    (skip,) = report.skipped
    assert skip.reason is reason and detail in skip.detail
    assert report.changes == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_mode_is_refused():
    with pytest.raises(PreconditionError, match="eval"):
        fold_norm_affines(models.build("prenorm_transformer").train(), models.example_inputs("prenorm_transformer", 1))


HF_CASES = {
    # model -> norms that must stay (their output is the model's output)
    "llama": {"norm"},
    "t5-encoder": {"encoder.final_layer_norm"},
    "gpt2": {"ln_f"},  # the others feed transformers' Conv1D (weight stored (in, out))
    "bert": {"embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm",
             "encoder.layer.1.attention.output.LayerNorm", "encoder.layer.1.output.LayerNorm"},
}


@pytest.mark.parametrize("name", HF_CASES, ids=list(HF_CASES))
def test_transformers_models_fold_where_only_linears_read_the_norm(name):
    model, inputs = hf_model(name), hf_inputs(name)
    report, original = _fold(model, inputs)
    assert {s.module for s in report.skipped} == HF_CASES[name]
    assert report.check.max_abs_diff < 1e-5
    fresh = hf_inputs(name, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(*fresh).last_hidden_state, original(*fresh).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


class SelectThenLinear(nn.Module):
    """LayerNorm over (B, T, 8), then an op picking entries of its output, then a linear layer."""

    def __init__(self, pick, features: int = 8):
        super().__init__()
        self.ln, self.fc, self.pick = nn.LayerNorm(8), nn.Linear(features, 4), pick
        with torch.no_grad():
            self.ln.weight.uniform_(-1.5, 1.5)
            self.ln.bias.normal_()

    def forward(self, x):
        return self.fc(self.pick(self.ln(x)))


TOKENS = torch.tensor([0, 2, 3])
SELECTIONS = {  # along the tokens (or batch): they commute with a per-feature affine
    "last-tokens": lambda y: y[:, -2:, :],
    "ellipsis": lambda y: y[..., 1:, :],
    "one-token": lambda y: y[:, 0],
    "narrow": lambda y: y.narrow(1, 1, 3),
    "select-then-view": lambda y: y.select(0, 1).view(-1, 8),
    "index-select": lambda y: y.index_select(1, TOKENS),
    "transpose-then-slice": lambda y: y.transpose(0, 1)[1:].transpose(0, 1),
}


@pytest.mark.parametrize("case", SELECTIONS, ids=list(SELECTIONS))
def test_a_selection_along_other_axes_is_looked_through(case):
    model = SelectThenLinear(SELECTIONS[case]).eval()
    report, original = _fold(model, (torch.randn(2, 5, 8),))
    assert [(c.module, c.into) for c in report.changes] == [("ln", "fc")] and report.skipped == []
    assert model.ln.weight is None and model.fc.bias is not None
    _assert_same(model, original, (torch.randn(3, 5, 8),))


PICKS_FEATURES = {  # the linear must read every normalized feature on its last axis
    "feature-slice": (lambda y: y[..., :4], 4, "its output also goes to __getitem__()"),
    "feature-index-select": (lambda y: y.index_select(-1, TOKENS), 3, "its output also goes to index_select()"),
    "advanced-index": (lambda y: y[:, TOKENS], 8, "its output also goes to __getitem__()"),
    "new-axis": (lambda y: y[:, None], 8, "its output also goes to __getitem__()"),  # recorded like a tensor index
    "features-moved": (lambda y: y.transpose(1, 2)[..., :8], 8, "fc (Linear) reads the normalized features mixed with, "
                       "or on, another axis"),
}


@pytest.mark.parametrize("case", PICKS_FEATURES, ids=list(PICKS_FEATURES))
def test_a_selection_of_the_normalized_features_is_refused(case):
    pick, features, detail = PICKS_FEATURES[case]
    model = SelectThenLinear(pick, features).eval()
    report, _ = _fold(model, (torch.randn(2, 8, 8),))
    (skip,) = report.skipped
    assert skip.reason is SkipReason.NO_FOLDABLE_NEIGHBOUR and skip.detail == detail
    assert report.changes == [] and model.ln.weight is not None


def test_gemma_rmsnorms_scaling_by_one_plus_w_fold_and_keep_w_zero():
    model = causal_lm("gemma")
    report, original = _fold(model, hf_inputs("llama"))
    norms = [m for m in model.modules() if type(m).__name__ == "GemmaRMSNorm"]
    assert report.skipped == [] and len(report.changes) == 2 * (3 + 2) + 1 and len(norms) == 5
    assert all(torch.equal(n.weight, torch.zeros(32)) and not n.weight.requires_grad for n in norms)  # 1 + w == 1
    fresh = hf_inputs("llama", seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(*fresh).logits, original(*fresh).logits, rtol=1e-5, atol=1e-5)
