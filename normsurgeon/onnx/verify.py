"""Prove that an .onnx file computes what a torch model computes, in onnxruntime.

The torch model runs in eval mode under ``no_grad``; the .onnx file runs in
onnxruntime with full graph optimizations (what users ship: ORT fuses and rewrites nodes, so this checks the
graph ORT actually executes, not the one on disk), its inline weights memory-mapped from the file rather than
copied (:func:`~normsurgeon.onnx.runtime.session_in_place`). One :class:`~normsurgeon.report.Check` is
made per (execution provider, input set).

Inputs are fed by position: the tensors among the example inputs (a tuple of positional or a
dict of keyword arguments, flattened in pytree order; ``None`` and other non-tensor values were
baked into the graph by the exporter) map to the graph's inputs in order. Outputs are matched
by position too: the dynamo exporter flattens a nested output (tuple, dict, ``transformers``
ModelOutput) in the same pytree order as :func:`~normsurgeon.check.flatten_outputs`.

A check that fails under the default tolerance is judged as the fold's check is: deep nets
amplify float32 rounding (ResNet-152, width 32, one 32x32 image: 1.7e-4 between torch and onnxruntime
for a tolerance of 1.3e-4, the model's own noise 1.6e-4), so when
the difference is within :data:`~normsurgeon.check.NOISE_FACTOR` times the torch model's own
rounding noise (its outputs against itself run in float64), the check passes with a note. The
float64 run is made only for a failed check, once per input set; tolerances the caller gave
are kept as given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from ..check import compare_outputs, default_tolerance, flatten_outputs, rounding_noise, within_rounding_noise
from ..errors import ExportError, LoadError, PreconditionError, UsageError
from ..inputs import ExampleInputs, InputsLike
from ..report import Check, OutputDiff, Report
from ..surgery import eval_mode
from . import runtime
from .dynamic_axes import Axis, axis_sizes

# onnxruntime's input type strings -> the numpy dtype it accepts.
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def verify_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    example_inputs: InputsLike,
    *,
    providers: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    extra_inputs: Sequence[InputsLike] = (),
    axes: Sequence[Axis] = (),
) -> Report:
    """Run ``model`` (torch) and ``onnx_path`` (onnxruntime) on the same inputs; one check each.

    ``providers`` is ``cpu``, ``cuda`` or ``all`` (``all`` notes the providers it skipped).
    ``extra_inputs`` are further input sets of the same structure (e.g. another batch size);
    ``axes``, the file's dynamic axes, name each check's sizes ("batch 3, sequence 7").
    ``report.passed`` is False when any output of any run is outside ``atol + rtol * max|ref|``
    (tolerances default to the output dtype's, see :mod:`normsurgeon.check`; under the defaults, a
    run within the model's own float32 rounding noise passes with a note, as the fold's check does).
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file; check the path of the .onnx model")
    chosen, skipped = runtime.resolve_providers(providers)
    report = Report("verify")
    report.notes.extend(skipped)
    input_sets = [ExampleInputs.of(inputs) for inputs in (example_inputs, *extra_inputs)]
    sessions = {provider: runtime.session(path, provider) for provider in chosen}
    feeds = {p: [onnx_feeds(sess, inputs) for inputs in input_sets] for p, sess in sessions.items()}
    references = [_run_torch(model, inputs) for inputs in input_sets[:1]]  # inputs the model rejects: its error first
    references += [_run_torch(model, inputs, other_sizes=describe_inputs(inputs, axes)) for inputs in input_sets[1:]]
    first = next(iter(sessions))
    if mismatch := shape_mismatch(sessions[first], feeds[first][0]):
        raise UsageError(f"{mismatch.text}; pass inputs of the shape it takes (--input-shape/--inputs)"
                         + (", or export with --dynamic-batch for any batch size" if mismatch.batch_only
                            else ", or export with --dynamic for other sizes"))
    noise = _noise_of(model, input_sets, references) if atol is None and rtol is None else None
    for provider, sess in sessions.items():
        for index, (inputs, feed, reference) in enumerate(zip(input_sets, feeds[provider], references)):
            label = f"onnxruntime {provider} vs torch ({describe_inputs(inputs, axes)})"
            check, note = _compare(sess, feed, reference, label, atol, rtol,
                                   noise=None if noise is None else functools.partial(noise, index))
            report.checks.append(check)
            report.notes.extend([f"{label}: {note}"] if note else [])
    report.facts["providers"] = list(chosen)
    report.facts["batch_sizes_verified"] = sorted({b for b in (i.batch_size() for i in input_sets) if b is not None})
    if axes:
        sizes = [axis_sizes(inputs.plain(), axes) for inputs in input_sets]
        report.facts["sizes_verified"] = {symbol: sorted({s[symbol] for s in sizes}) for symbol in sizes[0]}
    return report


