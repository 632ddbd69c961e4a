"""export --dynamic: symbolic axes per modality or by name, each verified at two sizes (issue 15).

The axis rules (normsurgeon/onnx/dynamic_axes.py) and small exports run quickly. The save_pretrained
directories of nine transformers architectures (tests/hf_models.py: hidden 32, 2 layers, random
weights) go through the CLI in this process and are marked slow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from normsurgeon.errors import ExportError, UsageError
from normsurgeon.onnx.dynamic_axes import (
    Dynamic,
    input_names,
    other_size,
    parse_dynamic,
    resized,
    resolve_axes,
    widened,
)
from normsurgeon.onnx.export import expand_rotary_caches, export_onnx
from tests.hf_models import PRETRAINED, VOCAB, pretrained_dirs
from tests.onnx.conftest import conv_bn, files_in, image

# An independent run in onnxruntime passes when max|onnx - torch| <= ATOL + RTOL * max|torch|.
ATOL, RTOL = 1e-5, 1e-4


def onnx_matches_torch(path: Path, model: nn.Module, feeds: dict[str, np.ndarray], **kwargs: object) -> float:
    """Run ``path`` in onnxruntime (no normsurgeon code) and ``model`` in torch; the first outputs'
    max|diff| relative to max|torch|, asserted within tolerance."""
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, **kwargs)
    want = (out if isinstance(out, torch.Tensor) else out[0]).numpy()
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    assert diff <= ATOL + RTOL * scale, (diff, scale)
    return diff / max(scale, 1e-12)


class Any_(nn.Module):
    """Takes any keyword inputs: resolve_axes names them by their keys."""

    def forward(self, **inputs: torch.Tensor) -> None:
        return None


# --------------------------------------------------------------------------- axis rules


def test_dynamic_alone_means_the_defaults_and_by_name_lists_exactly_those_axes():
    assert parse_dynamic([], defaults=True) == Dynamic(defaults=True)
    assert parse_dynamic(["pixel_values:0=batch,2=height", "mask:1=sequence"]) == Dynamic(
        named={"pixel_values": {0: "batch", 2: "height"}, "mask": {1: "sequence"}})
    assert parse_dynamic(["x:3=width"], defaults=True) == Dynamic(defaults=True, named={"x": {3: "width"}})
    assert not parse_dynamic([])


@pytest.mark.parametrize("value", ["", "x", "x:", "x:1", "x:a=batch", "x:1=not-a-name", ":0=batch", "x:1=a,1=b",
                                   "models/llama"])
def test_a_bad_dynamic_spec_says_the_form(value):
    with pytest.raises(UsageError, match=rf"bad --dynamic-axis {value!r}: expected NAME:AXIS=SYMBOL\[,AXIS=SYMBOL\]"):
        parse_dynamic([value])


def test_default_axes_per_modality():
    inputs = {
        "input_ids": torch.zeros(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long),
        "decoder_input_ids": torch.zeros(2, 8, dtype=torch.long), "pixel_values": torch.zeros(2, 3, 32, 32),
        "input_features": torch.zeros(2, 80, 3000), "input_values": torch.zeros(2, 16000),
        "speaker": torch.zeros(2, 4), "scale": torch.tensor(2.0), "use_cache": False,
    }  # two audio forms in one model: the second time axis gets its own symbol
    axes = resolve_axes(Any_(), inputs, Dynamic(defaults=True))

    assert {(a.input, a.dim): a.symbol for a in axes} == {
        ("input_ids", 0): "batch", ("input_ids", 1): "sequence",
        ("attention_mask", 0): "batch", ("attention_mask", 1): "sequence",
        ("decoder_input_ids", 0): "batch", ("decoder_input_ids", 1): "decoder_sequence",
        ("pixel_values", 0): "batch", ("pixel_values", 2): "height", ("pixel_values", 3): "width",
        ("input_features", 0): "batch", ("input_features", 2): "time",
        ("input_values", 0): "batch", ("input_values", 1): "input_values_time",
        ("speaker", 0): "batch",
    }
    assert not any(a.required for a in axes)  # defaults: one the model fixes stays static


def test_multichannel_audio_gets_its_last_axis_as_time():
    """EnCodec takes input_values as (batch, channels, samples): the channels stay, the samples vary."""
    axes = resolve_axes(Any_(), {"input_values": torch.zeros(2, 1, 8000)}, Dynamic(defaults=True))

    assert {(a.input, a.dim): a.symbol for a in axes} == {("input_values", 0): "batch", ("input_values", 2): "time"}


def test_axes_by_name_replace_that_inputs_defaults_and_are_required():
    inputs = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "pixel_values": torch.zeros(2, 3, 32, 32)}
    axes = resolve_axes(Any_(), inputs, Dynamic(defaults=True, named={"pixel_values": {0: "batch"}}))

    assert [(a.input, a.dim, a.symbol, a.required) for a in axes] == [
        ("input_ids", 0, "batch", False), ("input_ids", 1, "sequence", False), ("pixel_values", 0, "batch", True)]
    only_named = resolve_axes(Any_(), inputs, Dynamic(named={"input_ids": {1: "sequence"}}))
    assert [(a.input, a.dim) for a in only_named] == [("input_ids", 1)]


@pytest.mark.parametrize("dynamic, message", [
    (Dynamic(named={"ids": {0: "batch"}}),
     "--dynamic-axis ids: the model has no tensor input 'ids'; its tensor inputs are input_ids, decoder_input_ids"),
    (Dynamic(named={"input_ids": {2: "x"}}),
     "--dynamic-axis input_ids:2=...: input 'input_ids' has 2 dims (0 to 1)"),
    (Dynamic(named={"input_ids": {1: "seq"}, "decoder_input_ids": {1: "seq"}}),
     "dynamic axis 'seq' is input_ids dim 1 (16) and decoder_input_ids dim 1 (8): axes sharing a symbol must have "
     "one size; give them different symbols"),
    (Dynamic(defaults=True, batch=True),
     "give --dynamic/--dynamic-axis or --dynamic-batch, not both (the --dynamic defaults include the batch)"),
])
def test_axes_that_do_not_fit_the_inputs_are_usage_errors(dynamic, message):
    inputs = {"input_ids": torch.zeros(1, 16, dtype=torch.long),
              "decoder_input_ids": torch.zeros(1, 8, dtype=torch.long)}
    with pytest.raises(UsageError) as info:
        resolve_axes(Any_(), inputs, dynamic)
    assert str(info.value) == message


@pytest.mark.parametrize("symbol, size, other", [
    ("batch", 1, 2), ("batch", 2, 3), ("height", 224, 160), ("width", 32, 64), ("height", 28, 20),
    ("sequence", 16, 7), ("decoder_sequence", 8, 3), ("sequence", 1, 3), ("time", 3000, 1499),
])
def test_the_second_size_each_axis_is_verified_at(symbol, size, other):
    assert other_size(symbol, size) == other


def test_input_names_are_the_exported_graphs_input_names():
    """Positional, nested and keyword inputs are named as torch.onnx names the graph's inputs."""

    class Nested(nn.Module):
        def forward(self, x, pair, scale=2.0):
            return x * scale + pair[0] + pair[1]

    x = torch.randn(2, 3)
    inputs = (x, (x, x), 3.0)
    program = torch.onnx.export(Nested(), inputs, dynamo=True, verbose=False)

    assert input_names(Nested(), inputs) == ["x", "pair_0", "pair_1", "scale"]
    assert [v.name for v in program.model.graph.inputs] == ["x", "pair_0", "pair_1"]  # 3.0 is baked in


