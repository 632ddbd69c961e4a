"""A transformers model rebuilt around one of its blocks, with the real weights of that block only.

A decoder LM is embeddings, a stack of identical blocks, a final norm and a head. Norm surgery
edits each block on its own (and the ends once), so the streamed path learns what to do on a
*skeleton*: the same class and config with one block, whose weights are the real weights of the
block being edited. The whole model is only ever built on the meta device, to find the stack.

Parameters are allocated without initialisation (transformers' ``no_init_weights``): untouched
pages cost no memory, and every one is replaced by a tensor read from the checkpoint. Buffers
computed at build time (rotary frequencies) are real. Config lists with one entry per layer
(``layer_types``: Gemma's sliding/full attention; ``no_rope_layers``) are cut to the block's own
entry, so the skeleton block computes what that block computes in the full model.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError, PreconditionError
from ..io.huggingface import CONFIG, import_transformers, model_class_of, offline, quiet_transformers, read_config
from ..io.safetensors_shards import ShardedCheckpoint



@dataclass
class Blueprint:
    """What the streamed path knows of a save_pretrained folder before reading any weight."""

    folder: Path
    config: Any  # the transformers config of the whole model
    model_class: type
    checkpoint: ShardedCheckpoint
    stack: str  # the path of the block list, e.g. "model.layers"
    count: int  # how many blocks
    dtype: torch.dtype

    def block_prefix(self, index: int) -> str:
        return f"{self.stack}.{index}."

    @property
    def end_names(self) -> list[str]:
        """The checkpoint's tensors outside the blocks (embeddings, final norm, head)."""
        return [name for name in self.checkpoint.entries if not _in_stack(name, self.stack)]

    def block_names(self, index: int) -> list[str]:
        prefix = self.block_prefix(index)
        return [name for name in self.checkpoint.entries if name.startswith(prefix)]


def blueprint(folder: Path) -> Blueprint:
    """The folder's config, class, checkpoint layout and block stack; refused when it has no single stack."""
    transformers = import_transformers(folder)
    model_class = model_class_of(transformers, read_config(folder / CONFIG), folder)
    with offline(), quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    checkpoint = ShardedCheckpoint(folder)
    whole = build(model_class, config, device="meta")
    stack, count = _stack_of(whole, folder)
    floating = {entry.dtype for entry in checkpoint.entries.values() if entry.dtype.is_floating_point}
    plan = Blueprint(folder, config, model_class, checkpoint, stack, count,
                     floating.pop() if len(floating) == 1 else torch.float32)
    _check_names(plan, whole)
    return plan


def build(model_class: type, config: Any, *, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """``model_class`` from ``config`` in eval mode: its parameters on the meta device (no memory, not even
    address space: :func:`load` gives them their tensors), its buffers real (rotary frequencies are computed
    when the model is built); with ``device="meta"`` everything on meta."""
    from transformers.initialization import no_init_weights

    options = {"dtype": dtype} if dtype is not None else {}
    with offline(), quiet_transformers(), no_init_weights(), torch.device(device), _parameters_on_meta():
        try:
            model = model_class._from_config(config, **options)
        except Exception as exc:  # a config transformers cannot build from
            raise LoadError(f"transformers could not build {model_class.__name__} from the config ({type(exc).__name__}:"
                            f" {str(exc).splitlines()[0][:160] if str(exc) else ''}); check config.json") from exc
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered while building goes to the meta device as it is registered (accelerate's
    ``init_empty_weights(include_buffers=False)``): a layer allocates one weight at a time, then drops it."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def one_block_config(plan: Blueprint, index: int, *, vocab: int | None = None, config: Any = None) -> Any:
    """``config`` (default: the folder's) cut to block ``index`` alone; ``vocab``: a smaller vocabulary."""
    config = copy.deepcopy(plan.config if config is None else config)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == plan.count and "layer" in key:  # layer_types, no_rope_layers
            setattr(config, key, [value[index]])
    config.num_hidden_layers = 1
    if vocab is not None and vocab < config.vocab_size:
        config.vocab_size = vocab
        if getattr(config, "pad_token_id", None) is not None and config.pad_token_id >= vocab:
            config.pad_token_id = None
    return config


def skeleton(plan: Blueprint, config: Any) -> nn.Module:
    """The one-block model of ``config`` (from :func:`one_block_config`), in the checkpoint's dtype."""
    return build(plan.model_class, config, dtype=plan.dtype)


def load(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` into ``model`` as they are (no copy): every parameter and persistent buffer must be
    given, except those the model ties to a given one (a tied head)."""
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    state = model.state_dict()
    missing = [k for k in result.missing_keys if state[k].numel() and state[k].is_meta]
    if result.unexpected_keys or missing:
        what = (f"tensors the model does not have ({result.unexpected_keys[0]})" if result.unexpected_keys
                else f"no tensor for {missing[0]}")
        raise PreconditionError(f"the checkpoint does not fit {type(model).__name__}: {what}; re-save it with "
                                "save_pretrained from the same transformers class")


def in_block(names: dict[str, torch.Tensor], plan: Blueprint, index: int, to: int) -> dict[str, torch.Tensor]:
    """The block tensors of ``names`` renamed from block ``index`` to block ``to`` (others dropped)."""
    source, target = plan.block_prefix(index), plan.block_prefix(to)
    return {target + name[len(source):]: t for name, t in names.items() if name.startswith(source)}


def renamed(text: str, plan: Blueprint, index: int) -> str:
    """A path (or a message naming paths) of the skeleton's block 0 as those of block ``index``."""
    return re.sub(rf"(?<![\w.]){re.escape(plan.stack)}\.0(?![\w])", f"{plan.stack}.{index}", text)


def stack_module(model: nn.Module, plan: Blueprint) -> nn.ModuleList:
    return model.get_submodule(plan.stack)


def _in_stack(name: str, stack: str) -> bool:
    return name.startswith(stack + ".") and name[len(stack) + 1:].split(".", 1)[0].isdigit()


def _stack_of(model: nn.Module, folder: Path) -> tuple[str, int]:
    """The ModuleList of identical blocks, one per layer; refused when there is none or more than one."""
    layers = getattr(model.config, "num_hidden_layers", None)
    stacks = [(path, len(module)) for path, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) == layers and len(module) > 0
              and len({type(block) for block in module}) == 1]
    if len(stacks) != 1:
        found = ", ".join(path for path, _ in stacks) or "none"
        raise PreconditionError(
            f"{folder}: streaming edits one stack of {layers} identical blocks (a decoder LM), and "
            f"{type(model).__name__} has {len(stacks)} ({found}); load it in memory instead (drop --stream)")
    return stacks[0]


def _check_names(plan: Blueprint, whole: nn.Module) -> None:
    """The checkpoint holds the model's tensors under the model's own names (ties aside)."""
    expected = set(whole.state_dict())
    unknown = sorted(set(plan.checkpoint.entries) - expected)
    if unknown:
        raise PreconditionError(
            f"{plan.folder}: the checkpoint holds {len(unknown)} tensors {type(whole).__name__} does not have "
            f"(e.g. {unknown[0]}); streaming reads tensors by the model's own names: re-save it with save_pretrained "
            "from this transformers version, or drop --stream")