def describe_inputs(inputs: ExampleInputs, axes: Sequence[Axis] = ()) -> str:
    """'batch 2' for a check's label; with dynamic axes, each one's size ('batch 3, sequence 7')."""
    if axes:
        return ", ".join(f"{symbol} {size}" for symbol, size in axis_sizes(inputs.plain(), axes).items())
    batch = inputs.batch_size()
    return f"batch {batch}" if batch is not None else "scalar inputs"


def onnx_feeds(sess: ort.InferenceSession, inputs: InputsLike) -> dict[str, np.ndarray | ort.OrtValue]:
    """The session's feed dict: the inputs' tensors, in order, as numpy arrays of the right dtype (bfloat16 ones as
    OrtValues: numpy has no bfloat16)."""
    graph_inputs = sess.get_inputs()
    inputs = ExampleInputs.of(inputs)
    tensors = inputs.tensors()
    if not inputs.args and all(i.name in inputs.kwargs for i in graph_inputs):
        tensors = [inputs.kwargs[i.name] for i in graph_inputs]  # kwargs: match by name when they all match
    if len(tensors) != len(graph_inputs):
        names = ", ".join(i.name for i in graph_inputs) or "none"
        raise UsageError(
            f"the ONNX model takes {len(graph_inputs)} inputs ({names}) but the example inputs hold "
            f"{len(tensors)} tensors; pass inputs matching the exported model (--inputs / --input-shape)"
        )
    return {spec.name: _feed_value(spec, tensor) for spec, tensor in zip(graph_inputs, tensors)}


@dataclasses.dataclass(frozen=True)
class ShapeMismatch:
    """Why feeds do not fit a model's declared input shapes; ``batch_only`` when only dim 0 differs."""

    text: str
    batch_only: bool


def shape_mismatch(sess: ort.InferenceSession, feeds: dict[str, np.ndarray | ort.OrtValue]) -> ShapeMismatch | None:
    """The first feed whose rank or static dims differ from the model's declared input, or None."""
    for spec in sess.get_inputs():
        feed = feeds[spec.name]
        declared, given = spec.shape, tuple(feed.shape() if isinstance(feed, ort.OrtValue) else feed.shape)
        if declared is None:
            continue
        differ = [i for i, (d, g) in enumerate(zip(declared, given)) if isinstance(d, int) and d != g]
        if len(declared) != len(given) or differ:
            shape = "(" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in declared) + ")"
            kind = "static shape" if all(isinstance(d, int) for d in declared) else "shape"
            return ShapeMismatch(f"input {spec.name!r} is {tuple(given)} but the ONNX model's {kind} is {shape}",
                                 batch_only=len(declared) == len(given) and differ == [0])
    return None


def _feed_value(spec: Any, tensor: torch.Tensor) -> np.ndarray | ort.OrtValue:
    if tensor.dtype == torch.bfloat16 and spec.type == "tensor(bfloat16)":
        return runtime.ort_value(tensor)  # numpy has no bfloat16
    array = tensor.detach().cpu().numpy()
    expected = _ORT_DTYPES.get(spec.type)
    if expected is not None and array.dtype != expected:
        example = ",".join(str(d) if isinstance(d, int) else "1" for d in spec.shape) or "1"
        raise UsageError(
            f"input {spec.name!r} is {array.dtype} but the ONNX model expects {spec.type}; "
            f"pass inputs of that dtype (e.g. --input-shape {example}:{np.dtype(expected).name})"
        )
    return array


def _run_torch(model: nn.Module, inputs: ExampleInputs, *, other_sizes: str | None = None) -> Any:
    """The model's outputs; a failure on the example is the user's inputs' problem, on ``other_sizes`` the model's."""
    try:
        with torch.no_grad(), eval_mode(model):
            return inputs.call(model)
    except Exception as exc:  # the user's model failed on the user's inputs
        first = " ".join(str(exc).split())[:160]
        if other_sizes is not None:
            raise ExportError(
                f"the torch model fails at {other_sizes} ({type(exc).__name__}: {first}), sizes the file's dynamic "
                "axes accept: the model fixes one of them; export with it static (leave it out of --dynamic-axis or --dynamic-batch)"
            ) from exc
        raise PreconditionError(
            f"the torch model failed on the example inputs ({type(exc).__name__}: {first}); "
            "check --input-shape/--inputs"
        ) from exc


