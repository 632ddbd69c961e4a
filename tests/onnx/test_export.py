"""export_onnx: fold, export, save atomically, verify in onnxruntime — and fail cleanly."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import models
from normsurgeon.errors import ExportError, LoadError, OutputError, UsageError
from normsurgeon.onnx import export as export_module
from normsurgeon.onnx.export import (
    DEFAULT_OPSET,
    describe_export_failure,
    export_onnx,
    op_histogram,
    pre_export_passes,
)
from normsurgeon.onnx.verify import verify_onnx
from tests.onnx.conftest import HAS_CUDA_EP, NO_CUDA_REASON, Nested, conv_bn, files_in, image

ORT_CPU = "onnxruntime cpu vs torch (batch 2)"
KEPT_BATCHNORMS = {"preact_resnet": 4}  # by design: no neighbour they fold into exactly
NATIVE_NORMS = {
    "llama": ("RMSNormalization", 5),  # hand-written RMSNorm, fused by the opset-23 export
    "prenorm_transformer": ("LayerNormalization", 5),
    "postnorm_transformer": ("LayerNormalization", 5),
    "groupnorm_unet": ("GroupNormalization", 10),
}


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --------------------------------------------------------------------------- reference models


@pytest.mark.slow
@pytest.mark.parametrize("name", list(models.REGISTRY))
def test_reference_model_exports_and_matches(name, tmp_path):
    model = models.build(name)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    batchnorms = _batchnorms(model)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, models.example_inputs(name, 2), path)

    assert report.passed, [c.to_dict() for c in report.checks]
    weight_normed = name in ("hifigan", "hifigan_legacy")
    removal = ["without weight norm vs with"] if weight_normed else []
    changed = weight_normed or batchnorms > KEPT_BATCHNORMS.get(name, 0)  # else exported as it is, no copy, no check
    assert [c.label for c in report.checks] == [*removal, *(["folded vs original"] if changed else []), ORT_CPU]
    if weight_normed:  # weight norm is baked into plain weights before export
        assert len(report.changed("weight norm removed")) > 0
    histogram = report.facts["op_histogram"]
    assert histogram["BatchNormalization"] == len(report.skipped) == KEPT_BATCHNORMS.get(name, 0)
    assert len(report.changed("folded")) >= batchnorms - KEPT_BATCHNORMS.get(name, 0)
    if name in NATIVE_NORMS:
        op, count = NATIVE_NORMS[name]
        assert histogram[op] == count
    assert report.facts["opset"] == DEFAULT_OPSET
    assert report.facts["file_bytes"] == path.stat().st_size
    assert report.facts["batch_sizes_verified"] == [2]
    assert files_in(tmp_path) == [path.name]
    # the caller's model is untouched, and the file matches it on inputs the export never saw
    assert _batchnorms(model) == batchnorms
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    fresh = tuple(t[2:] for t in models.example_inputs(name, 4))
    assert verify_onnx(model, path, fresh).passed


# --------------------------------------------------------------------------- transformers, offline


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.slow
def test_transformers_resnet_ships_without_batchnorm(transformers, tmp_path):
    from tests.helpers import give_realistic_stats

    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"
    )
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = give_realistic_stats(transformers.ResNetModel(config), x)
    report = export_onnx(model, (x,), tmp_path / "resnet.onnx")
    assert report.passed, [c.to_dict() for c in report.checks]
    assert report.facts["op_histogram"]["BatchNormalization"] == 0
    assert len(report.changed("folded")) == _batchnorms(model) > 0
    assert [o.name for o in report.checks[-1].outputs] == ["output.last_hidden_state", "output.pooler_output"]


@pytest.mark.slow
def test_transformers_bert_with_attention_mask_and_dynamic_batch(transformers, tmp_path):
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding, so the mask matters
    inputs = {"input_ids": ids, "attention_mask": mask}
    report = export_onnx(model, inputs, tmp_path / "bert.onnx", dynamic_batch=True)
    assert report.passed, [c.to_dict() for c in report.checks]
    assert [c.label for c in report.checks] == [ORT_CPU, "onnxruntime cpu vs torch (batch 3)"]  # nothing to fold
    assert report.facts["graph_inputs"] == {"input_ids": ["batch", 7], "attention_mask": ["batch", 7]}
    assert report.facts["op_histogram"]["LayerNormalization"] == 5


@pytest.mark.slow
def test_transformers_llama_for_causal_lm(transformers, tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, (ids,), tmp_path / "llama.onnx")
    assert report.passed, [c.to_dict() for c in report.checks]
    assert [o.name for o in report.checks[-1].outputs] == ["output.logits"]
    assert report.facts["op_histogram"]["RMSNormalization"] == 5


# --------------------------------------------------------------------------- options


def test_dynamic_batch_is_symbolic_and_verified_at_two_sizes(convbn, tmp_path):
    path = tmp_path / "dyn.onnx"
    report = export_onnx(convbn, image(batch=2), path, dynamic_batch=True)
    assert report.passed
    assert report.facts["graph_inputs"] == {"x": ["batch", 3, 8, 8]}
    assert report.facts["batch_sizes_verified"] == [2, 3]
    assert [c.label for c in report.checks] == ["folded vs original", ORT_CPU, "onnxruntime cpu vs torch (batch 3)"]
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert verify_onnx(convbn, path, image(batch=5)).passed




def test_several_inputs_baked_values_and_nested_outputs_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "nested.onnx"
    inputs = (torch.randn(2, 3, 4), torch.randint(0, 10, (2, 3)), None, 3.0)
    report = export_onnx(Nested().eval(), inputs, path, dynamic_batch=True)
    assert report.passed
    assert report.facts["graph_inputs"] == {"x": ["batch", 3, 4], "ids": ["batch", 3]}
    assert [o.name for o in report.checks[-1].outputs] == ["output.hidden", "output.pair[0]", "output.pair[1]"]
    outputs = onnx.load(str(path)).graph.output
    assert [o.type.tensor_type.shape.dim[0].dim_param for o in outputs] == ["batch"] * 3


def test_dynamic_batch_that_the_model_pins_is_an_export_error(tmp_path):
    class Pinned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            return self.lin(x.reshape(2, 8))

    with pytest.raises(ExportError, match=r"^the model does not run along input 'x' dim 0 \(batch\) at 3 \(RuntimeError: "
                                          r"shape '\[2, 8\]' is invalid .*\); export with it static \(leave it out of "
                                          r"--dynamic-axis, or leave out --dynamic-batch\)$"):
        export_onnx(Pinned().eval(), (torch.randn(2, 8),), tmp_path / "p.onnx", dynamic_batch=True)
    assert files_in(tmp_path) == []


def test_without_fold_the_batchnorm_ships(tmp_path):
    name = "token_mlp"  # Linear → transpose → BN1d: only normsurgeon's fold removes this BN
    report = export_onnx(models.build(name), models.example_inputs(name, 2), tmp_path / "m.onnx", fold=False)
    assert report.passed
    assert [c.label for c in report.checks] == [ORT_CPU]
    assert report.facts["op_histogram"]["BatchNormalization"] == 1
    assert [p.name for p in pre_export_passes(fold=False).passes] == ["remove_weight_norm", "bake_weight_standardization"]
    assert [p.name for p in pre_export_passes(fold=True).passes] == [
        "remove_weight_norm", "bake_weight_standardization", "reparameterize", "fold_batchnorm"]
    assert not any("torch.onnx.export's optimizer fused" in note for note in report.notes)


def test_without_fold_the_report_says_when_torchs_optimizer_fused_the_batchnorms_itself(tmp_path):
    report = export_onnx(conv_bn(), image(), tmp_path / "c.onnx", fold=False)
    assert report.passed and not report.changes
    assert report.facts["op_histogram"]["BatchNormalization"] == 0
    assert ("normsurgeon folded no BatchNorm (--no-fold), but torch.onnx.export's optimizer fused 1 of the model's 1 "
            "into the convs before them; the file has 0 BatchNormalization nodes") in report.notes


def test_training_mode_model_is_exported_in_eval_mode_and_left_training(tmp_path):
    model = conv_bn().train()
    report = export_onnx(model, image(), tmp_path / "t.onnx")
    assert report.passed
    assert "the model was in training mode: exported and verified its eval-mode behaviour" in report.notes
    assert model.training and model.bn.training and _batchnorms(model) == 1


def test_opset_the_exporter_cannot_produce_is_an_export_error(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.RMSNorm(192)).eval()  # onnx's C converter fails on it
    with pytest.raises(ExportError, match=r"could not produce opset 26 \(it produced 18\); use --opset 23"):
        export_onnx(model, image(), tmp_path / "o.onnx", opset=26)
    assert files_in(tmp_path) == []


def test_weights_too_big_to_inline_go_beside_the_file(convbn, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "INLINE_WEIGHTS_LIMIT", 0)
    path = tmp_path / "big.onnx"
    report = export_onnx(convbn, image(), path)
    assert report.passed
    assert files_in(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert report.facts["external_data_bytes"] == (tmp_path / "big.onnx.data").stat().st_size > 0
    assert verify_onnx(convbn, path, image()).passed  # the final file finds its data


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "external-data"])
def test_failure_after_saving_leaves_nothing(convbn, tmp_path, monkeypatch, inline):
    if not inline:
        monkeypatch.setattr(export_module, "INLINE_WEIGHTS_LIMIT", 0)

    def unloadable(*args, **kwargs):
        raise LoadError("x.onnx: onnxruntime cannot load it (broken)")

    monkeypatch.setattr(export_module, "verify_onnx", unloadable)
    with pytest.raises(ExportError, match=r"onnxruntime cannot load the exported model \(x.onnx: .*broken\)\)"):
        export_onnx(convbn, image(), tmp_path / "m.onnx")
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------- bad outputs


def test_output_in_a_missing_directory(convbn, tmp_path):
    with pytest.raises(OutputError, match=r"directory .*missing does not exist; create it or choose another path"):
        export_onnx(convbn, image(), tmp_path / "missing" / "m.onnx")
    assert files_in(tmp_path) == []


def test_existing_output_needs_force(convbn, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(OutputError, match="exists; pass --force to overwrite"):
        export_onnx(convbn, image(), path)
    assert path.read_bytes() == b"old"
    assert export_onnx(convbn, image(), path, force=True).passed
    assert files_in(tmp_path) == ["m.onnx"]


def test_input_file_is_protected_even_with_force(convbn, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"input")
    with pytest.raises(OutputError, match="it is the input file"):
        export_onnx(convbn, image(), path, force=True, protect=[path])
    assert path.read_bytes() == b"input"


# --------------------------------------------------------------------------- models that cannot export


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class Eig(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x @ x.T).real


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.block = inner

    def forward(self, x):
        return self.block(self.lin(x))


def test_data_dependent_control_flow_names_the_module_and_line(tmp_path):
    with pytest.raises(ExportError) as caught:
        export_onnx(Wrapper(Branchy()).eval(), (torch.randn(4, 4),), tmp_path / "m.onnx")
    message = str(caught.value)
    assert message.startswith("cannot export the model to ONNX: data-dependent control flow")
    assert "in module 'block' (Branchy) at test_export.py:" in message
    assert "`if x.sum() > 0:`" in message
    assert message.endswith("rerun with --verbose for the full traceback")
    assert "\n" not in message
    assert caught.value.__cause__ is not None
    assert files_in(tmp_path) == []


def test_operator_without_onnx_translation_names_the_op_and_module(tmp_path):
    with pytest.raises(ExportError) as caught:
        export_onnx(Wrapper(Eig()).eval(), (torch.randn(4, 4),), tmp_path / "m.onnx", verbose=True)
    message = str(caught.value)
    assert message.startswith(
        "cannot export the model to ONNX: operator aten.linalg_eig.default has no ONNX translation "
        "in module 'block' (Eig) at test_export.py:"
    )
    assert "--verbose" not in message  # already verbose: the CLI prints the chained traceback
    assert caught.value.__cause__ is not None
    assert files_in(tmp_path) == []


def test_other_export_failures_keep_the_root_cause_on_one_line(convbn):
    try:
        raise RuntimeError("\x1b[96mboom\x1b[0m\nsecond line")
    except RuntimeError as inner:
        try:
            raise ValueError("wrapper") from inner
        except ValueError as outer:
            message = describe_export_failure(outer, convbn)
    assert message == (
        "cannot export the model to ONNX: RuntimeError: boom; rewrite that code so torch.export can trace it; "
        "rerun with --verbose for the full traceback"
    )


class _ReturnsACache(nn.Module):
    """Returns an object of an unregistered class, as transformers' models return a DynamicCache."""

    class DynamicCache:
        def __init__(self, keys: torch.Tensor) -> None:
            self.keys = keys

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, self.DynamicCache(y)


