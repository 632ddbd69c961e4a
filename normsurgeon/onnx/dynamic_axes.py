"""Dynamic axes of an ONNX export: which input dims stay symbolic, the example traced, the sizes verified.

An input is named the way ``torch.onnx`` names the graph input it becomes: its ``forward()``
parameter (or keyword), with the pytree keys of a nested value joined by ``_`` (``pair_0``).
Axes sharing a symbol share one ``torch.export.Dim``, so ``input_ids`` and ``attention_mask``
keep one sequence length.

Defaults per modality, by input name: token-shaped inputs (``input_ids``, ``attention_mask``,
``token_type_ids``, ``position_ids``, ``inputs_embeds``, each also with a ``decoder_`` prefix) get
``batch`` and one sequence symbol per family (``sequence``, ``decoder_sequence``); ``pixel_values``
gets ``batch``, ``height`` and ``width``; ``input_values`` (raw audio, last dim) and ``input_features``
(mel frames, last dim) get ``batch`` and ``time``; any other tensor gets ``batch``. A default axis the
model fixes (ViT's image size, Whisper's 3000 mel frames) is kept static with a note; an axis the
user asked for by name is an error instead.

torch.export treats a size-1 dim as a constant, so the export traces an example widened to 2
along such axes (rows repeated). The file is then verified at the example's own sizes and at
another size along every dynamic axis (:func:`other_size`), on fresh random inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch
from torch import nn
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path, tree_unflatten

from ..errors import ExportError, UsageError
from ..inputs import InputsLike, PlainInputs, forward_parameters
from ..surgery import eval_mode
from ..trace import call_model

BATCH = "batch"
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_FAMILIES = ("", "decoder_")
_SPATIAL = ("height", "width")


@dataclass(frozen=True)
class Axis:
    """Dim ``dim`` of the input named ``input`` (pytree leaf ``leaf`` of the inputs) is ``symbol``.

    ``required``: asked for by name (or ``--dynamic-batch``), so a model that fixes it is an error;
    a default axis the model fixes is kept static with a note.
    """

    input: str
    leaf: int
    dim: int
    symbol: str
    required: bool = True


@dataclass(frozen=True)
class Dynamic:
    """Which input dims an export leaves symbolic (see the module docstring for the defaults)."""

    defaults: bool = False
    named: Mapping[str, Mapping[int, str]] = field(default_factory=dict)  # replaces that input's defaults
    batch: bool = False  # dim 0 of every tensor input: --dynamic-batch

    def __bool__(self) -> bool:
        return self.defaults or bool(self.named) or self.batch


def parse_dynamic(specs: Iterable[str], *, defaults: bool = False) -> Dynamic:
    """``--dynamic-axis`` values, ``NAME:AXIS=SYMBOL[,AXIS=SYMBOL]`` each; ``defaults``: ``--dynamic`` was given.

    A named input gets exactly its listed axes, in place of its defaults.
    """
    named: dict[str, dict[int, str]] = {}
    for value in specs:
        name, _, axes_text = value.partition(":")
        name, items = name.strip(), [item.partition("=") for item in axes_text.split(",")]
        try:
            axes = {int(dim): symbol.strip() for dim, _, symbol in items}
        except ValueError:
            axes = {}
        if not name or len(axes) != len(items) or not all(s.isidentifier() for s in axes.values()) or name in named:
            raise UsageError(
                f"bad --dynamic-axis {value!r}: expected NAME:AXIS=SYMBOL[,AXIS=SYMBOL] once per input, e.g. "
                "--dynamic-axis pixel_values:0=batch,2=height,3=width (or --dynamic for the defaults)"
            )
        named[name] = axes
    return Dynamic(defaults=defaults, named=named)


def signature_order(model: nn.Module, inputs: PlainInputs) -> PlainInputs:
    """Keyword inputs in ``forward()``'s parameter order: the order torch.export gives the graph's inputs."""
    if not isinstance(inputs, dict):
        return inputs
    order = {name: i for i, name in enumerate(forward_parameters(model))}
    return dict(sorted(inputs.items(), key=lambda item: order.get(item[0], len(order))))


def input_names(model: nn.Module, inputs: PlainInputs) -> list[str]:
    """The name of every pytree leaf of ``inputs`` (tensors and baked-in values), in pytree order."""
    if isinstance(inputs, dict):
        tops = list(inputs.items())
    else:
        params = [p for p in forward_parameters(model).values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        tops = [(params[i].name if i < len(params) else f"input{i}", value) for i, value in enumerate(inputs)]
    names = []
    for top, value in tops:
        for path, _ in tree_flatten_with_path(value)[0]:
            names.append(top + "".join(f"_{_key(k)}" for k in path))
    return names


def resolve_axes(model: nn.Module, inputs: PlainInputs, dynamic: Dynamic) -> tuple[Axis, ...]:
    """The axes ``dynamic`` asks for on these inputs; a UsageError for a name, dim or symbol that does not fit."""
    if dynamic.batch and (dynamic.defaults or dynamic.named):
        raise UsageError("give --dynamic/--dynamic-axis or --dynamic-batch, not both "
                         "(the --dynamic defaults include the batch)")
    leaves = tree_flatten(inputs)[0]
    names = input_names(model, inputs)
    tensors = {name: (i, leaf) for i, (name, leaf) in enumerate(zip(names, leaves)) if isinstance(leaf, torch.Tensor)}
    axes: list[Axis] = []
    for name, (i, tensor) in tensors.items():
        if name in dynamic.named:
            axes += [Axis(name, i, d, s) for d, s in sorted(dynamic.named[name].items())]
        elif dynamic.batch and tensor.dim() > 0:
            axes.append(Axis(name, i, 0, BATCH))
        elif dynamic.defaults:
            axes += [Axis(name, i, d, s, required=False) for d, s in default_axes(name, tensor).items()]
    _check_named(dynamic.named, tensors)
    axes = _own_symbols_where_sizes_differ(axes, leaves)
    _check_sizes(axes, leaves)
    return tuple(axes)


def default_axes(name: str, tensor: torch.Tensor) -> dict[int, str]:
    """The per-modality axes of one input (dim -> symbol), from its name and rank."""
    if tensor.dim() == 0:
        return {}
    for family in _FAMILIES:
        if name in (family + token for token in _TOKEN_INPUTS) and tensor.dim() >= 2:
            return {0: BATCH, 1: f"{family}sequence"}
    if name == "pixel_values" and tensor.dim() == 4:
        return {0: BATCH, 2: "height", 3: "width"}
    if name == "input_values" and tensor.dim() in (2, 3):  # (batch, samples) or (batch, channels, samples): EnCodec
        return {0: BATCH, tensor.dim() - 1: "time"}
    if name == "input_features" and tensor.dim() == 3:
        return {0: BATCH, 2: "time"}
    return {0: BATCH}


def export_dynamic_shapes(inputs: PlainInputs, axes: Sequence[Axis]) -> PlainInputs:
    """``dynamic_shapes`` for torch.export: one ``Dim`` per symbol, on every axis that carries it."""
    dims = {axis.symbol: torch.export.Dim(axis.symbol) for axis in axes}
    leaves, spec = tree_flatten(inputs)
    shapes: list[dict | None] = [None] * len(leaves)
    for axis in axes:
        shapes[axis.leaf] = {**(shapes[axis.leaf] or {}), axis.dim: dims[axis.symbol]}
    return tree_unflatten(shapes, spec)


def axis_sizes(inputs: PlainInputs, axes: Sequence[Axis]) -> dict[str, int]:
    """Symbol -> its size in ``inputs`` (the first axis carrying it), in the axes' order."""
    leaves = tree_flatten(inputs)[0]
    sizes: dict[str, int] = {}
    for axis in axes:
        sizes.setdefault(axis.symbol, int(leaves[axis.leaf].shape[axis.dim]))
    return sizes


