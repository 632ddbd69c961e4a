"""Example inputs as one value: the positional and keyword arguments a model is called with, and their origin.

Every pass, check and export takes example inputs; users give them as a tuple of positional
arguments or a dict of keyword arguments (the CLI reads them from ``--input-shape``/``--inputs``
or infers them). :class:`ExampleInputs` holds both parts, is validated once (:meth:`ExampleInputs.of`),
and carries the operations the code needs, so no caller splits ``tuple | dict`` again.

This module sits at the bottom of the import graph (torch, :mod:`normsurgeon.errors` and
:mod:`normsurgeon.walk` only): the trace, the passes, the ONNX code and the CLI all import it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

import torch
from torch import nn

from .errors import PreconditionError, UsageError
from .walk import iter_leaves


@dataclass(frozen=True)
class ExampleInputs:
    """``model(*args, **kwargs)``'s arguments, and a description of where they came from (for the report)."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = "the given example inputs"

    def __post_init__(self) -> None:
        if not isinstance(self.args, tuple):
            raise UsageError(f"ExampleInputs.args must be a tuple of positional arguments, not "
                             f"{type(self.args).__name__}; use ExampleInputs.of(value)")
        bad = [key for key in self.kwargs if not isinstance(key, str)]
        if bad:
            raise UsageError(f"keyword example inputs must be named by str, not {bad[0]!r}; pass a dict of "
                             "argument name -> value")
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        if any(t.is_meta for t in self.tensors()):
            raise PreconditionError("the example inputs are on the meta device (shapes, no values): pass real tensors")

    @classmethod
    def of(cls, value: InputsLike, description: str | None = None) -> ExampleInputs:
        """``value`` as ExampleInputs: a tuple (or list) is positional, a dict keyword arguments; refused otherwise."""
        if isinstance(value, ExampleInputs):
            return value if description is None else replace(value, description=description)
        if isinstance(value, torch.Tensor):
            raise UsageError("example_inputs is a Tensor: pass a tuple of positional arguments, e.g. (x,), "
                             "or a dict of keyword arguments")
        described = {} if description is None else {"description": description}
        if isinstance(value, (tuple, list)):
            return cls(tuple(value), **described)
        if isinstance(value, Mapping):
            return cls(kwargs=value, **described)
        raise UsageError(f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
                         f"not {type(value).__name__}")

    def call(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor in the arguments, nested ones too, positional first (``tree_flatten`` order)."""
        return [leaf for leaf in iter_leaves((self.args, self.kwargs)) if isinstance(leaf, torch.Tensor)]

    def batch_size(self) -> int | None:
        """Dim 0 of the first tensor with at least one dimension (None when there is none)."""
        return next((t.shape[0] for t in self.tensors() if t.dim() > 0), None)

    def to(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ExampleInputs:
        """The arguments' tensors moved to ``device``, the floating ones cast to ``dtype`` (integers stay)."""

        def move(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            value = value.to(device) if device is not None else value
            return value.to(dtype) if dtype is not None and value.is_floating_point() else value

        return replace(self, args=tuple(map(move, self.args)), kwargs={k: move(v) for k, v in self.kwargs.items()})

    def like(self, model: nn.Module) -> ExampleInputs:
        """On the model's device, floats in its floating dtype (a fp16 model gets fp16 inputs); as is without one."""
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        if reference is None:
            return self
        return self.to(device=reference.device, dtype=reference.dtype)

    def plain(self) -> PlainInputs:
        """The tuple or the dict the user would pass, for code that takes one of them (both: refused)."""
        if self.args and self.kwargs:
            raise UsageError("these example inputs have both positional and keyword arguments; pass one kind "
                             "(a tuple, or a dict of keyword arguments)")
        return dict(self.kwargs) if self.kwargs else self.args


InputsLike = Union[ExampleInputs, tuple, list, dict]
"""What public functions accept as example inputs: coerced with :meth:`ExampleInputs.of`."""

PlainInputs = Union[tuple, dict]
"""One kind of arguments, as :meth:`ExampleInputs.plain` gives them: the pytree torch.export and data batches use."""


def forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    """The parameters of ``model.forward`` by name (empty where Python cannot read its signature)."""
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