def test_an_output_onnx_cannot_hold_is_named_with_the_fix(tmp_path):
    with pytest.raises(ExportError) as caught:
        export_onnx(_ReturnsACache().eval(), (torch.randn(2, 4),), tmp_path / "c.onnx")
    message = str(caught.value)
    assert message.startswith("cannot export the model to ONNX: the model returns a DynamicCache (")
    assert "set model.config.use_cache = False before saving the model (transformers), or return only tensors" in message
    assert files_in(tmp_path) == []


def test_a_long_root_cause_is_cut_after_a_sentence_not_mid_word(convbn):
    first = "The cause, said at length: " + "this and that, " * 7 + "and so on."  # 132 characters
    message = describe_export_failure(RuntimeError(first + " Se" + "e the docs for more " * 8), convbn)
    assert f"RuntimeError: {first}; rewrite that code" in message  # not "... Se;", as torch's own message got cut
    message = describe_export_failure(RuntimeError("word " * 60), convbn)
    assert "RuntimeError: " + "word " * 39 + "word ...; rewrite" in message


# --------------------------------------------------------------------------- providers


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime has a CUDAExecutionProvider here")
def test_cuda_without_cuda_fails_before_exporting(convbn, tmp_path):
    with pytest.raises(UsageError, match="onnxruntime has no CUDAExecutionProvider here"):
        export_onnx(convbn, image(), tmp_path / "m.onnx", providers="cuda")
    assert files_in(tmp_path) == []


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime has a CUDAExecutionProvider here")
def test_all_providers_notes_the_skipped_cuda(convbn, tmp_path):
    report = export_onnx(convbn, image(), tmp_path / "m.onnx", providers="all")
    assert report.passed
    assert any(note.startswith("cuda: skipped") for note in report.notes)


