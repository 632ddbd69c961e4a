"""Learn where every tensor goes by running the model once on example inputs.

``torch.fx.symbolic_trace`` fails on models with Python control flow (most ``transformers``
models), and ``named_modules()`` order says nothing about dataflow. Instead we run the model
eagerly under a :class:`~torch.overrides.TorchFunctionMode` plus forward hooks:

* every call of an *atomic* module (a leaf, or a conv/linear/norm) becomes one :class:`Node`;
  what happens inside it is hidden;
* every torch function called outside an atomic module (``x + y``, ``x.transpose(1, 2)``,
  ``F.relu``) becomes one :class:`Node` too;
* tensors are matched by identity: the node that last returned a tensor object produces it,
  and every node that receives it consumes it. An in-place op therefore produces a new value.

Functions that only read metadata (``x.shape``, ``x.dim()``) are not consumers. Parameters and
buffers used by a function node are recorded, so a pass can tell when a module's weights are
also used outside that module (tied weights, functional reuse).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .errors import PreconditionError, first_line
from .inputs import ExampleInputs, InputsLike
from .walk import node_children, refuse_unwalkable

METADATA_READS = frozenset(
    {
        "shape", "dtype", "device", "size", "dim", "ndim", "ndimension", "is_contiguous", "stride",
        "numel", "nelement", "__len__", "is_floating_point", "is_complex", "layout", "requires_grad",
        "is_cuda", "is_meta", "is_sparse", "is_quantized", "names", "element_size", "storage_offset",
        "get_device", "data_ptr", "grad_fn", "is_leaf", "__repr__", "__format__", "__str__", "is_nested",
        "untyped_storage", "_version",
    }
)

_ATOMIC_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


@dataclass(eq=False)
class Node:
    """One call in the traced run: an atomic module call, a torch function, an input or the output."""

    index: int
    kind: str  # "module" | "function" | "input" | "output"
    name: str  # module path, function name, "input" or "output"
    module: nn.Module | None = None
    call: int = 0  # n-th call of this module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: list["Value"] = field(default_factory=list)
    outputs: list["Value"] = field(default_factory=list)
    used_parameters: list[torch.Tensor] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Node({self.index}, {self.kind}, {self.name!r}, call={self.call})"


@dataclass(eq=False)
class Value:
    """One tensor value: who produced it, who consumed it, and its shape."""

    producer: Node
    shape: tuple[int, ...]
    users: list[Node] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Value(from={self.producer.name!r}, shape={self.shape}, users={[u.name for u in self.users]})"


@dataclass
class Trace:
    """The dataflow of one run, plus the run's outputs (the reference for numerical checks)."""

    nodes: list[Node]
    calls: dict[nn.Module, list[Node]]
    module_paths: dict[nn.Module, str]
    outputs: Any
    external_parameter_uses: dict[int, list[Node]]  # id(parameter) -> function nodes using it

    def calls_of(self, module: nn.Module) -> list[Node]:
        return self.calls.get(module, [])

    def data_input(self, node: Node) -> "Value | None":
        """The value a module call's first positional tensor argument came from."""
        return node.inputs[0] if node.inputs else None

    def uses_outside(self, tensor: torch.Tensor) -> list[Node]:
        """Function nodes that used this parameter/buffer directly (not through its module)."""
        return self.external_parameter_uses.get(id(tensor), [])


def is_atomic(module: nn.Module) -> bool:
    """A module whose inside the trace does not look into: a leaf, or a conv/linear/norm layer (also one
    with running statistics whose children are leaves: a frozen BatchNorm with its activation inside)."""
    children = list(module.children())
    if isinstance(module, _ATOMIC_TYPES) or not children:
        return True
    stats = [getattr(module, name, None) for name in ("running_mean", "running_var")]
    return all(isinstance(t, torch.Tensor) for t in stats) and not any(next(c.children(), None) for c in children)


