"""Every Python API on real third-party architectures: ``transformers`` models built offline from tiny
configs (random weights, no download), one or more per family.

CNNs (ResNet, MobileNetV2, ConvNeXt, RegNet), a vision transformer (ViT), an encoder LM (BERT),
decoder LMs (GPT-2, Llama), an encoder-decoder (T5) and audio models with weight norm and GroupNorm
(Wav2Vec2, EnCodec). BatchNorm statistics are calibrated with ``give_realistic_stats`` and every norm
affine is randomized, so a wrong fold or conversion shows.

Each applicable API runs on a copy of the model (each model is built once per module) and its
report must be sane: it passed, its counts add up (every norm folded/converted or skipped), every
skip has a reason, and the result matches the original on *fresh* inputs (other batch size and
values) within normsurgeon's own fp32 tolerance (|diff| <= 1e-5 + 1e-4·max|out|).
"""

from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normsurgeon as ns
from normsurgeon.check import compare_outputs
from normsurgeon.recognize import is_candidate
from tests.helpers import give_realistic_stats

pytestmark = pytest.mark.slow
tf = pytest.importorskip("transformers")

VOCAB = 64
CNNS = ("resnet", "mobilenetv2", "regnet")
ALL = (*CNNS, "convnext", "vit", "bert", "gpt2", "llama", "t5", "wav2vec2", "encodec")
TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _build(name: str) -> nn.Module:
    text = {"vocab_size": VOCAB}
    if name == "resnet":
        config = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck")
        return tf.ResNetModel(config)
    if name == "mobilenetv2":
        return tf.MobileNetV2Model(tf.MobileNetV2Config(depth_multiplier=0.35, image_size=64))
    if name == "regnet":
        return tf.RegNetModel(tf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8))
    if name == "convnext":
        return tf.ConvNextModel(tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    if name == "vit":
        config = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64)
        return tf.ViTModel(config, add_pooling_layer=False)
    if name == "bert":
        return tf.BertModel(tf.BertConfig(**text, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64))
    if name == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(**text, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                                          bos_token_id=0, eos_token_id=0))
    if name == "llama":
        return tf.LlamaModel(tf.LlamaConfig(**text, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            use_cache=False))
    if name == "t5":
        return tf.T5Model(tf.T5Config(**text, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                      decoder_start_token_id=0, use_cache=False))
    if name == "wav2vec2":  # feature extractor: GroupNorm after its first conv; positional conv: weight norm
        return tf.Wav2Vec2Model(tf.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4))
    if name == "encodec":  # every conv weight-normed, no norm layers
        return tf.EncodecModel(tf.EncodecConfig(num_filters=4, hidden_size=16, upsampling_ratios=[4, 2],
                                                codebook_size=32, codebook_dim=16, num_lstm_layers=1))
    raise KeyError(name)


def _inputs(name: str, seed: int, batch: int) -> tuple | dict:
    generator = torch.Generator().manual_seed(seed)
    if name in (*CNNS, "convnext"):
        return (torch.randn(batch, 3, 64, 64, generator=generator),)
    if name == "vit":
        return (torch.randn(batch, 3, 32, 32, generator=generator),)
    if name == "wav2vec2":
        return (torch.randn(batch, 800, generator=generator),)
    if name == "encodec":
        return (torch.randn(batch, 1, 400, generator=generator),)
    ids = torch.randint(0, VOCAB, (batch, 8 + seed), generator=generator)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return (ids,)


def _randomize_norm_affines(model: nn.Module, generator: torch.Generator) -> None:
    """Norm weights in ±(0.5, 1.5) and biases ~ N(0, 0.2): a fold or conversion that drops them shows."""
    with torch.no_grad():
        for module in model.modules():
            if not (isinstance(module, TORCH_NORMS) or type(module).__name__.endswith("Norm")):
                continue
            for name, tensor in ((n, getattr(module, n, None)) for n in ("weight", "bias")):
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    if name == "weight":
                        sign = torch.where(torch.rand(tensor.shape, generator=generator) < 0.2, -1.0, 1.0)
                        tensor.copy_(sign * (torch.rand(tensor.shape, generator=generator) + 0.5))
                    else:
                        tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


@dataclass
class Case:
    name: str
    model: nn.Module  # eval mode, calibrated; never changed by a test (each works on a copy)
    inputs: tuple | dict
    fresh: tuple | dict  # inputs no pass saw: another batch size (and sequence length) and values

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.model)


class Zoo:
    """Builds each model on first use, once per test module."""

    def __init__(self) -> None:
        self.cases: dict[str, Case] = {}

    def __getitem__(self, name: str) -> Case:
        if name not in self.cases:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = _build(name)
            inputs = _inputs(name, seed=0, batch=2)
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                give_realistic_stats(model, *inputs)
            _randomize_norm_affines(model, torch.Generator().manual_seed(0))
            self.cases[name] = Case(name, model.eval(), inputs, _inputs(name, seed=1, batch=3))
        return self.cases[name]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