@pytest.mark.gpu
def test_cuda_provider_matches_torch(convbn, tmp_path):
    if not HAS_CUDA_EP:
        pytest.skip(NO_CUDA_REASON)
    report = export_onnx(convbn, image(), tmp_path / "m.onnx", providers="cuda", dynamic_batch=True)
    assert [c.label for c in report.checks[1:]] == [
        "onnxruntime cuda vs torch (batch 2)",
        "onnxruntime cuda vs torch (batch 3)",
    ]
    assert report.passed, [c.to_dict() for c in report.checks]


# --------------------------------------------------------------------------- helpers


def test_op_histogram_counts_subgraphs_and_functions_and_shows_absent_norms():
    bn_inputs = ["x", "s", "b", "m", "v"]
    branch = helper.make_graph([helper.make_node("BatchNormalization", bn_inputs, ["y"])], "then", [], [])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "else", [], [])
    graph = helper.make_graph(
        [
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other),
            helper.make_node("F", ["y"], ["z"], domain="local"),
        ],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    opset = helper.make_opsetid("", 23)
    function = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [opset])
    model = helper.make_model(graph, functions=[function], opset_imports=[opset, helper.make_opsetid("local", 1)])
    histogram = op_histogram(model)
    assert histogram == {
        "BatchNormalization": 1, "GroupNormalization": 0, "Identity": 1, "If": 1, "InstanceNormalization": 0,
        "LayerNormalization": 0, "RMSNormalization": 0, "Relu": 1, "local::F": 1,
    }


def test_export_does_not_touch_the_callers_model(convbn, tmp_path):
    original = copy.deepcopy(convbn)
    report = export_onnx(convbn, image(), tmp_path / "m.onnx")
    assert report.facts["op_histogram"]["BatchNormalization"] == 0 and _batchnorms(convbn) > 0
    assert report.model is None  # the folded copy is released before onnxruntime loads the file
    for (name, a), (_, b) in zip(convbn.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_model_the_pre_export_passes_leave_alone_is_exported_without_a_copy(tmp_path, monkeypatch):
    """An LLM has no BatchNorm or weight norm: the copy (1x the weights) is skipped, the model exported as it is."""
    import normsurgeon.onnx.export as export_module

    copies = []
    monkeypatch.setattr(export_module, "copy_model", lambda model: copies.append(model) or copy.deepcopy(model))
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).train()
    report = export_onnx(model, (torch.randn(2, 4),), tmp_path / "m.onnx")
    assert report.passed and copies == []
    assert model.training  # put back as it was
    convbn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    convbn[1].running_var.fill_(2.0)  # calibrated-looking statistics: the fold has work to do
    export_onnx(convbn, (torch.randn(1, 3, 8, 8),), tmp_path / "c.onnx")
    assert copies == [convbn]