def widened(inputs: PlainInputs, axes: Sequence[Axis]) -> tuple[PlainInputs, list[str]]:
    """The example torch.export traces: every size-1 dynamic axis repeated to 2; and the symbols widened."""
    ones = [symbol for symbol, size in axis_sizes(inputs, axes).items() if size == 1]
    if not ones:
        return inputs, []
    return resized(inputs, axes, dict.fromkeys(ones, 2), fresh=False), ones


def other_size(symbol: str, size: int) -> int:
    """The second size an axis is verified at.

    batch: one more (1 -> 2). height/width: a step of the largest power of two (up to 32) dividing the
    size, so strided models still divide it: two steps down where that keeps at least half (224 -> 160),
    else one up (32 -> 64). Other lengths: about half, odd (16 -> 7, 8 -> 3), or 2 more when short (1 -> 3).
    """
    if symbol == BATCH:
        return size + 1
    if symbol in _SPATIAL:
        step = min(size & -size, 32)
        return size - 2 * step if size - 2 * step >= size / 2 else size + step
    return size // 2 - 1 if size >= 6 else size + 2


def verification_inputs(inputs: PlainInputs, axes: Sequence[Axis], *, seed: int = 1) -> list[PlainInputs]:
    """Fresh inputs with every dynamic axis at its :func:`other_size` (none without axes)."""
    if not axes:
        return []
    sizes = {symbol: other_size(symbol, size) for symbol, size in axis_sizes(inputs, axes).items()}
    return [resized(inputs, axes, sizes, generator=torch.Generator().manual_seed(seed))]


