"""The check for models whose outputs pass through data-dependent ops (detectors: score thresholds, topk, NMS).

Such an op decides discretely on values: a box whose score is within rounding of the threshold, or
two boxes whose overlap is within rounding of the NMS threshold, can be kept by the original and
dropped by a correct fold (a fold rounds each weight once). Comparing the final outputs then fails
a correct change, or passes it only under a wide tolerance. So the reference run records what each
such op decided, in call order, and the tensors that fed the first one (:class:`Decisions`); the
changed model is run once more with those decisions replayed (its k-th such op returns what the
original's k-th returned; topk/sort values are re-read from its own input at the original's
indices). Everything continuous is then comparable: the first op's inputs and the final outputs
are judged under the usual tolerances, and the final outputs as computed freely are shown,
informational. A model without such ops pays one name lookup per torch function in the reference
run and nothing in the check.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .check import compare_outputs, resolve_tolerance, rounding_noise, within_rounding_noise
from .inputs import ExampleInputs
from .report import Check
from .trace import function_name

# Ops whose result depends discretely on float inputs (when they read one); their result is replayed. Left
# out: casts to an integer dtype (models cast positions that way, e.g. T5's relative-position buckets; a
# detector's cast of its values follows a floor/round or a comparison, which are in) and NaN/inf tests
# (rounding does not make a finite value infinite; guards such as isinf(x).any() are common).
_COMPARISONS = frozenset({"gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal",
                          "not_equal", "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__", "isclose",
                          "signbit", "any", "all"})
_INDEX_OPS = frozenset({"argmax", "argmin", "argsort", "nonzero", "argwhere", "searchsorted", "bucketize",
                        "unique", "unique_consecutive", "nms", "floor", "ceil", "round", "trunc"})
# Ops returning (values, indices): name -> (position of dim, its default). Values are re-read at the indices.
_WITH_INDICES = {"topk": (2, -1), "sort": (1, -1), "kthvalue": (2, -1), "mode": (1, -1), "cummax": (1, None),
                 "cummin": (1, None), "median": (1, None), "max": (1, None), "min": (1, None)}
_CANDIDATES = _COMPARISONS | _INDEX_OPS | frozenset(_WITH_INDICES)
_RESULT_BUDGET = 1 << 28  # bytes of recorded results; decisions past it are not replayed
_INTERNAL = (os.path.join(os.path.dirname(torch.__file__), ""), os.path.join(os.path.dirname(__file__), ""))


@dataclasses.dataclass
class _Decision:
    """One data-dependent op call of the original: its name, the shapes it read and what it returned."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    result: Any


