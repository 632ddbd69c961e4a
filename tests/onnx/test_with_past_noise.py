"""verify_with_past / verify_seq2seq judge float32 rounding noise as verify_onnx does (normsurgeon.onnx.with_past).

The subjects are the tiny Llama and T5 exports of tests/onnx/conftest.py, verified against the same torch models
with a hook on every embedding that adds and subtracts 2**15 times the embedding's largest value: exact in
float64, a rounding of each embedding to 1/256 of its largest value in float32. That is the rounding a deep
model accumulates, at a size a 2-layer model shows; the .onnx files compute the same function without it.
Measured (torch 2.13 CPU, onnxruntime 1.32): onnxruntime differs from the hooked torch Llama by 3e-4 to 1.1e-3
per step, above float32's default tolerance, and by about 1x the model's own rounding noise (the hooked loop
replayed in float64); T5 by 5e-3 to 2.3e-2, 0.3-1x its noise. A file with one weight scaled by 1.5 (Llama's
embedding table, T5's lm_head) is 20x / 8x the raised tolerance away and still fails; without the hook a 1%
change of one weight fails at the default tolerance.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from normsurgeon.check import NOISE_FACTOR
from normsurgeon.onnx import with_past
from normsurgeon.onnx.with_past import CacheLayout, verify_with_past
from normsurgeon.onnx.with_past_seq2seq import WITH_PAST_FILE, Seq2SeqLayout, verify_seq2seq
from normsurgeon.report import Report

RAISED = f"(atol raised to {NOISE_FACTOR}x the rounding noise)"


@contextlib.contextmanager
def float32_rounding(model: nn.Module) -> Iterator[None]:
    """``model``'s embeddings rounded to 1/256 of their largest value in float32 (exact in float64)."""

    def round_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        shift = 2.0 ** 15 * output.detach().abs().max()
        return output + shift - shift

    hooks = [m.register_forward_hook(round_output) for m in model.modules() if isinstance(m, nn.Embedding)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def scaled_copy(source: Path, target: Path, weight: str, factor: float) -> Path:
    """``source`` written to ``target`` with the initializer ``weight`` times ``factor``."""
    proto = onnx.load(source)
    (tensor,) = [t for t in proto.graph.initializer if t.name == weight]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    onnx.save(proto, target)
    return target


def assert_accepted_as_rounding(report: Report) -> None:
    """Every check passed, each above float32's default tolerance only with a note that names the step."""
    assert report.passed, [(c.label, c.max_abs_diff, c.atol) for c in report.checks if not c.passed]
    raised = [c for c in report.checks if c.label.endswith(RAISED)]
    assert raised and len(report.notes) == len(raised)
    for check, note in zip(raised, report.notes):
        assert note.startswith(check.label.removesuffix(f" {RAISED}") + ": the default tolerance was exceeded (")
        assert note.endswith("accepted as rounding")
    assert any("decode step 3" in c.label for c in raised)


def test_decoder_loop_within_rounding_noise_passes_with_a_note_per_step(with_past_exports):
    model, path, _ = with_past_exports("llama")
    layout = CacheLayout.of(model)
    with float32_rounding(model):
        report = verify_with_past(model, path, layout)
    assert_accepted_as_rounding(report)
    assert len(report.checks) == 8  # prefill + 3 steps at batch 1 and 2


def test_decoder_loop_with_a_wrong_weight_still_fails(with_past_exports, tmp_path: Path):
    model, path, _ = with_past_exports("llama")
    layout = CacheLayout.of(model)
    wrong = scaled_copy(path, tmp_path / "wrong.onnx", "model.model.embed_tokens.weight", 1.5)
    with float32_rounding(model):
        report = verify_with_past(model, wrong, layout)
    failed = [c for c in report.checks if not c.passed]
    assert failed and not any(c.label.endswith(RAISED) for c in failed)
    assert max(c.max_abs_diff for c in failed) > 0.05


def test_decoder_loop_of_a_well_conditioned_model_fails_on_a_one_percent_change(with_past_exports, tmp_path):
    model, path, _ = with_past_exports("llama")
    wrong = scaled_copy(path, tmp_path / "wrong.onnx", "model.model.embed_tokens.weight", 1.01)
    report = verify_with_past(model, wrong, CacheLayout.of(model))
    assert not report.passed and not report.notes


def test_tolerances_the_caller_gives_are_kept(with_past_exports, monkeypatch: pytest.MonkeyPatch):
    model, path, _ = with_past_exports("llama")
    layout = CacheLayout.of(model)
    monkeypatch.setattr(with_past, "in_float64", _never)
    with float32_rounding(model):
        report = verify_with_past(model, path, layout, atol=1e-5)
    assert not report.passed and not report.notes
    assert all((c.atol, c.rtol) == (1e-5, 1e-4) for c in report.checks)


def test_float64_loop_runs_once_per_batch_and_only_for_a_failed_check(with_past_exports, monkeypatch):
    model, path, _ = with_past_exports("llama")
    layout = CacheLayout.of(model)
    runs = []
    real = with_past.in_float64
    monkeypatch.setattr(with_past, "in_float64", lambda run: runs.append(run) or real(run))
    assert verify_with_past(model, path, layout).passed
    assert not runs
    with float32_rounding(model):
        assert verify_with_past(model, path, layout).passed
    assert len(runs) == 2  # batch 1 and batch 2, not once per step


def test_encoder_decoder_loop_within_rounding_noise_passes_and_a_wrong_file_fails(seq2seq_exports, tmp_path):
    model, folder, _ = seq2seq_exports("t5")
    layout = Seq2SeqLayout.of(model)
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    scaled_copy(wrong / WITH_PAST_FILE, wrong / WITH_PAST_FILE, "model.lm_head.weight", 1.5)
    with float32_rounding(model):
        report = verify_seq2seq(model, folder, layout)
        wrong_report = verify_seq2seq(model, wrong, layout)
        strict = verify_seq2seq(model, folder, layout, atol=1e-5)
    assert_accepted_as_rounding(report)
    assert any(c.label.startswith("onnxruntime cpu vs torch (encoder_model") and c.label.endswith(RAISED)
               for c in report.checks)
    failed = [c.label for c in wrong_report.checks if not c.passed]
    assert failed and all("decode step" in label for label in failed)  # only the with-past file was changed
    assert not strict.passed and not strict.notes


def _never(run: object) -> None:
    raise AssertionError("no float64 loop when the caller gave the tolerances")