def resized(
    inputs: PlainInputs, axes: Sequence[Axis], sizes: Mapping[str, int], *, fresh: bool = True,
    generator: torch.Generator | None = None,
) -> PlainInputs:
    """``inputs`` with the axes of the given symbols at the given sizes; other tensors unchanged.

    ``fresh``: new random values (floats with the tensor's mean and spread; integers and bools drawn
    within the tensor's own range, so masks stay 0/1 and token ids below the vocabulary); else rows
    repeated or cut along each axis.
    """
    leaves, spec = tree_flatten(inputs)
    for index in {axis.leaf for axis in axes if axis.symbol in sizes}:
        tensor = leaves[index]
        shape = list(tensor.shape)
        for axis in axes:
            if axis.leaf == index and axis.symbol in sizes:
                shape[axis.dim] = sizes[axis.symbol]
        leaves[index] = _random_like(tensor, shape, generator) if fresh else _repeat_to(tensor, shape)
    return tree_unflatten(leaves, spec)


def runnable_axes(model: nn.Module, inputs: PlainInputs, axes: Sequence[Axis], notes: list[str]) -> tuple[Axis, ...]:
    """The axes along which the model runs (in torch) at their :func:`other_size`.

    One forward pass with every axis at its other size; only when that fails, one per symbol, to name
    the axes at fault: an ExportError for axes asked for, a note for default axes, which stay static.
    """
    if not axes or _run_error(model, verification_inputs(inputs, axes)[0]) is None:
        return tuple(axes)
    sizes = axis_sizes(inputs, axes)
    failing: dict[str, str] = {}
    for symbol, size in sizes.items():
        alone = resized(inputs, axes, {symbol: other_size(symbol, size)}, generator=torch.Generator().manual_seed(1))
        if (error := _run_error(model, alone)) is not None:
            failing[symbol] = error
    at_fault = [a for a in axes if a.symbol in failing]
    described = [(a, f"at {other_size(a.symbol, sizes[a.symbol])} ({failing[a.symbol]})") for a in at_fault]
    if required := [(a, text) for a, text in described if a.required]:
        raise ExportError(f"the model does not run along {_describe(required)}; export with it static (leave it out "
                          "of --dynamic-axis, or leave out --dynamic-batch)")
    if described:
        notes.append(f"kept static, the model does not run along {_describe(described)}")
    return tuple(a for a in axes if a.symbol not in failing)


def settle_axes(
    program: torch.onnx.ONNXProgram, inputs: PlainInputs, axes: Sequence[Axis], notes: list[str]
) -> tuple[Axis, ...]:
    """The axes the exported graph kept symbolic, its symbolic dims renamed after them.

    torch.onnx makes an axis static when the model fixes it: an ExportError names the axes that were
    asked for; default axes are noted as kept static. Axes the model ties together keep one symbol.
    """
    graph_inputs = _graph_inputs_by_leaf(program.model, inputs, axes)
    dims = {a: graph_inputs[a.leaf].shape[a.dim] for a in axes}
    fixed = [(a, f"at {dim}") for a, dim in dims.items() if isinstance(dim, int)]
    if required := [(a, size) for a, size in fixed if a.required]:
        raise ExportError(
            f"the model fixes {_describe(required)}: torch.export made it static; export with it static (leave "
            "it out of --dynamic-axis, or leave out --dynamic-batch), or change the code that fixes it (int(x.shape[i]), "
            "a reshape to a constant size, a check of the size)"
        )
    if fixed:
        notes.append(f"kept static, the model fixes {_describe(fixed)} (torch.export specialised it)")
    rename: dict[str, str] = {}
    for axis, dim in dims.items():
        if not isinstance(dim, int) and rename.setdefault(str(dim), axis.symbol) != axis.symbol:
            notes.append(f"the model ties {axis.input} dim {axis.dim} ({axis.symbol}) to {rename[str(dim)]}: "
                         "one symbol")
    program.rename_axes({old: new for old, new in rename.items() if old != new})
    return tuple(Axis(a.input, a.leaf, a.dim, rename[str(dim)], a.required)
                 for a, dim in dims.items() if not isinstance(dim, int))


def describe_axes(axes: Sequence[Axis]) -> dict[str, dict[str, str]]:
    """``{input: {dim: symbol}}`` for a report's facts."""
    described: dict[str, dict[str, str]] = {}
    for axis in axes:
        described.setdefault(axis.input, {})[str(axis.dim)] = axis.symbol
    return described


