"""Numerical equivalence of two models' outputs, with tolerances that follow the dtype.

Outputs may be nested (tuples, lists, dicts, ``transformers`` ModelOutput, dataclasses); they are
flattened into named tensors and compared one by one. Float outputs pass when
``max|new - ref| <= atol + rtol * max|ref|``; integer and bool outputs must be equal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .errors import PreconditionError, VerificationError
from .inputs import InputsLike
from .report import Check, OutputDiff
from .trace import METADATA_READS, call_model, function_name, map_leaves

# (atol, rtol) per dtype: a fold rounds each weight once, but deep nets accumulate that rounding.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}
NOISE_FACTOR = 4  # a change may differ from the original by this many times the model's own rounding noise


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
    prefix: str = "output",
) -> Check:
    """Compare two (nested) outputs; tolerances default to the loosest output dtype's; ``prefix`` names them."""
    ref_items = flatten_outputs(reference, prefix)
    new_items = dict(flatten_outputs(candidate, prefix))
    atol, rtol = resolve_tolerance(reference, atol, rtol)
    diffs = []
    for name, ref in ref_items:
        new = new_items.get(name)
        diffs.append(_diff(name, ref, new, atol, rtol))
    if not ref_items:
        diffs.append(OutputDiff(prefix, float("nan"), float("nan"), float("nan"), False, "no tensor outputs"))
    return Check(tuple(diffs), atol=atol, rtol=rtol, label=label)


def resolve_tolerance(reference: Any, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """``(atol, rtol)``, each None replaced by the default of the loosest float dtype in ``reference``."""
    dtypes = [t.dtype for _, t in flatten_outputs(reference) if t.is_floating_point()] or [torch.float32]
    loosest = max((default_tolerance(d) for d in dtypes), key=lambda tol: tol[1])
    return (loosest[0] if atol is None else atol), (loosest[1] if rtol is None else rtol)


def require_tensor_outputs(outputs: Any, *, also: Sequence[torch.Tensor] = ()) -> None:
    """Refuse, before any edit, a model whose outputs hold no value: no change to it could be checked.

    ``also``: other tensors the check compares (those feeding the model's first data-dependent op,
    :mod:`normsurgeon.discrete_ops`); empty outputs are then valid (a detector that found nothing).
    """
    tensors = [t for _, t in flatten_outputs(outputs)]
    if not tensors:
        raise PreconditionError(f"the model returned no tensors (it returned {type(outputs).__name__}), so no change "
                                "to it can be checked against the original; make forward() return its outputs")
    if all(t.numel() == 0 for t in [*tensors, *also]):
        raise PreconditionError("the model's outputs on the example inputs are empty (a batch of 0 samples?), so no "
                                "change to it can be checked; pass example inputs with at least one sample")


def mismatch_error(check: Check, changed: str) -> VerificationError:
    """The error a pass raises when ``changed`` (e.g. "the folded model") fails its check against the original."""
    return VerificationError(
        f"{changed} differs from the original by {check.max_abs_diff:.3g} "
        f"(tolerance {check.atol:g} + {check.rtol:g}*max|output|); please report this model "
        "— in Python the model was changed in place (reload it); no file was written"
    )


def within_rounding_noise(check: Check, noise: float | None,
                          recheck: Callable[[float, str], Check]) -> tuple[Check, str] | None:
    """A failed default-tolerance ``check`` redone (``recheck(atol, label)``) with atol raised to
    :data:`NOISE_FACTOR` times the model's own rounding ``noise``: that check and a note saying so
    when it passes; None when it fails too or the noise is unknown (see :func:`rounding_noise`)."""
    if noise is None:
        return None
    raised = recheck(max(check.atol, NOISE_FACTOR * noise),
                     f"{check.label} (atol raised to {NOISE_FACTOR}x the rounding noise)")
    if not raised.passed:
        return None
    return raised, (f"the default tolerance was exceeded ({check.max_abs_diff:.3g}), but this model's own float32 "
                    f"rounding noise is {noise:.3g} (its outputs vs the same model in float64): accepted as rounding")


def rounding_noise(model: torch.nn.Module, example_inputs: InputsLike, outputs: Any) -> float | None:
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
    return noise_between(outputs, in_float64(lambda: call_model(model, example_inputs)))


def in_float64(run: Callable[[], Any]) -> Any:
    """``run()`` under :class:`Float64Mode` and ``no_grad``; None when one of its ops cannot take float64 (or
    bypasses torch functions): the noise is then unknown."""
    try:
        with torch.no_grad(), Float64Mode():
            return run()
    except Exception:  # the model's own error type, whatever it is
        return None


def noise_between(outputs: Any, exact: Any) -> float | None:
    """The largest difference between the float outputs and the same outputs run in float64 (``exact``,
    flattened alike); None when ``exact`` is None or has none of them."""
    if exact is None:
        return None
    exact = dict(flatten_outputs(exact))
    diffs = [_max_abs_difference(t, exact[name]) for name, t in flatten_outputs(outputs)
             if t.is_floating_point() and name in exact and t.numel() and exact[name].shape == t.shape]
    return max(diffs, default=None)


class Float64Mode(TorchFunctionMode):
    """Run every torch function in float64: float inputs are converted per call, float results too.

    Parameters stay as they are; a conv or linear converts its own weight for its one call, a
    large one block of output channels at a time (:func:`_layer_in_blocks`); an embedding looks up
    its rows first and converts only those (a lookup is exact in any dtype). Casts back to a
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
        if name == "embedding" and not _renormalizes(func, args, kwargs):
            return map_leaves(_widen, func(*args, **kwargs))
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


_EMBEDDING_PARAMS = ("input", "weight", "padding_idx", "max_norm")


def _renormalizes(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether an embedding call rescales the rows it reads (``max_norm``): then the float64 run widens it whole.

    Without ``max_norm`` a lookup only selects rows, so looking them up in the table's own dtype and
    widening the result is exact, and never holds a float64 copy of the table (Llama-2-7B's
    32000 x 4096 table: 0.5 GB in float32, 1 GB more in float64). ``torch.embedding`` has no ``max_norm``.
    """
    if func is not torch.nn.functional.embedding:
        return False
    return dict(zip(_EMBEDDING_PARAMS, args), **kwargs).get("max_norm") is not None


def _is_inplace(name: str) -> bool:
    return name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))


