"""Editing modules in place: swapping a submodule everywhere it is registered, writing a layer's
weight whether it is a plain parameter or weight-normalized (w = g * v / ||v||), finding the
weight norms on a layer, and running a model in eval mode without losing its modules' own modes."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from .walk import module_graph, registrations

ParentIndex = dict[int, list[tuple[nn.Module, str, str]]]


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for layers with the old weight-norm hook.

    That hook keeps the computed weight as a plain (non-leaf) tensor attribute, which deepcopy
    refuses ("Only Tensors created explicitly by the user ... support the deepcopy protocol");
    it is left out of the copy and recomputed there from the copied g and v, as the hook would.
    """
    computed = [(module, hook.name) for module in model.modules() for hook in module._forward_pre_hooks.values()
                if isinstance(hook, WeightNorm) and hook.name in module.__dict__]
    values = [module.__dict__.pop(name) for module, name in computed]
    try:
        copied = copy.deepcopy(model)
    finally:
        for (module, name), value in zip(computed, values):
            module.__dict__[name] = value
    for module in copied.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                setattr(module, hook.name, hook.compute_weight(module))
    return copied


def module_parents(model: nn.Module) -> ParentIndex:
    """id(child) -> every (parent, attribute name, path) registering it; build once per pass.

    Each (parent, name) registration is listed once, with the parent's first path: a parent that is
    itself registered under several names (a module DAG) is not listed once per path to it, so the
    index is linear in the number of registrations, not in the (possibly exponential) number of paths.
    """
    graph = module_graph(model)
    index: ParentIndex = {}
    for parent, name, child in graph.edges:
        parent_path = graph.first_path[id(parent)]
        path = f"{parent_path}.{name}" if parent_path else name
        index.setdefault(id(child), []).append((parent, name, path))
    return index


def turn_into(module: nn.Module, replacement: nn.Module | None = None) -> None:
    """Make ``module`` itself a fresh ``nn.Identity``, or an ``nn.Sequential`` holding only ``replacement``
    (no parameters, buffers or hooks of its own).

    For references to a removed module that :func:`replace_module` cannot reach (a Python list,
    a closure, a ``functools.partial`` the model keeps): the object they hold now computes x -> x,
    or what ``replacement`` computes.
    """
    training = module.training
    module.__dict__.clear()
    module.__class__ = nn.Identity if replacement is None else nn.Sequential
    nn.Module.__init__(module)
    if replacement is not None:
        module.add_module("0", replacement)
    module.training = training


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module, parents: ParentIndex | None = None) -> list[str]:
    """Register ``new`` wherever ``old`` is registered in ``model``; returns the paths replaced.

    Pass ``parents`` (from :func:`module_parents`) when replacing many modules: looking the
    parents up again for each would walk the whole model once per replacement.
    """
    entries = (module_parents(model) if parents is None else parents).get(id(old), [])
    for parent, name, _ in entries:
        parent._modules[name] = new
    return [path for _, _, path in entries]


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters a pass must not edit in place: one registered twice (tied weights), or
    one whose memory another parameter or buffer also uses (``nn.Parameter(conv.weight.view(...))``,
    a state_dict saved with views): editing it would silently change the other too."""
    # How often named_parameters(remove_duplicate=False) would list each one, counted without enumerating the paths.
    seen = registrations(module_graph(model))
    shared = {key for key, count in seen.items() if count > 1}
    spans = sorted(
        (str(t.device), t.data_ptr(), t.data_ptr() + byte_extent(t), id(t))
        for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
        if not isinstance(t, nn.parameter.UninitializedTensorMixin) and not t.is_meta and t.numel()
    )
    # One sweep over the byte ranges sorted by start: a range that starts before the furthest end so far
    # overlaps an earlier one. Every member of a run of such ranges overlaps another member.
    run: list[int] = []
    run_device, run_end = None, 0
    for device, start, end, key in spans:
        if device == run_device and start < run_end:
            run.append(key)
            run_end = max(run_end, end)
            continue
        if len(run) > 1:
            shared.update(run)
        run, run_device, run_end = [key], device, end
    if len(run) > 1:
        shared.update(run)
    return shared


def byte_extent(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last one (views may have gaps)."""
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def weight_norm_sites(module: nn.Module) -> list[tuple[str, str, int]]:
    """(tensor name, "parametrization" | "hook", dim) for every weight norm on this module itself."""
    sites = []
    if parametrize.is_parametrized(module):
        for name, plist in module.parametrizations.items():
            if any(type(p).__name__ == "_WeightNorm" for p in plist):
                sites.append((name, "parametrization", next(p.dim for p in plist if type(p).__name__ == "_WeightNorm")))
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            sites.append((hook.name, "hook", hook.dim))
    return sites