def _run(model: nn.Module, inputs: tuple | dict):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _assert_same_on_fresh_inputs(case: Case, model: nn.Module) -> None:
    check = compare_outputs(_run(case.model, case.fresh), _run(model, case.fresh))
    assert check.passed, check.to_dict()


def _assert_sane(report: ns.Report) -> None:
    """Passed, every skip with a reason, nothing both changed and skipped, and the report is JSON."""
    assert report.passed and report.checks
    for skip in report.skipped:
        assert isinstance(skip.reason, ns.SkipReason) and skip.detail, skip
    assert not {c.module for c in report.changes} & {s.module for s in report.skipped}
    json.dumps(report.to_dict(), default=str)


def _hand_written_norms(model: nn.Module) -> set[str]:
    """Norm-like leaves that are not torch's or normsurgeon's classes (weight-norm parametrizations excluded)."""
    inside = {id(p) for m in model.modules() if isinstance(m, parametrize.ParametrizationList) for p in m}
    return {path for path, m in model.named_modules()
            if id(m) not in inside and type(m).__name__.endswith("Norm") and is_candidate(m)
            and not type(m).__module__.startswith(("torch.", "normsurgeon."))}


# ------------------------------------------------------------------------------- inspect

# path pattern -> placement, for every norm of each model (first matching pattern wins)
PLACEMENTS = {
    "resnet": {"*": "after conv"},
    "mobilenetv2": {"*": "after conv"},
    "regnet": {"*": "after conv"},
    "convnext": {"embeddings.layernorm": "after conv", "encoder.stages.*.layers.*.layernorm": "after conv",
                 "encoder.stages.*.downsampling_layer.0": "before conv", "layernorm": "standalone"},
    "vit": {"layers.*.layernorm_*": "pre-norm", "layernorm": "final-norm"},
    "bert": {"embeddings.LayerNorm": "embedding-norm", "encoder.layer.*": "post-norm"},
    "gpt2": {"h.*": "pre-norm", "ln_f": "final-norm"},
    "llama": {"layers.*": "pre-norm", "norm": "final-norm"},
    "t5": {"*.block.*": "pre-norm", "*.final_layer_norm": "final-norm"},
    "wav2vec2": {"feature_extractor.*": "after conv", "feature_projection.layer_norm": "standalone",
                 "encoder.*": "post-norm"},
    "encodec": {},
}
KINDS = {
    "resnet": {"batchnorm"}, "mobilenetv2": {"batchnorm"}, "regnet": {"batchnorm"},
    "convnext": {"layernorm-channels-first", "layernorm"}, "vit": {"layernorm"}, "bert": {"layernorm"},
    "gpt2": {"layernorm"}, "llama": {"rmsnorm"}, "t5": {"rmsnorm"}, "wav2vec2": {"groupnorm", "layernorm"},
    "encodec": set(),
}


@pytest.mark.parametrize("name", ALL)
def test_inspect_lists_every_norm_once_with_a_sensible_placement(zoo, name):
    case = zoo[name]
    report = ns.inspect_norms(case.model, case.inputs)
    rows = {row.path: row for row in report.norms}
    assert len(rows) == len(report.norms) == report.facts["norms"]
    torch_norms = {p for p, m in case.model.named_modules() if isinstance(m, TORCH_NORMS)}
    assert torch_norms | _hand_written_norms(case.model) == set(rows)  # every norm, and only norms
    assert report.unrecognized == []  # no look-alikes (weight-norm parametrizations are not norms)
    assert {row.kind for row in rows.values()} == KINDS[name]
    for path, row in rows.items():
        expected = next(p for pattern, p in PLACEMENTS[name].items() if fnmatch.fnmatchcase(path, pattern))
        assert row.placement == expected, (path, row.placement, row.neighbours)
        assert row.calls >= 1 and row.input_shape and row.evidence
        assert row.can or row.cannot  # inspect always says what can or cannot be done
    assert not case.model.training


# ------------------------------------------------------------------------------- fold


