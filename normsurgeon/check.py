"""Numerical equivalence of two models' outputs, with tolerances that follow the dtype.

Outputs may be nested (tuples, lists, dicts, ``transformers`` ModelOutput, dataclasses); they are
flattened into named tensors and compared one by one. Float outputs pass when
``max|new - ref| <= atol + rtol * max|ref|``; integer and bool outputs must be equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .errors import PreconditionError, VerificationError
from .report import Check, OutputDiff
from .trace import METADATA_READS, call_model, function_name, map_leaves

# (atol, rtol) per dtype: a fold rounds each weight once, but deep nets accumulate that rounding.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """The (atol, rtol) normsurgeon uses for outputs of ``dtype``."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def flatten_outputs(obj: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Named tensors of a (nested) model output, in a stable order (depth first, in container order).

    Iterative, and a container met again (one returned twice, a DAG, a cycle) is listed under its
    first name only: linear in the distinct containers, whatever their sharing or depth.
    """
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(obj, prefix)]
    while stack:
        item, name = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append((name, item))
            continue
        if isinstance(item, dict):  # also transformers' ModelOutput, an OrderedDict subclass
            children = [(value, f"{name}.{key}") for key, value in item.items()]
        elif isinstance(item, (list, tuple)):
            children = [(value, f"{name}[{i}]") for i, value in enumerate(item)]
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            children = [(getattr(item, f.name), f"{name}.{f.name}") for f in dataclasses.fields(item)]
        else:
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        stack.extend(reversed(children))
    return found


def compare_outputs(
    reference: Any,
    candidate: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    label: str = "transformed vs original",
) -> Check:
    """Compare two (nested) outputs; tolerances default to the loosest output dtype's."""
    ref_items = flatten_outputs(reference)
    new_items = dict(flatten_outputs(candidate))
    dtypes = [t.dtype for _, t in ref_items if t.is_floating_point()] or [torch.float32]
    loosest = max((default_tolerance(d) for d in dtypes), key=lambda tol: tol[1])
    atol = loosest[0] if atol is None else atol
    rtol = loosest[1] if rtol is None else rtol
    diffs = []
    for name, ref in ref_items:
        new = new_items.get(name)
        diffs.append(_diff(name, ref, new, atol, rtol))
    if not ref_items:
        diffs.append(OutputDiff("output", float("nan"), float("nan"), float("nan"), False, "no tensor outputs"))
    return Check(tuple(diffs), atol=atol, rtol=rtol, label=label)


def require_tensor_outputs(outputs: Any) -> None:
    """Refuse, before any edit, a model whose outputs hold no value: no change to it could be checked."""
    tensors = [t for _, t in flatten_outputs(outputs)]
    if not tensors:
        raise PreconditionError(f"the model returned no tensors (it returned {type(outputs).__name__}), so no change "
                                "to it can be checked against the original; make forward() return its outputs")
    if all(t.numel() == 0 for t in tensors):
        raise PreconditionError("the model's outputs on the example inputs are empty (a batch of 0 samples?), so no "
                                "change to it can be checked; pass example inputs with at least one sample")


def mismatch_error(check: Check, changed: str) -> VerificationError:
    """The error a pass raises when ``changed`` (e.g. "the folded model") fails its check against the original."""
    return VerificationError(
        f"{changed} differs from the original by {check.max_abs_diff:.3g} "
        f"(tolerance {check.atol:g} + {check.rtol:g}*max|output|); please report this model "
        "— in Python the model was changed in place (reload it); no file was written"
    )


def rounding_noise(model: torch.nn.Module, example_inputs: tuple | dict, outputs: Any) -> float | None:
    """How far ``outputs`` of a float32/16 model are from the same model run in float64.

    Deep networks amplify one-ulp weight changes: a fold that is exact in float64 can move a
    float32 output by more than the default tolerance. This is that model's own rounding noise;
    a difference within a few times it is rounding, a wrong fold is orders of magnitude above.
    None for models that are already float64, have no floating-point outputs, or cannot run in
    float64.

    The model is not copied: each op converts its own inputs (one layer's weights at a time), so
    the extra memory is a float64 forward pass, not a float64 copy of every weight.
    """
    floats = [t for _, t in flatten_outputs(outputs) if t.is_floating_point()]
    if not floats or all(t.dtype == torch.float64 for t in floats):
        return None
    try:
        with torch.no_grad(), Float64Mode():
            exact = dict(flatten_outputs(call_model(model, example_inputs)))
    except Exception:  # an op that cannot take float64 (or bypasses torch functions): noise unknown
        return None
    diffs = [(t.double() - exact[name].double()).abs().max().item() for name, t in flatten_outputs(outputs)
             if t.is_floating_point() and name in exact and t.numel()]
    return max(diffs, default=None)