def _graph_inputs_by_leaf(model: ir.Model, inputs: PlainInputs, axes: Sequence[Axis]) -> dict[int, ir.Value]:
    """Graph inputs by the pytree leaf they come from: the tensors, in order (by name if the counts differ)."""
    tensors = [i for i, leaf in enumerate(tree_flatten(inputs)[0]) if isinstance(leaf, torch.Tensor)]
    if len(tensors) == len(model.graph.inputs):
        return dict(zip(tensors, model.graph.inputs))
    by_name = {value.name: value for value in model.graph.inputs}
    missing = [a.input for a in axes if a.input not in by_name]
    if missing:
        raise ExportError(f"the exported graph has no input {missing[0]!r} (it has {', '.join(by_name)}); "
                          "pass the inputs as keyword arguments named after the model's forward() parameters")
    return {a.leaf: by_name[a.input] for a in axes}


def _describe(axes: Sequence[tuple[Axis, str]]) -> str:
    """"input 'x' dim 2 (height) at 32 and dim 3 (width) at 32": axes with what to say of each, by input."""
    by_input: dict[str, list[str]] = {}
    for axis, what in axes:
        by_input.setdefault(axis.input, []).append(f"dim {axis.dim} ({axis.symbol}) {what}")
    return "; ".join(f"input {name!r} " + " and ".join(parts) for name, parts in by_input.items())


def _run_error(model: nn.Module, inputs: InputsLike) -> str | None:
    """Why the model fails on these inputs ("RuntimeError: ..."), or None when it runs."""
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, inputs)
    except Exception as exc:  # the model rejects this size: that is the answer, not an error here
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    return None


def _check_named(named: Mapping[str, Mapping[int, str]], tensors: Mapping[str, tuple[int, torch.Tensor]]) -> None:
    listed = ", ".join(tensors) or "none"
    for name, dims in named.items():
        if name not in tensors:
            raise UsageError(f"--dynamic-axis {name}: the model has no tensor input {name!r}; "
                             f"its tensor inputs are {listed}")
        rank = tensors[name][1].dim()
        if bad := [d for d in dims if not 0 <= d < rank]:
            raise UsageError(f"--dynamic-axis {name}:{bad[0]}=...: input {name!r} has {rank} dims (0 to {rank - 1})")


def _own_symbols_where_sizes_differ(axes: list[Axis], leaves: list[Any]) -> list[Axis]:
    """A default axis whose size differs from its symbol's first axis gets its own symbol ('mask_sequence')."""
    sizes: dict[str, int] = {}
    for axis in axes:
        sizes.setdefault(axis.symbol, int(leaves[axis.leaf].shape[axis.dim]))
    return [a if a.required or sizes[a.symbol] == leaves[a.leaf].shape[a.dim] else
            Axis(a.input, a.leaf, a.dim, f"{a.input}_{a.symbol}", required=False) for a in axes]


def _check_sizes(axes: Sequence[Axis], leaves: list[Any]) -> None:
    """Axes sharing a symbol must have one size in the example (torch.export gives them one Dim)."""
    seen: dict[str, tuple[Axis, int]] = {}
    for axis in axes:
        size = int(leaves[axis.leaf].shape[axis.dim])
        first, first_size = seen.setdefault(axis.symbol, (axis, size))
        if size != first_size:
            raise UsageError(
                f"dynamic axis {axis.symbol!r} is {first.input} dim {first.dim} ({first_size}) and {axis.input} dim "
                f"{axis.dim} ({size}): axes sharing a symbol must have one size; give them different symbols"
            )


def _key(key: Any) -> str:
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, MappingKey):
        return str(key.key)
    return str(getattr(key, "name", key))


def _random_like(tensor: torch.Tensor, shape: list[int], generator: torch.Generator | None) -> torch.Tensor:
    if tensor.is_floating_point():
        values = tensor.detach().float()
        spread = values.std().item() if values.numel() > 1 else 1.0
        sample = torch.randn(shape, generator=generator) * (spread if spread > 0 else 1.0) + values.mean().item()
        return sample.to(tensor.dtype).to(tensor.device)
    low, high = int(tensor.min()), int(tensor.max())
    sample = torch.randint(low, high + 1, shape, generator=generator)
    return sample.to(tensor.dtype).to(tensor.device)


def _repeat_to(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Repeat ``tensor`` along each dim up to ``shape``, then cut to it."""
    repeats = [-(-target // current) if current else 1 for target, current in zip(shape, tensor.shape)]
    return tensor.repeat(*repeats)[tuple(slice(0, n) for n in shape)]


__all__ = [
    "BATCH", "Axis", "Dynamic", "axis_sizes", "default_axes", "describe_axes", "export_dynamic_shapes", "input_names",
    "other_size", "parse_dynamic", "resized", "resolve_axes", "runnable_axes", "settle_axes", "signature_order",
    "verification_inputs", "widened",
]