def _noise_of(model: nn.Module, input_sets: Sequence[ExampleInputs],
              references: Sequence[Any]) -> Callable[[int], float | None]:
    """The torch model's float32 rounding noise on input set ``i`` (:func:`~normsurgeon.check.rounding_noise`),
    run in float64 when first asked for (a failed check) and kept for the other providers."""

    @functools.cache
    def noise(index: int) -> float | None:
        with eval_mode(model):
            return rounding_noise(model, input_sets[index], references[index])

    return noise


def _compare(
    sess: ort.InferenceSession,
    feeds: dict[str, np.ndarray | ort.OrtValue],
    reference: Any,
    label: str,
    atol: float | None,
    rtol: float | None,
    *,
    noise: Callable[[], float | None] | None = None,
) -> tuple[Check, str | None]:
    """One Check: every flattened torch output against the ORT output at the same position.

    A numerical failure is reconsidered with ``noise`` (the torch model's rounding noise; None when the
    caller chose the tolerances): the check at the raised atol and a note when the difference is rounding.
    """
    named = flatten_outputs(reference)
    atol, rtol = _tolerances([t for _, t in named], atol, rtol)
    mismatch = shape_mismatch(sess, feeds)
    if mismatch:
        return Check((_failed("input", f"{mismatch.text}: this file cannot run these inputs"),), atol=atol,
                     rtol=rtol, label=label), None
    try:
        outputs = [array for _, array in runtime.run(sess, feeds)]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/... types
        detail = f"onnxruntime failed: {' '.join(str(exc).split())[:200]}"
        return Check((_failed("output", detail),), atol=atol, rtol=rtol, label=label), None
    if len(outputs) != len(named):
        detail = f"the ONNX model has {len(outputs)} outputs, the torch model {len(named)} tensor outputs"
        return Check((_failed("outputs", detail),), atol=atol, rtol=rtol, label=label), None

    def judge(atol: float, label: str) -> Check:
        diffs = tuple(_diff_one(name, ref, array, atol, rtol) for (name, ref), array in zip(named, outputs))
        return Check(diffs, atol=atol, rtol=rtol, label=label)

    return _judged(judge, atol, label, noise)


def compare_named(
    reference: dict[str, torch.Tensor],
    produced: dict[str, torch.Tensor],
    label: str,
    atol: float | None,
    rtol: float | None,
    *,
    noise: Callable[[], float | None] | None = None,
) -> tuple[Check, str | None]:
    """The check of onnxruntime's outputs against torch's ``reference``, matched by name, judged as
    :func:`verify_onnx` judges: a failure within ``noise`` (the torch model's rounding noise on these inputs;
    None when the caller chose the tolerances) passes with the note returned beside it."""

    def judge(atol: float | None, label: str) -> Check:
        check = compare_outputs(reference, {n: produced[n] for n in reference if n in produced}, atol=atol,
                                rtol=rtol, label=label, prefix="")
        return dataclasses.replace(check, outputs=tuple(dataclasses.replace(o, name=o.name.lstrip("."))
                                                        for o in check.outputs))

    return _judged(judge, atol, label, noise)


def _judged(judge: Callable[[float | None, str], Check], atol: float | None, label: str,
            noise: Callable[[], float | None] | None) -> tuple[Check, str | None]:
    """``judge(atol, label)``, redone within the rounding noise when it fails numerically and ``noise`` is given."""
    check = judge(atol, label)
    if check.passed or noise is None or not math.isfinite(check.max_abs_diff):
        return check, None
    accepted = within_rounding_noise(check, noise(), judge)
    return accepted if accepted is not None else (check, None)


def _diff_one(name: str, ref: torch.Tensor, array: np.ndarray | torch.Tensor, atol: float, rtol: float) -> OutputDiff:
    candidate = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    (diff,) = compare_outputs(ref, candidate, atol=atol, rtol=rtol).outputs
    return dataclasses.replace(diff, name=name)


def _tolerances(tensors: list[torch.Tensor], atol: float | None, rtol: float | None) -> tuple[float, float]:
    """The loosest float output dtype's defaults, as :func:`compare_outputs` picks them."""
    dtypes = [t.dtype for t in tensors if t.is_floating_point()] or [torch.float32]
    loosest = max((default_tolerance(d) for d in dtypes), key=lambda tol: tol[1])
    return (loosest[0] if atol is None else atol, loosest[1] if rtol is None else rtol)


def _failed(name: str, detail: str) -> OutputDiff:
    nan = float("nan")
    return OutputDiff(name, nan, nan, nan, False, detail)