def _hook_weight_norm(module: nn.Module) -> WeightNorm | None:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return hook
    return None


@dataclass
class EditableWeight:
    """A layer's effective weight that can be changed in place, then written back.

    For a plain parameter, ``tensor`` *is* the parameter's data. For a weight-normalized layer it
    is the computed weight; :meth:`commit` re-parametrizes from it (v = w, g = ||w||), which keeps
    the weight norm and makes the layer compute exactly ``tensor``.
    """

    module: nn.Module
    tensor: torch.Tensor
    weight_norm_dim: int | None = None
    style: str = "plain"  # "plain" | "parametrization" | "hook"

    def commit(self) -> None:
        if self.style == "plain":
            return
        w = self.tensor
        g = torch.norm_except_dim(w, 2, self.weight_norm_dim)
        with torch.no_grad():
            if self.style == "parametrization":
                original = self.module.parametrizations.weight
                original.original0.copy_(g.to(original.original0.dtype))
                original.original1.copy_(w.to(original.original1.dtype))
            else:
                self.module.weight_g.copy_(g.to(self.module.weight_g.dtype))
                self.module.weight_v.copy_(w.to(self.module.weight_v.dtype))
                setattr(self.module, "weight", w.clone())


def foreign_hooks(module: nn.Module, *, pre: bool = True, post: bool = True) -> list[str]:
    """Names of the forward pre-hooks (``pre``) and forward hooks (``post``) on ``module``, weight norm's aside.

    An edit that changes what a module receives or returns changes what its hooks see (or drops
    them with the module); a pre-hook may also recompute the weight (old ``spectral_norm``) and
    undo the edit. Passes refuse such modules rather than guess what the hooks do.
    """
    hooks = [h for h in module._forward_pre_hooks.values() if not isinstance(h, WeightNorm)] if pre else []
    hooks += list(module._forward_hooks.values()) if post else []
    return [getattr(hook, "__name__", type(hook).__name__) for hook in hooks]


def hooks_lost_by_replacing(module: nn.Module) -> str | None:
    """Why ``module`` cannot be replaced by another module (its hooks would go with it), or None."""
    hooks = foreign_hooks(module)
    return f"its forward hooks ({', '.join(hooks)}) would be dropped with it" if hooks else None


def editable_weight(module: nn.Module) -> EditableWeight | str:
    """The module's weight, ready to edit, or the reason it (or its bias, which folds also write) cannot be."""
    if parametrize.is_parametrized(module, "bias"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations.bias)
        return f"bias is parametrized by {kinds}"
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations.weight
        if len(plist) != 1 or type(plist[0]).__name__ != "_WeightNorm":
            kinds = ", ".join(type(p).__name__ for p in plist)
            return f"weight is parametrized by {kinds}"
        with torch.no_grad():
            weight = module.weight.detach().clone()
        return EditableWeight(module, weight, plist[0].dim, "parametrization")
    hook = _hook_weight_norm(module)
    if hook is not None:
        with torch.no_grad():
            weight = hook.compute_weight(module).detach().clone()
        return EditableWeight(module, weight, hook.dim, "hook")
    if not isinstance(module.weight, torch.Tensor) or not module.weight.is_floating_point():
        return "weight is not a floating-point tensor"
    return EditableWeight(module, module.weight.data)


def ensure_bias(module: nn.Module, size: int, like: torch.Tensor) -> torch.Tensor:
    """The module's bias, created as zeros (same dtype/device as ``like``) when it has none.

    The new bias trains when the layer's own parameters do (``like`` is often ``weight.data``,
    which never requires grad), and is a normal tensor even under ``torch.inference_mode``, so
    the folded model can still be fine-tuned.
    """
    if getattr(module, "bias", None) is None:
        trainable = any(p.requires_grad for p in module.parameters())
        with torch.inference_mode(False):
            module.bias = nn.Parameter(torch.zeros(size, dtype=like.dtype, device=like.device), requires_grad=trainable)
    return module.bias


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag on exit, whatever the block did."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The whole model in eval mode for the block; every module's own mode restored after (mixed modes survive)."""
    with preserved_modes(model):
        model.eval()
        yield model