def test_a_size_one_axis_is_widened_by_repeating_and_other_sizes_get_fresh_values_in_range():
    ids = torch.tensor([[5, 9, 7]])
    mask = torch.tensor([[1, 1, 0]])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(1, 3, 4, 4) * 3 + 2}
    axes = resolve_axes(Any_(), inputs, Dynamic(defaults=True))

    traced, symbols = widened(inputs, axes)
    assert symbols == ["batch"]
    assert torch.equal(traced["input_ids"], ids.repeat(2, 1)) and traced["pixel_values"].shape == (2, 3, 4, 4)

    other = resized(inputs, axes, {"batch": 3, "sequence": 7, "height": 8}, generator=torch.Generator().manual_seed(0))
    assert other["input_ids"].shape == (3, 7) and other["pixel_values"].shape == (3, 3, 8, 4)
    assert other["input_ids"].min() >= 5 and other["input_ids"].max() <= 9  # within the example's ids
    assert set(other["attention_mask"].unique().tolist()) == {0, 1}
    assert abs(other["pixel_values"].mean().item() - 2) < 1.5  # the example's scale, not randn's


# --------------------------------------------------------------------------- small exports


def test_axes_by_name_are_symbolic_and_verified_at_two_sizes_each(tmp_path):
    model = conv_bn()
    path = tmp_path / "convbn.onnx"
    report = export_onnx(model, image(batch=2), path, dynamic={"x": {0: "batch", 2: "height", 3: "width"}})

    assert report.passed, [c.to_dict() for c in report.checks]
    assert report.facts["graph_inputs"] == {"x": ["batch", 3, "height", "width"]}
    assert report.facts["dynamic_axes"] == {"x": {"0": "batch", "2": "height", "3": "width"}}
    assert report.facts["sizes_verified"] == {"batch": [2, 3], "height": [8, 16], "width": [8, 16]}
    assert [c.label for c in report.checks][-2:] == ["onnxruntime cpu vs torch (batch 2, height 8, width 8)",
                                                     "onnxruntime cpu vs torch (batch 3, height 16, width 16)"]
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 3, 24, 40)).astype(np.float32)}  # sizes not verified
    onnx_matches_torch(path, model, feeds)