@pytest.mark.parametrize("name", ALL)
def test_fold_folds_every_cnn_batchnorm_and_touches_nothing_else(zoo, name):
    case = zoo[name]
    model = case.copy()
    batchnorms = [p for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bool(batchnorms) == (name in CNNS)
    report = ns.fold(model, case.inputs)
    _assert_sane(report)
    assert report.skipped == []
    assert sorted(c.module for c in report.changed("folded")) == sorted(batchnorms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not batchnorms:
        assert report.changes == [] and report.check.max_abs_diff == 0.0
    _assert_same_on_fresh_inputs(case, model)


# ------------------------------------------------------------------------------- fold norm affines

# norms whose affine folds into the linears after them, and how many (norm, linear) folds that is
AFFINE_FOLDS = {
    "convnext": ({"encoder.stages.0.layers.0.layernorm", "encoder.stages.1.layers.0.layernorm"}, 2),
    "vit": ({f"layers.{i}.layernorm_{w}" for i in range(2) for w in ("before", "after")}, 2 * (3 + 1)),
    "gpt2": ({f"h.{i}.ln_{j}" for i in range(2) for j in (1, 2)}, 4),  # into Conv1D c_attn / c_fc
    "llama": ({f"layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}, 2 * (3 + 2)),
    "t5": ({f"{s}.block.{i}.layer.{j}.layer_norm" for s, layers in (("encoder", 2), ("decoder", 3))
            for i in range(2) for j in range(layers)}, 2 * (3 + 1) + 2 * (3 + 1 + 1)),  # cross-attn: q only
    "bert": (set(), 0),  # post-norm: every LayerNorm's output also feeds the residual
    "wav2vec2": (set(), 0),
}


@pytest.mark.parametrize("name", list(AFFINE_FOLDS))
def test_fold_norm_affines_folds_where_only_linears_read_the_norm(zoo, name):
    case = zoo[name]
    model = case.copy()
    folded, count = AFFINE_FOLDS[name]
    report = ns.fold_norm_affines(model, case.inputs)
    _assert_sane(report)
    assert {c.module for c in report.changed("folded-affine")} == folded
    assert len(report.changed("folded-affine")) == count
    recognition = ns.inspect_norms(case.model, case.inputs)
    foldable = {row.path for row in recognition.norms if row.kind in ("layernorm", "rmsnorm")}
    assert {s.module for s in report.skipped} == foldable - folded  # every other LN/RMSNorm says why not
    assert all(s.reason is ns.SkipReason.NO_FOLDABLE_NEIGHBOUR for s in report.skipped)
    _assert_same_on_fresh_inputs(case, model)


# ------------------------------------------------------------------------------- convert to native

NATIVE = {"convnext": 4, "llama": 5, "t5": 12}  # ConvNextLayerNorm, LlamaRMSNorm, T5LayerNorm


@pytest.mark.parametrize("name", list(NATIVE))
def test_convert_native_replaces_every_hand_written_norm(zoo, name):
    case = zoo[name]
    model = case.copy()
    hand_written = _hand_written_norms(model)
    assert len(hand_written) == NATIVE[name]
    report = ns.convert_norms(model, case.inputs, to="native")
    _assert_sane(report)
    assert report.skipped == []
    assert {c.module for c in report.changed("converted")} == hand_written
    assert all(c.detail.endswith("exact") for c in report.changes)
    assert _hand_written_norms(model) == set()
    assert all(type(m).__module__.startswith(("torch.", "normsurgeon.")) for m in model.modules() if isinstance(m, TORCH_NORMS))
    _assert_same_on_fresh_inputs(case, model)


# ------------------------------------------------------------------------------- weight norm

WEIGHT_NORMED = {"wav2vec2": 1, "encodec": 20}


@pytest.mark.parametrize("name", list(WEIGHT_NORMED))
def test_remove_weight_norm_bakes_every_weight_normed_layer(zoo, name):
    case = zoo[name]
    model = case.copy()
    sites = [p for p, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]
    assert len(sites) == WEIGHT_NORMED[name]
    report = ns.remove_weight_norm(model, example_inputs=case.inputs)
    _assert_sane(report)
    assert sorted(c.module for c in report.changes) == sorted(sites) and report.facts["removed"] == len(sites)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    _assert_same_on_fresh_inputs(case, model)


# ------------------------------------------------------------------------------- export + verify

EXPORTED = ("resnet", "bert", "llama", "wav2vec2")


@pytest.mark.parametrize("name", EXPORTED)
def test_export_onnx_verifies_in_onnxruntime(zoo, name, tmp_path):
    pytest.importorskip("onnxruntime")
    case = zoo[name]
    before = copy.deepcopy(case.model.state_dict())
    report = ns.export_onnx(case.model, case.inputs, tmp_path / f"{name}.onnx")
    _assert_sane(report)
    labels = [c.label for c in report.checks]
    assert ("folded vs original" in labels) == bool(report.changes)  # a model with nothing to fold is not copied
    assert any(label.startswith("onnxruntime cpu vs torch") for label in labels)
    histogram = report.facts["op_histogram"]
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in case.model.modules())
    assert len(report.changed("folded")) == batchnorms and histogram["BatchNormalization"] == 0
    if name == "wav2vec2":  # the weight norm is baked before export: the file ships the plain weight
        assert "without weight norm vs with" in labels
    assert (tmp_path / f"{name}.onnx").stat().st_size == report.facts["file_bytes"] > 0
    after = case.model.state_dict()  # export works on a copy: the user's model is unchanged
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
