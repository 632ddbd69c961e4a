"""Run one block of a skeleton on activations carried from the block before, and what it writes back.

The skeleton's own forward does everything around the block (embeddings, rotary tables, the
attention mask) from the example inputs; a hook swaps the block's input for the carried hidden
states, records the block's output and stops the forward there. At the end, :class:`GivenOutput`
stands in for the block so that the final norm and the head run on the last carried states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..inputs import ExampleInputs


class _Stop(Exception):
    """Raised by the hook once the block has run: the rest of the skeleton is not needed."""


def block_io(model: nn.Module, block: nn.Module, inputs: ExampleInputs,
             hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``block``'s input and output when ``model`` runs ``inputs`` (its input replaced by ``hidden`` when
    given), and the length of the tuple it returns (None: a tensor)."""
    seen: dict[str, Any] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        seen["input"] = args[0] if args else kwargs["hidden_states"]
        if hidden is None:
            return None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen["output"], seen["length"] = (output[0], len(output)) if isinstance(output, tuple) else (output, None)
        raise _Stop

    handles = [block.register_forward_pre_hook(before, with_kwargs=True),
               block.register_forward_hook(after, with_kwargs=True)]
    try:
        with torch.no_grad():
            inputs.call(model)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "output" not in seen:
        raise RuntimeError(f"the model never called its block {type(block).__name__} on the example inputs")
    return seen["input"], seen["output"], seen["length"]


class GivenOutput(nn.Module):
    """Stands in for a block: returns the given hidden states, in the form the block returns them."""

    def __init__(self, hidden: torch.Tensor, length: int | None) -> None:
        super().__init__()
        self.hidden, self.length = hidden, length

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.length is None:
            return self.hidden
        return (self.hidden, *([None] * (self.length - 1)))


def main_output(outputs: Any) -> torch.Tensor:
    """The model's main output: ``logits`` (a causal LM), else the first one (a base model's hidden states)."""
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return outputs[0] if isinstance(outputs, (tuple, list)) or hasattr(outputs, "to_tuple") else outputs


def within_vocabulary(inputs: ExampleInputs, vocabulary: int) -> ExampleInputs:
    """``inputs`` with every integer tensor taken modulo ``vocabulary`` (token ids for a smaller embedding)."""
    def fit(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
            return value % vocabulary
        return value

    return ExampleInputs(tuple(fit(v) for v in inputs.args), {k: fit(v) for k, v in inputs.kwargs.items()},
                         inputs.description)


def centred(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` minus its mean over the hidden (last) axis, in float32 at least."""
    wide = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
    return (wide - wide.mean(-1, keepdim=True)).to(hidden.dtype)