def test_a_batch_of_one_exports_a_dynamic_batch(tmp_path):
    report = export_onnx(conv_bn(), image(batch=1), tmp_path / "b1.onnx", dynamic_batch=True)

    assert report.passed and report.facts["graph_inputs"] == {"x": ["batch", 3, 8, 8]}
    assert report.facts["batch_sizes_verified"] == [1, 2]
    assert ("traced on an example widened to batch 2 (torch.export treats a size-1 dim as fixed); verified at the "
            "example's size 1 as well") in report.notes


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, input_ids, attention_mask):
        return self.norm(self.embed(input_ids)) * attention_mask[..., None]


def test_one_token_of_one_sequence_exports_dynamic_batch_and_sequence(tmp_path):
    path = tmp_path / "tokens.onnx"
    model = Tokens().eval()
    inputs = {"input_ids": torch.tensor([[3]]), "attention_mask": torch.tensor([[1]])}
    report = export_onnx(model, inputs, path, dynamic=True)

    assert report.passed
    assert report.facts["graph_inputs"] == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert report.facts["sizes_verified"] == {"batch": [1, 2], "sequence": [1, 3]}
    feeds = {"input_ids": np.full((3, 9), 7, dtype=np.int64), "attention_mask": np.ones((3, 9), dtype=np.int64)}
    onnx_matches_torch(path, model, feeds)