def _widen(value: Any) -> Any:
    """A narrower float tensor as float64, a narrower float dtype as torch.float64; anything else as is."""
    if isinstance(value, torch.Tensor) and value.dtype in _NARROW_FLOATS:
        return value.double()
    if isinstance(value, torch.dtype) and value in _NARROW_FLOATS:
        return torch.float64
    return value


# Outputs are compared this many elements at a time, in float64: 2 MiB per operand, whatever the
# output's size. A whole-tensor float64 comparison with boolean-indexed finite masks held ~57 bytes
# per output element (3.6 GB for a 2048-token, 32000-word Llama's logits).
_CHUNK_ELEMENTS = 1 << 18


def _diff(name: str, ref: torch.Tensor, new: torch.Tensor | None, atol: float, rtol: float) -> OutputDiff:
    nan = float("nan")
    if new is None:
        return OutputDiff(name, nan, nan, nan, False, "missing from the new model's outputs")
    if tuple(new.shape) != tuple(ref.shape):
        return OutputDiff(name, nan, nan, nan, False, f"shape {tuple(new.shape)} != {tuple(ref.shape)}")
    if not ref.is_floating_point() and not ref.is_complex():
        equal = all(torch.equal(a, b.to(a.dtype)) for a, b in _chunks(ref, new))
        mismatches = 0.0 if equal else 1.0
        return OutputDiff(name, mismatches, mismatches, 1.0 if equal else 0.0, equal, "" if equal else "values differ")
    sums = _Sums()
    if not all(sums.add(a, b) for a, b in _float64_chunks(ref, new)):
        return OutputDiff(name, float("inf"), float("inf"), nan, False, "NaN/inf in different places")
    return sums.verdict(name, atol, rtol)