def function_name(func: Callable) -> str:
    """The name of a torch function or Tensor method/property as ``__torch_function__`` sees it."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a Tensor property such as .shape or .T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size, slice, type(...))
_LEAVES = (torch.Tensor, *_PLAIN)


def map_leaves(fn: Callable[[Any], Any], obj: Any, _memo: dict[int, Any] | None = None) -> Any:
    """``tree_map`` for the arguments of one op: plain tuples, lists and dicts walked directly.

    It runs for every op of a traced (or float64) run, where pytree's generic walk was a fifth of
    the time; other containers (named tuples, registered pytree nodes) are taken apart one level
    at a time by pytree's own flatten/unflatten. A container met twice (a DAG) is mapped once and
    shared, so the work is linear in the distinct containers, not in the paths to them; one that
    contains itself is a ValueError.
    """
    if isinstance(obj, _LEAVES):
        return fn(obj)
    kind = type(obj)
    memo = {} if _memo is None else _memo
    key = id(obj)
    if key in memo:
        if memo[key] is _IN_PROGRESS:
            raise ValueError(f"a {kind.__name__} that contains itself")
        return memo[key]
    if kind is tuple or kind is list:
        memo[key] = _IN_PROGRESS
        result = kind(map_leaves(fn, x, memo) for x in obj)
    elif kind is dict:
        memo[key] = _IN_PROGRESS
        result = {k: map_leaves(fn, v, memo) for k, v in obj.items()}
    else:
        node = None if pytree.tree_is_leaf(obj) else pytree.SUPPORTED_NODES.get(pytree._get_node_type(obj))
        if node is None:
            return fn(obj)
        memo[key] = _IN_PROGRESS
        children, context = node.flatten_fn(obj)
        result = node.unflatten_fn([map_leaves(fn, c, memo) for c in children], context)
    memo[key] = result
    return result


_IN_PROGRESS = object()


def _without_tensors(obj: Any) -> Any:
    """Arguments with tensors replaced by None: nodes keep the dims and flags, not activations."""
    return map_leaves(lambda x: None if isinstance(x, torch.Tensor) else x, obj)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) argument or output, in order (walked like :func:`map_leaves`).

    Iterative, and a container met again (a DAG, a cycle) is not walked again: linear in the
    distinct containers whatever their nesting or sharing.
    """
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [obj]
    pop, push, add = stack.pop, stack.extend, found.append
    while stack:
        item = pop()
        kind = type(item)
        if kind is tuple or kind is list:
            children: Any = item
        elif kind is dict:
            children = list(item.values())
        elif isinstance(item, torch.Tensor):
            add(item)
            continue
        elif isinstance(item, _PLAIN):
            continue
        else:
            children = node_children(item)
            if children is None:
                continue
        key = id(item)
        if key not in seen:
            seen.add(key)
            push(reversed(children))
    return found


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module, paths: dict[nn.Module, str], owned: set[int]) -> None:
        super().__init__()
        self.model = model
        self.paths = paths
        self.owned = owned
        self.nodes: list[Node] = []
        self.values: dict[int, tuple[weakref.ref, Value]] = {}  # id(tensor) -> (tensor, its Value)
        self.calls: dict[nn.Module, list[Node]] = {}
        self.atomic_depth = 0
        self.open_call: Node | None = None  # the atomic module call we are inside of
        self.external: dict[int, list[Node]] = {}
        self.stepped_aside = False  # off the torch function stack while inside an atomic module

    # -- bookkeeping -------------------------------------------------------------------------
    def new_node(self, kind: str, name: str, **kw: Any) -> Node:
        node = Node(len(self.nodes), kind, name, **kw)
        self.nodes.append(node)
        return node

    def consume(self, node: Node, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            value = self._value_of(t)
            if value is not None:
                value.users.append(node)
                node.inputs.append(value)
            elif id(t) in self.owned:
                node.used_parameters.append(t)

    def produce(self, node: Node, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            value = Value(node, tuple(t.shape))
            # A weak reference, not the tensor: keeping every activation alive would make tracing
            # cost the memory of a training step. It also tells a reused id from the tensor it was.
            self.values[id(t)] = (weakref.ref(t), value)
            node.outputs.append(value)

    def _value_of(self, tensor: torch.Tensor) -> Value | None:
        entry = self.values.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    # -- torch function mode -------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.atomic_depth:
            return result
        name = function_name(func)
        outputs = _tensors(result)
        if not outputs and name in METADATA_READS:
            return result
        node = self.new_node("function", name, args=_without_tensors(args), kwargs=_without_tensors(kwargs))
        self.consume(node, _tensors((args, kwargs)))
        for t in node.used_parameters:
            self.external.setdefault(id(t), []).append(node)
        self.produce(node, outputs)
        return result

    # -- module hooks --------------------------------------------------------------------------
    # Inside an atomic module nothing is recorded, so the mode steps off the torch function stack
    # for the call: its ops (conv, batch_norm, relu) run without a detour through
    # __torch_function__, and the hooks' own tensor reads (``t.shape``) are not intercepted.
    def step_aside(self) -> None:
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is self:  # only if on top: never reorder modes
            torch._C._pop_torch_function_stack()
            self.stepped_aside = True

    def step_back(self) -> None:
        if self.stepped_aside:
            torch._C._push_on_torch_function_stack(self)
            self.stepped_aside = False

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.atomic_depth == 0:
            self.step_aside()
            calls = self.calls.setdefault(module, [])
            node = self.new_node("module", self.paths.get(module, "?"), module=module, call=len(calls))
            calls.append(node)
            self.consume(node, _tensors((args, kwargs)))
            self.open_call = node
        self.atomic_depth += 1

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.atomic_depth -= 1
        if self.atomic_depth == 0:
            self.produce(self.open_call, _tensors(output))
            self.open_call = None
            self.step_back()


def trace(model: nn.Module, example_inputs: InputsLike) -> Trace:
    """Run ``model`` once on ``example_inputs`` (no grad) and record its dataflow.

    ``example_inputs``: :class:`~normsurgeon.inputs.ExampleInputs`, a tuple of positional arguments
    or a dict of keyword arguments.
    """
    inputs, paths, owned = _checked(model, example_inputs)
    recorder = _Recorder(model, paths, set(owned))
    handles = []
    for module in recorder.paths:
        if is_atomic(module):
            handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True, always_call=True))
    input_node = recorder.new_node("input", "input")
    recorder.produce(input_node, inputs.tensors())
    try:
        with torch.no_grad(), recorder:
            try:
                outputs = inputs.call(model)
            finally:  # an interrupt skips the post hook that would step back; the mode's exit pops it
                recorder.step_back()
    except Exception as exc:  # the user's model failed on the user's inputs
        raise PreconditionError(
            f"the model failed on the example inputs ({first_line(exc, named=True)}); "
            "check --input-shape/--inputs"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    output_node = recorder.new_node("output", "output")
    recorder.consume(output_node, _tensors(outputs))
    return Trace(recorder.nodes, recorder.calls, recorder.paths, outputs, recorder.external)


def refuse_unusable(model: nn.Module, example_inputs: InputsLike) -> ExampleInputs:
    """Refuse, with the fix, wrappers the trace could not hook, a model without values and unusable inputs;
    return the inputs as one value."""
    return _checked(model, example_inputs)[0]


def _checked(model: nn.Module, example_inputs: InputsLike) -> tuple[ExampleInputs, dict[nn.Module, str],
                                                                     dict[int, tuple[str, torch.Tensor]]]:
    """The inputs, each module's path and the model's tensors by id, once the model and inputs are usable.

    The model's own tensors are checked before the inputs: on a meta model the inputs are meta too,
    and loading real weights is the fix to name.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise PreconditionError("the model is a TorchScript module (torch.jit.script/trace), which cannot be hooked "
                                "or edited as Python code: pass the nn.Module it was made from, then script the result")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise PreconditionError("the model is wrapped by torch.compile: pass model._orig_mod (the module it compiled), "
                                "then compile the result")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise PreconditionError(f"the model is wrapped in {type(model).__name__}: pass model.module, then wrap the result")
    # Each module once, named by the last of its paths (as named_modules(remove_duplicate=False) would, without
    # enumerating the paths: a module DAG has exponentially many); a cycle or a path explosion is refused.
    graph = refuse_unwalkable(model)
    paths = {m: graph.last_path[id(m)] for m in graph.modules}
    owned = _parameters_and_buffers(paths)
    _refuse_meta(owned.values())
    return ExampleInputs.of(example_inputs), paths, owned


def _parameters_and_buffers(paths: dict[nn.Module, str]) -> dict[int, tuple[str, torch.Tensor]]:
    """id -> (path, tensor) of every parameter and buffer, from the module walk the trace does anyway."""
    found: dict[int, tuple[str, torch.Tensor]] = {}
    for module, path in paths.items():
        for name, t in itertools.chain(module._parameters.items(), module._buffers.items()):
            if t is not None:
                found.setdefault(id(t), (f"{path}.{name}" if path else name, t))
    return found


def _refuse_meta(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """A meta tensor has a shape but no values: no pass can check (or fold) anything with it.

    Without this, passes failed deep inside with torch internals ("Tensor.item() cannot be called
    on meta tensors", "Cannot copy out of meta tensor").
    """
    names = [name for name, t in named_tensors if t.is_meta]
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise PreconditionError(
            f"the model's tensors are on the meta device (shapes, no values): {', '.join(names[:3])}{more}; "
            "load real weights first (e.g. model.to_empty(device='cpu') then load_state_dict, "
            "or load_state_dict(..., assign=True))"
        )


def call_model(model: nn.Module, example_inputs: InputsLike) -> Any:
    """Call a model with example inputs (positional ones from a tuple, keyword ones from a dict)."""
    return ExampleInputs.of(example_inputs).call(model)