class PoolsToOne(nn.Module):
    """Pools the whole image with a kernel read as Python ints: torch.export fixes height and width."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, pixel_values):
        kernel = (int(pixel_values.shape[2]), int(pixel_values.shape[3]))
        return self.head(F.avg_pool2d(pixel_values, kernel).flatten(1))


def test_a_default_axis_the_model_fixes_stays_static_with_a_note(tmp_path):
    report = export_onnx(PoolsToOne().eval(), {"pixel_values": torch.randn(2, 3, 8, 8)}, tmp_path / "p.onnx",
                         dynamic=True)

    assert report.passed and report.facts["graph_inputs"] == {"pixel_values": ["batch", 3, 8, 8]}
    assert report.facts["dynamic_axes"] == {"pixel_values": {"0": "batch"}}
    assert ("kept static, the model fixes input 'pixel_values' dim 2 (height) at 8 and dim 3 (width) at 8 "
            "(torch.export specialised it)") in report.notes


class BranchesOnTwo(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] == 2 else x


def test_when_every_default_axis_stays_static_the_export_is_verified_at_the_example_sizes(tmp_path):
    """Every axis noted static: no other sizes to verify (a KeyError on the missing sizes_verified before)."""
    report = export_onnx(BranchesOnTwo().eval(), (torch.randn(2, 4),), tmp_path / "b.onnx", dynamic=True)

    assert report.passed and report.facts["dynamic_axes"] == {} and "sizes_verified" not in report.facts
    assert any(n.startswith("kept static") for n in report.notes)


def test_an_axis_asked_for_by_name_that_the_model_fixes_is_an_error_naming_it(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(PoolsToOne().eval(), {"pixel_values": torch.randn(2, 3, 8, 8)}, tmp_path / "p.onnx",
                    dynamic={"pixel_values": {0: "batch", 2: "height"}})

    assert str(info.value).startswith(
        "the model fixes input 'pixel_values' dim 2 (height) at 8: torch.export made it static; export with it "
        "static (leave it out of --dynamic-axis, or leave out --dynamic-batch), or change the code that fixes it")
    assert files_in(tmp_path) == []


class ReshapesToEight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 8 * 8, 2)

    def forward(self, pixel_values):
        return self.head(pixel_values.reshape(pixel_values.shape[0], 3, 8, 8).flatten(1))


def test_a_default_axis_the_model_does_not_run_along_stays_static_and_one_asked_for_is_an_error(tmp_path):
    """torch.export keeps height and width symbolic here (only height*width is fixed): the torch run says."""
    inputs = {"pixel_values": torch.randn(2, 3, 8, 8)}
    report = export_onnx(ReshapesToEight().eval(), inputs, tmp_path / "r.onnx", dynamic=True)

    assert report.passed and report.facts["graph_inputs"] == {"pixel_values": ["batch", 3, 8, 8]}
    assert any(n.startswith("kept static, the model does not run along input 'pixel_values' dim 2 (height) at 16 "
                            "(RuntimeError: shape '[2, 3, 8, 8]' is invalid") for n in report.notes)
    with pytest.raises(ExportError, match=r"^the model does not run along input 'pixel_values' dim 3 \(width\) at 16 "):
        export_onnx(ReshapesToEight().eval(), inputs, tmp_path / "s.onnx", dynamic={"pixel_values": {3: "width"}})


def test_axes_the_model_ties_together_share_one_symbol(tmp_path):
    class Add(nn.Module):
        def forward(self, a, b):
            return a + b

    inputs = (torch.randn(2, 5), torch.randn(2, 5))
    report = export_onnx(Add().eval(), inputs, tmp_path / "a.onnx", dynamic={"a": {1: "left"}, "b": {1: "right"}})

    assert report.passed and report.facts["graph_inputs"] == {"a": [2, "left"], "b": [2, "left"]}
    assert "the model ties b dim 1 (right) to left: one symbol" in report.notes
    assert report.facts["sizes_verified"] == {"left": [5, 7]}


def test_rotary_embeddings_get_cos_and_sin_of_the_inputs_batch():
    """onnxscript fuses x*cos + rotate_half(x)*sin with batch-1 cos/sin into RotaryEmbedding, which does not
    broadcast: onnxruntime then refuses every batch but 1. The Expand makes the node compute the formula."""
    heads, seq, size = 2, 5, 8
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", heads, seq, size])
    cos_info, sin_info = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, seq, size // 2]) for n in "cs")
    node = helper.make_node("RotaryEmbedding", ["x", "c", "s"], ["y"], num_heads=heads)
    graph = helper.make_graph([node], "rope", [x_info, cos_info, sin_info],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, heads, seq, size)).astype(np.float32)
    angles = rng.standard_normal((1, seq, size // 2)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)

    assert expand_rotary_caches(model) == 1
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x, "c": cos, "s": sin})

    full_cos, full_sin = (np.concatenate([t, t], -1)[:, None] for t in (cos, sin))
    rotated = np.concatenate([-x[..., size // 2:], x[..., : size // 2]], -1)
    np.testing.assert_allclose(got, x * full_cos + rotated * full_sin, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- save_pretrained directories

# What `--dynamic` keeps symbolic in each (tiny) architecture. ViT checks the image size against its
# position embeddings, HF MobileNetV2's TF padding reads sizes as ints, Whisper checks for 2 x
# max_source_positions mel frames: their other axes stay static, with a note.
TEXT_AXES = {"input_ids": {"0": "batch", "1": "sequence"}}
DYNAMIC_AXES = {
    "bert": TEXT_AXES, "llama": TEXT_AXES, "qwen2": TEXT_AXES, "gpt2": TEXT_AXES,
    "t5": {**TEXT_AXES, "decoder_input_ids": {"0": "batch", "1": "decoder_sequence"}},
    "whisper": {"input_features": {"0": "batch"}, "decoder_input_ids": {"0": "batch", "1": "decoder_sequence"}},
    "resnet": {"pixel_values": {"0": "batch", "2": "height", "3": "width"}},
    "vit": {"pixel_values": {"0": "batch"}}, "mobilenetv2": {"pixel_values": {"0": "batch"}},
}
# Sizes the tool never verifies at (it uses the example's and other_size's), for the independent run.
UNSEEN = {"batch": 3, "sequence": 11, "decoder_sequence": 5, "height": 96, "width": 64}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, nn.Module]]:
    return pretrained_dirs(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRETRAINED)
def test_a_dynamic_export_is_verified_at_two_sizes_along_every_axis(name, pretrained, cli, tmp_path):
    folder, model = pretrained(name)
    path = tmp_path / f"{name}.onnx"

    result = cli("export", folder, "--dynamic", "-o", path, "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    facts = report["facts"]
    assert facts["dynamic_axes"] == DYNAMIC_AXES[name]
    symbols = {s for axes in DYNAMIC_AXES[name].values() for s in axes.values()}
    assert set(facts["sizes_verified"]) == symbols and all(len(facts["sizes_verified"][s]) == 2 for s in symbols)
    onnx_checks = [c for c in report["checks"] if c["label"].startswith("onnxruntime")]
    assert len(onnx_checks) == 2 and all(c["passed"] for c in onnx_checks)
    if name in ("whisper", "vit", "mobilenetv2"):
        assert any(n.startswith("kept static, the model") for n in report["notes"])

    assert not any(UNSEEN[s] in facts["sizes_verified"][s] for s in symbols)
    feeds = _feeds(facts["graph_inputs"], np.random.default_rng(0))
    onnx_matches_torch(path, model, feeds, **({"use_cache": False} if name in ("llama", "qwen2", "gpt2", "t5",
                                                                                  "whisper") else {}))


def _feeds(graph_inputs: dict[str, list], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs at the UNSEEN sizes: token ids below the vocabulary, random floats otherwise."""
    feeds = {}
    for name, dims in graph_inputs.items():
        shape = [UNSEEN[d] if isinstance(d, str) else d for d in dims]
        feeds[name] = (rng.integers(0, VOCAB, shape) if name.endswith("input_ids")
                       else rng.standard_normal(shape).astype(np.float32))
    return feeds