class Float64Mode(TorchFunctionMode):
    """Run every torch function in float64: float inputs are converted per call, float results too.

    Parameters stay as they are; a conv or linear converts its own weight for its one call, a
    large one block of output channels at a time (:func:`_layer_in_blocks`). Casts back to a
    narrower float (``x.float()``, ``x.to(self.weight.dtype)``, ``torch.ones(..., dtype=float32)``)
    are widened to float64, so no step rounds to float32. The ``self`` of an in-place op is left
    alone, so the op still writes to the tensor the model holds. Metadata reads (``x.shape``,
    ``x.dtype``) see the tensor unconverted.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = function_name(func)
        if name in METADATA_READS:
            return func(*args, **kwargs)
        if name in _NARROWING_CASTS and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return _widen(args[0])
        if name in _LAYER_OPS:
            result = _layer_in_blocks(func, name, args, kwargs)
            if result is not None:
                return result
        if _is_inplace(name) and args:
            args = (args[0], *map_leaves(_widen, args[1:]))
        else:
            args = map_leaves(_widen, args)
        return map_leaves(_widen, func(*args, **map_leaves(_widen, kwargs)))


_NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_NARROWING_CASTS = frozenset({"float", "half", "bfloat16"})


# The positional parameters of torch's conv and linear functions, in order.
_LAYER_OPS = {
    "conv1d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv3d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "linear": ("input", "weight", "bias"),
}
_WEIGHT_BLOCK_ELEMENTS = 1 << 18  # 2 MiB of float64 weight widened at a time


def _layer_in_blocks(func: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A conv or linear with a large weight, in float64, one block of output channels at a time.

    Widening the whole weight for the call would hold it twice (ResNet-152's largest conv: 4.5 MiB
    of float64, more than a forward pass of the model needs); each output channel depends only on
    its own rows of the weight, so the blocks are computed apart and written into one output.
    None (compute it the plain way) for small weights and grouped convs.
    """
    call = dict(zip(_LAYER_OPS[name], args), **kwargs)
    weight, bias = call.get("weight"), call.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _NARROW_FLOATS or weight.dim() < 2:
        return None
    if call.get("groups", 1) != 1 or weight.numel() <= _WEIGHT_BLOCK_ELEMENTS:
        return None
    call = {key: _widen(value) for key, value in call.items() if key not in ("weight", "bias")}
    channel_dim = -1 if name == "linear" else call["input"].dim() - weight.dim() + 1  # 0 for an unbatched input
    rows = max(1, _WEIGHT_BLOCK_ELEMENTS // weight[0].numel())
    out = None
    for start in range(0, weight.shape[0], rows):
        block = slice(start, start + rows)
        part = func(weight=weight[block].double(), bias=None if bias is None else _widen(bias[block]), **call)
        if out is None:
            shape = list(part.shape)
            shape[channel_dim] = weight.shape[0]
            out = part.new_empty(shape)
        out.narrow(channel_dim, start, part.shape[channel_dim]).copy_(part)
    return out


def _is_inplace(name: str) -> bool:
    return name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))


def _widen(value: Any) -> Any:
    """A narrower float tensor as float64, a narrower float dtype as torch.float64; anything else as is."""
    if isinstance(value, torch.Tensor) and value.dtype in _NARROW_FLOATS:
        return value.double()
    if isinstance(value, torch.dtype) and value in _NARROW_FLOATS:
        return torch.float64
    return value


def _diff(name: str, ref: torch.Tensor, new: torch.Tensor | None, atol: float, rtol: float) -> OutputDiff:
    nan = float("nan")
    if new is None:
        return OutputDiff(name, nan, nan, nan, False, "missing from the new model's outputs")
    if tuple(new.shape) != tuple(ref.shape):
        return OutputDiff(name, nan, nan, nan, False, f"shape {tuple(new.shape)} != {tuple(ref.shape)}")
    if not ref.is_floating_point() and not ref.is_complex():
        equal = bool(torch.equal(ref.cpu(), new.cpu().to(ref.dtype)))
        mismatches = 0.0 if equal else 1.0
        return OutputDiff(name, mismatches, mismatches, 1.0 if equal else 0.0, equal, "" if equal else "values differ")
    a = ref.detach().cpu().double()
    b = new.detach().cpu().double()
    finite_ref = torch.isfinite(a)
    if not torch.equal(finite_ref, torch.isfinite(b)) or not torch.equal(
        _nonfinite_code(a[~finite_ref]), _nonfinite_code(b[~finite_ref])
    ):
        return OutputDiff(name, float("inf"), float("inf"), nan, False, "NaN/inf in different places")
    a, b = a[finite_ref], b[finite_ref]
    if a.numel() == 0:
        return OutputDiff(name, 0.0, 0.0, 1.0, True)
    max_abs = (a - b).abs().max().item()
    scale = a.abs().max().item()
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-30).item()
    if scale == 0 and b.abs().max().item() == 0:
        cosine = 1.0
    passed = max_abs <= atol + rtol * scale
    return OutputDiff(name, max_abs, max_rel, cosine, passed)


def _nonfinite_code(values: torch.Tensor) -> torch.Tensor:
    """NaN, +inf and -inf as 0, 1, -1, so two non-finite patterns compare with torch.equal."""
    return values.nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0)
