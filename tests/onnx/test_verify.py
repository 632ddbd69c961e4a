"""verify_onnx: torch against onnxruntime on the same inputs, one check per provider and input set."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from normsurgeon.errors import LoadError, UsageError
from normsurgeon.onnx.verify import eval_mode, verify_onnx
from tests.onnx.conftest import HAS_CUDA_EP, NO_CUDA_REASON, Nested, image


def _export(model: nn.Module, args: tuple, path: Path, **kwargs) -> Path:
    torch.onnx.export(model, args, dynamo=True, verbose=False, **kwargs).save(path)
    return path


def test_matching_model_passes_with_one_labelled_check(exported_convbn):
    model, path = exported_convbn
    report = verify_onnx(model, path, image())
    assert report.pass_name == "verify"
    assert report.passed
    (check,) = report.checks
    assert check.label == "onnxruntime cpu vs torch (batch 2)"
    assert [o.name for o in check.outputs] == ["output"]
    assert check.max_abs_diff < 1e-5 and check.min_cosine > 0.999999
    assert report.facts["batch_sizes_verified"] == [2]
    assert report.facts["providers"] == ["cpu"]


def test_different_weights_fail_the_check(exported_convbn):
    model, path = exported_convbn
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.bias.add_(0.1)
    report = verify_onnx(changed, path, image())
    assert not report.passed
    assert report.check.max_abs_diff == pytest.approx(0.1, rel=1e-3)


def test_tolerance_is_the_callers(exported_convbn):
    model, path = exported_convbn
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.bias.add_(0.1)
    report = verify_onnx(changed, path, image(), atol=0.2, rtol=0.0)
    assert report.passed
    assert (report.check.atol, report.check.rtol) == (0.2, 0.0)


def test_each_extra_input_set_is_its_own_check(exported_convbn):
    model, path = exported_convbn
    report = verify_onnx(model, path, image(seed=1), extra_inputs=[image(seed=2)])
    assert [c.label for c in report.checks] == ["onnxruntime cpu vs torch (batch 2)"] * 2
    assert report.passed


def test_wrong_batch_for_a_static_graph_is_a_failed_check_not_a_crash(exported_convbn):
    model, path = exported_convbn
    report = verify_onnx(model, path, image(), extra_inputs=[image(batch=3)])
    assert [c.passed for c in report.checks] == [True, False]
    assert report.checks[1].label == "onnxruntime cpu vs torch (batch 3)"
    assert report.checks[1].outputs[0].detail == (
        "input 'x' is (3, 3, 8, 8) but the ONNX model's static shape is (2, 3, 8, 8): this file cannot run these inputs")
    assert report.facts["batch_sizes_verified"] == [2, 3]


def test_inputs_the_file_cannot_take_are_a_usage_error_naming_the_shape_it_takes(exported_convbn):
    model, path = exported_convbn
    with pytest.raises(UsageError, match=r"input 'x' is \(3, 3, 8, 8\) but the ONNX model's static shape is "
                       r"\(2, 3, 8, 8\); pass inputs of the shape it takes .*--dynamic-batch"):
        verify_onnx(model, path, image(batch=3))




def test_nested_outputs_and_mixed_inputs(tmp_path):
    torch.manual_seed(0)
    model = Nested().eval()
    inputs = (torch.randn(2, 3, 4), torch.randint(0, 10, (2, 3)), None, 3.0)
    path = _export(model, inputs, tmp_path / "nested.onnx")
    report = verify_onnx(model, path, inputs)
    assert report.passed
    names = [o.name for o in report.check.outputs]
    assert names == ["output.hidden", "output.pair[0]", "output.pair[1]"]
    assert report.check.outputs[2].max_abs_diff == 0.0  # integer output: exactly equal


def test_keyword_inputs_match_by_name(tmp_path):
    torch.manual_seed(0)
    model = Nested().eval()
    kwargs = {"ids": torch.randint(0, 10, (2, 3)), "x": torch.randn(2, 3, 4)}
    path = tmp_path / "kw.onnx"
    torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, verbose=False).save(path)
    assert verify_onnx(model, path, kwargs).passed


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x), x.sum()


def test_different_output_counts_fail_with_the_reason(tmp_path):
    model = TwoOutputs().eval()
    x = torch.randn(2, 4)
    path = _export(model.lin, (x,), tmp_path / "one.onnx")
    report = verify_onnx(model, path, (x,))
    assert not report.passed
    (diff,) = report.check.outputs
    assert diff.detail == "the ONNX model has 1 outputs, the torch model 2 tensor outputs"
    assert math.isnan(diff.max_abs_diff)


def test_input_count_mismatch_is_a_usage_error(exported_convbn):
    model, path = exported_convbn
    with pytest.raises(UsageError, match=r"takes 1 inputs \(x\) but the example inputs hold 2 tensors"):
        verify_onnx(model, path, image() + image())


def test_input_dtype_mismatch_is_a_usage_error(exported_convbn):
    model, path = exported_convbn
    with pytest.raises(UsageError, match=r"input 'x' is float64 but the ONNX model expects tensor\(float\); "
                       r"pass inputs of that dtype \(e.g. --input-shape 2,3,8,8:float32\)"):
        verify_onnx(copy.deepcopy(model).double(), path, (image()[0].double(),))


def test_missing_file_is_a_load_error(tmp_path, convbn):
    with pytest.raises(LoadError, match="no such file"):
        verify_onnx(convbn, tmp_path / "absent.onnx", image())


def test_training_mode_runs_eval_and_restores_every_flag(exported_convbn):
    model, path = exported_convbn
    model = copy.deepcopy(model).train()
    model.head.eval()  # a mixed state must survive
    assert verify_onnx(model, path, image()).passed  # BN used running stats, as exported
    assert model.training and model.bn.training and not model.head.training


def test_eval_mode_restores_on_error(convbn):
    convbn.train()
    with pytest.raises(RuntimeError), eval_mode(convbn):
        assert not convbn.training
        raise RuntimeError
    assert convbn.training and convbn.bn.training


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime has a CUDAExecutionProvider here")
def test_cuda_without_cuda_is_a_usage_error(exported_convbn):
    model, path = exported_convbn
    with pytest.raises(UsageError, match="onnxruntime has no CUDAExecutionProvider here"):
        verify_onnx(model, path, image(), providers="cuda")


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime has a CUDAExecutionProvider here")
def test_all_providers_notes_the_skipped_cuda(exported_convbn):
    model, path = exported_convbn
    report = verify_onnx(model, path, image(), providers="all")
    assert [c.label for c in report.checks] == ["onnxruntime cpu vs torch (batch 2)"]
    assert any(note.startswith("cuda: skipped, onnxruntime has no CUDAExecutionProvider") for note in report.notes)


def test_unknown_provider_is_a_usage_error(exported_convbn):
    model, path = exported_convbn
    with pytest.raises(UsageError, match="unknown provider 'tpu': use one of cpu, cuda, all"):
        verify_onnx(model, path, image(), providers="tpu")


@pytest.mark.gpu
def test_cuda_provider_matches_torch(exported_convbn):
    if not HAS_CUDA_EP:
        pytest.skip(NO_CUDA_REASON)
    model, path = exported_convbn
    report = verify_onnx(model, path, image(), providers="all")
    assert [c.label for c in report.checks] == [
        "onnxruntime cpu vs torch (batch 2)",
        "onnxruntime cuda vs torch (batch 2)",
    ]
    assert report.passed, [c.to_dict() for c in report.checks]