@dataclasses.dataclass
class _Sums:
    """Maxima and dot products over the finite elements of two outputs, accumulated one chunk at a time."""

    max_abs: float = 0.0  # max |ref - new|
    ref_max: float = 0.0  # max |ref|, the tolerance's scale
    new_max: float = 0.0
    dot: float = 0.0
    ref_squares: float = 0.0
    new_squares: float = 0.0
    any_finite: bool = False

    def add(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Add one pair of float64 chunks; False when their NaN/inf are in different places (or of another kind).

        The finite mask is built only for a chunk that holds a NaN or inf (its max |x| is not
        finite); non-finite elements then count as 0, which changes no maximum or dot product.
        """
        a_max, b_max = _max_abs(a), _max_abs(b)
        if math.isfinite(a_max) and math.isfinite(b_max):
            self.any_finite = True
        else:
            finite = torch.isfinite(a)
            if not _same_nonfinite(a, b, finite):
                return False
            a, b = a.where(finite, 0.0), b.where(finite, 0.0)
            a_max, b_max = _max_abs(a), _max_abs(b)
            self.any_finite = self.any_finite or bool(finite.any())
        self.max_abs = max(self.max_abs, _max_abs(a - b))
        self.ref_max, self.new_max = max(self.ref_max, a_max), max(self.new_max, b_max)
        self.dot += torch.dot(a, b).item()
        self.ref_squares += torch.dot(a, a).item()
        self.new_squares += torch.dot(b, b).item()
        return True

    def verdict(self, name: str, atol: float, rtol: float) -> OutputDiff:
        """The comparison's result; the cosine is ``torch.nn.functional.cosine_similarity``'s (norms at least 1e-30)."""
        if not self.any_finite:
            return OutputDiff(name, 0.0, 0.0, 1.0, True)
        max_abs, scale = self.max_abs, self.ref_max
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        eps = 1e-30
        cosine = self.dot / (max(math.sqrt(self.ref_squares), eps) * max(math.sqrt(self.new_squares), eps))
        if scale == 0 and self.new_max == 0:
            cosine = 1.0
        return OutputDiff(name, max_abs, max_rel, cosine, max_abs <= atol + rtol * scale)


def _chunks(ref: torch.Tensor, new: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Aligned CPU slices of the two (same-shaped) tensors, flattened, ``_CHUNK_ELEMENTS`` at a time.

    A non-contiguous tensor is made contiguous once, in its own dtype (``reshape``).
    """
    ref, new = ref.detach().reshape(-1), new.detach().reshape(-1)
    for start in range(0, ref.numel(), _CHUNK_ELEMENTS):
        yield ref[start:start + _CHUNK_ELEMENTS].cpu(), new[start:start + _CHUNK_ELEMENTS].cpu()


def _float64_chunks(ref: torch.Tensor, new: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_chunks` converted to float64, one pair at a time."""
    for a, b in _chunks(ref, new):
        yield a.double(), b.double()


def _max_abs(values: torch.Tensor) -> float:
    """max |values| (NaN if any is NaN), without an ``abs()`` copy."""
    return torch.linalg.vector_norm(values, float("inf")).item()


def _max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, NaN if any difference is NaN; chunked as :func:`_diff` is."""
    worst = 0.0
    for x, y in _float64_chunks(a, b):
        chunk = _max_abs(x - y)
        if math.isnan(chunk):
            return chunk
        worst = max(worst, chunk)
    return worst


def _same_nonfinite(a: torch.Tensor, b: torch.Tensor, finite: torch.Tensor) -> bool:
    """Whether ``b`` has NaN, +inf and -inf exactly where ``a`` (with finite mask ``finite``) has them."""
    return torch.equal(finite, torch.isfinite(b)) and torch.equal(_nonfinite_code(a[~finite]),
                                                                  _nonfinite_code(b[~finite]))


def _nonfinite_code(values: torch.Tensor) -> torch.Tensor:
    """NaN, +inf and -inf as 0, 1, -1, so two non-finite patterns compare with torch.equal."""
    return values.nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0)