@dataclasses.dataclass
class Decisions:
    """What the original model's data-dependent ops decided on the example inputs (falsy: it has none)."""

    calls: list[_Decision] = dataclasses.field(default_factory=list)
    first_op: str = ""  # the first one: "gt", "torchvision::nms"
    first_at: str = ""  # where the model called it: "torchvision/.../retinanet.py:534 (postprocess_detections)"
    first_inputs: tuple[torch.Tensor, ...] = ()  # the float tensors it read
    truncated: bool = False  # the results outgrew the budget; later decisions are not replayed
    frozen: bool = False  # the reference was taken: recording again would record a changed model
    _bytes: int = dataclasses.field(default=0, repr=False)  # of the recorded results

    def __bool__(self) -> bool:
        return bool(self.calls)

    @contextmanager
    def record(self, model: nn.Module) -> Iterator[None]:
        """Record the decisions of ``model``'s forward passes run inside (the last one counts)."""
        if self.frozen:
            yield
            return
        with _Mode(model, self._start, self._decide):
            yield

    def freeze(self) -> None:
        """The original's outputs were taken: keep what was recorded."""
        self.frozen = True

    def _start(self) -> None:
        self.calls, self.first_op, self.first_at, self.first_inputs, self.truncated = [], "", "", (), False
        self._bytes = 0

    def _decide(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        result = func(*args, **kwargs)
        if not self.calls:
            self.first_op, self.first_at = _display(func), _caller()
            self.first_inputs = tuple(_copied(t) for t in _floats(args, kwargs))
        size = sum(t.numel() * t.element_size() for t in _tensors(result))
        if self.truncated or self._bytes + size > _RESULT_BUDGET:
            self.truncated = True
        else:
            self._bytes += size
            self.calls.append(_Decision(name, _shapes(args, kwargs), _copied(result)))
        return result

    @contextmanager
    def replay(self, model: nn.Module) -> Iterator[_Replay]:
        """Make ``model``'s forward passes run inside take the recorded decisions, in call order."""
        replay = _Replay(self)
        with _Mode(model, replay.start, replay.decide):
            yield replay


class _Replay:
    """One replay: a cursor over the recorded decisions, the first op's inputs, where the run diverged."""

    def __init__(self, decisions: Decisions) -> None:
        self.decisions = decisions
        self.start()

    def start(self) -> None:
        self.cursor = 0
        self.first_inputs: tuple[torch.Tensor, ...] = ()
        self.diverged = ""

    def decide(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        if self.cursor == 0:
            self.first_inputs = tuple(_copied(t) for t in _floats(args, kwargs))
        index, self.cursor = self.cursor, self.cursor + 1
        calls = self.decisions.calls
        if self.diverged or index >= len(calls):
            if not self.diverged and not self.decisions.truncated:
                self.diverged = f"it made more data-dependent decisions than the original ({name} is #{index + 1})"
            return func(*args, **kwargs)
        recorded = calls[index]
        if (recorded.name, recorded.shapes) != (name, _shapes(args, kwargs)):
            self.diverged = (f"data-dependent op #{index + 1} is {name} reading {_shapes(args, kwargs)}, where the "
                             f"original's was {recorded.name} reading {recorded.shapes}")
            return func(*args, **kwargs)
        if name in _WITH_INDICES:
            return _values_at(recorded.result, name, args, kwargs)
        return _copied(recorded.result)


class _Mode(TorchFunctionMode):
    """Hands each data-dependent op call to ``decide``; ``start`` runs at each forward pass of ``model``."""

    def __init__(self, model: nn.Module, start: Callable[[], None], decide: Callable[..., Any]) -> None:
        super().__init__()
        self.model, self.start, self.decide = model, start, decide

    def __enter__(self) -> _Mode:
        self.handle = self.model.register_forward_pre_hook(lambda module, args: self.start(), prepend=True)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = function_name(func)
        if name in _CANDIDATES and _is_decision(name, args, kwargs):
            return self.decide(func, name, args, kwargs)
        return func(*args, **kwargs)


def _is_decision(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether this call of a candidate op decides on float values (max(x) does not, max(x, dim) does)."""
    if next(_floats(args, kwargs), None) is None:
        return False
    if name in ("max", "min", "median"):  # a reduction over one dim returns indices; max(a, b) does not
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        return isinstance(dim, int)
    return True


def judge(decisions: Decisions, model: nn.Module, inputs: ExampleInputs, reference: Any, free: Any,
          run: Callable[[], Any], *, label: str, atol: float | None, rtol: float | None,
          rounding_noise_ok: bool) -> tuple[list[Check], list[str]]:
    """The checks of a changed model whose outputs pass through data-dependent ops, and notes.

    ``free``: its outputs as computed; ``run`` runs it again (under the replay). Judged: the first
    op's inputs and the final outputs with the original's decisions replayed. Informational: ``free``.
    """
    with decisions.replay(model) as replay:
        forced = run()
    observed_reference, observed = (decisions.first_inputs, reference), (replay.first_inputs, forced)
    tolerance = resolve_tolerance(observed_reference, atol, rtol)
    judged_label = (f"{label}, before the first data-dependent op ({decisions.first_op} at {decisions.first_at}) and with the "
                    f"original's {len(decisions.calls)} data-dependent decisions replayed")
    judged = _compare_observed(observed_reference, observed, *tolerance, judged_label, decisions)
    notes = [f"the outputs pass through data-dependent ops ({_names(decisions)}), which a change within rounding "
             "can make decide otherwise: judged on the tensors before the first one and on the outputs with the "
             "original's decisions replayed; the outputs as computed are shown for information"]
    if replay.diverged:
        notes.append(f"the replay could not follow the changed model: {replay.diverged}")
    if not judged.passed and atol is None and rtol is None and rounding_noise_ok:
        noise = rounding_noise(_Observer(model, decisions), inputs, observed)
        accepted = within_rounding_noise(judged, noise, lambda raised, text: _compare_observed(
            observed_reference, observed, raised, judged.rtol, text, decisions))
        if accepted is not None:
            judged = accepted[0]
            notes.append(accepted[1])
    return [judged, _informational(reference, free, label)], notes


def _compare_observed(reference: tuple, candidate: tuple, atol: float, rtol: float, label: str,
                      decisions: Decisions) -> Check:
    """The first op's inputs (named after it) and the final outputs, compared as one check."""
    before = compare_outputs(reference[0], candidate[0], atol=atol, rtol=rtol, prefix=f"{decisions.first_op} input")
    after = compare_outputs(reference[1], candidate[1], atol=atol, rtol=rtol)
    return Check(before.outputs + after.outputs, atol=atol, rtol=rtol, label=label)


def _informational(reference: Any, free: Any, label: str) -> Check:
    """The final outputs as computed, measured but not judged (a count of boxes may differ)."""
    check = compare_outputs(reference, free, atol=float("inf"), rtol=0.0,
                            label=f"{label}, final outputs as computed (data-dependent ops may decide otherwise "
                                  "within rounding)")
    outputs = tuple(dataclasses.replace(o, passed=True, max_abs_diff=float("inf") if o.detail else o.max_abs_diff)
                    for o in check.outputs)
    return dataclasses.replace(check, outputs=outputs, informational=True)


class _Observer(nn.Module):
    """The model as :func:`rounding_noise` runs it: decisions replayed, returning what the judged check compares."""

    def __init__(self, model: nn.Module, decisions: Decisions) -> None:
        super().__init__()
        self.model, self.decisions = model, decisions

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        with self.decisions.replay(self.model) as replay:
            outputs = self.model(*args, **kwargs)
        return replay.first_inputs, outputs


def _values_at(recorded: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """(values, indices) at the original's indices, the values read from this run's input."""
    position, default = _WITH_INDICES[name]
    dim = args[position] if len(args) > position else kwargs.get("dim", default)
    values, indices = recorded
    source = args[0] if args else kwargs["input"]
    if indices.dim() < source.dim():  # a reduction over dim without keepdim
        gathered = source.gather(dim, indices.unsqueeze(dim)).squeeze(dim)
    else:
        gathered = source.gather(dim, indices)
    return type(recorded)((gathered, indices.clone()))


def _floats(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The floating-point tensors among the arguments (and in lists of them, one level down)."""
    for arg in (*args, *kwargs.values()):
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                yield item


def _tensors(result: Any) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]


def _shapes(args: tuple, kwargs: dict) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in _floats(args, kwargs))


def _copied(result: Any) -> Any:
    """A copy of an op's result (tensors, or a tuple of them) that a model writing into its own cannot change."""
    if isinstance(result, tuple):
        return type(result)(tuple(_copied(r) for r in result))
    return result.detach().clone() if isinstance(result, torch.Tensor) else result


def _display(func: Any) -> str:
    """``torchvision::nms`` for a registered op, else the torch function's name."""
    return getattr(func, "_qualified_op_name", None) or function_name(func)


def _names(decisions: Decisions) -> str:
    """The ops that decided, in first-call order, with their call counts."""
    counts: dict[str, int] = {}
    for call in decisions.calls:
        counts[call.name] = counts.get(call.name, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in counts.items())


def _caller() -> str:
    """Where the model's code called the op: the first frame outside torch and normsurgeon."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    roots = [p for p in sys.path if p and path.startswith(os.path.join(p, ""))]
    shown = os.path.relpath(path, max(roots, key=len)) if roots else path
    return f"{shown}:{frame.f_lineno} ({frame.f_code.co_name})"