@pytest.mark.slow
def test_dynamic_by_name_on_a_directory(pretrained, cli, tmp_path):
    folder, _ = pretrained("resnet")
    path = tmp_path / "resnet.onnx"

    result = cli("export", folder, "--dynamic-axis", "pixel_values:0=batch,2=height", "-o", path, "--json")

    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)["facts"]
    assert facts["graph_inputs"] == {"pixel_values": ["batch", 3, "height", 224]}
    assert facts["sizes_verified"] == {"batch": [1, 2], "height": [160, 224]}
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[2].dim_param == "height"


@pytest.mark.parametrize("args, message", [
    (["--dynamic-axis", "pixel:0=batch"], "error: --dynamic-axis pixel: the model has no tensor input 'pixel'; its "
                                          "tensor inputs are pixel_values"),
    (["--dynamic", "--dynamic-batch"], "error: give --dynamic/--dynamic-axis or --dynamic-batch, not both"),
    (["--dynamic-axis", "pixel_values"], "error: bad --dynamic-axis 'pixel_values': expected NAME:AXIS=SYMBOL"),
])
def test_cli_dynamic_that_does_not_fit_exits_2_before_exporting(args, message, pretrained, cli, tmp_path):
    folder, _ = pretrained("resnet")

    result = cli("export", folder, "-o", tmp_path / "r.onnx", *args)

    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert files_in(tmp_path) == []


def test_a_constraint_violation_the_exporter_raises_names_the_axes_and_the_fix():
    """Where torch.onnx cannot make an axis static itself, torch.export's message names the symbols."""
    from normsurgeon.onnx.export import describe_export_failure

    error = RuntimeError("Constraints violated (height, width)! For more information, run with TORCH_LOGS=+dynamic.\n"
                         "  - You marked height as dynamic but your code specialized it to be a constant (32).\n"
                         "  - You marked width as dynamic but your code specialized it to be a constant (32).")

    message = describe_export_failure(error, conv_bn(), verbose=True)

    assert message == ("cannot export the model to ONNX: the model fixes height, width, which was asked to be dynamic "
                       "(or ties it to another axis); export with it static (leave it out of --dynamic-axis, or leave out "
                       "--dynamic-batch)")


def test_verifying_a_static_file_at_another_image_size_suggests_dynamic(exported_convbn):
    from normsurgeon.onnx.verify import verify_onnx

    model, path = exported_convbn
    wider = (torch.randn(2, 3, 8, 16),)
    with pytest.raises(UsageError, match=r"input 'x' is \(2, 3, 8, 16\) but the ONNX model's static shape is "
                       r"\(2, 3, 8, 8\); pass inputs of the shape it takes \(--input-shape/--inputs\), or export "
                       r"with --dynamic for other sizes$"):
        verify_onnx(model, path, wider)
