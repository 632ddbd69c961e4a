"""normsurgeon's ``fold`` against torch.fx's ``fuse`` and timm's own ``reparameterize_model`` on timm CV nets.

For each model (random weights, BatchNorm statistics calibrated by train-mode batches and affines
randomized, as after training; a 1x3x64x64 example input, 224x224 for LeViT, whose attention biases
fix its resolution): the BatchNorm-like modules before (torch BatchNorms, timm's BatchNormAct2d,
frozen BatchNorms), the ones each tool leaves, each result's largest difference from the original on
a fresh batch of 2 (relative to the output's scale), and each tool's time (process CPU time, one
torch thread, median of ``--runs`` on the same model; every tool copies the model first;
normsurgeon's time includes its trace, its reparameterize pass and the checks of its result).

``torch.fx.experimental.optimization.fuse`` folds ``nn.Conv*d`` followed by exactly ``nn.BatchNorm*d``
in a symbolic trace; timm's ``reparameterize_model`` calls each block's own ``fuse()`` /
``reparameterize()`` (a model without such blocks keeps every BN)::

    python -m benchmarks.fold_timm [--runs 3] [--models efficientnet_b0 ...]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import normsurgeon.torchvision_compat  # noqa: F401  (timm imports torchvision)
from benchmarks.reparam_timm import batchnorms, median_seconds, print_table, relative_error
from normsurgeon.passes.fold_batchnorm import fold_batchnorm
from tests.helpers import give_realistic_stats

MODELS = ("efficientnet_b0", "mobilenetv3_large_100", "resnetv2_50", "regnety_002", "cspdarknet53", "densenet121",
          "repvgg_a0", "mobileone_s0", "fastvit_t8", "levit_128")
SIDE = {"levit_128": 224}  # the input side where 64 is refused
TOOLS = ("fx.fuse", "timm", "normsurgeon")
COLUMNS = ("model", "BNs before", *(f"left by {t}" for t in TOOLS), *(f"rel error {t}" for t in TOOLS),
           *(f"time {t} (s)" for t in TOOLS))


def _fx_fuse(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(model, inplace=False)


def _timm(model: nn.Module) -> nn.Module:
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model, inplace=False)


def _tool_columns(tool: str, run: Callable[[], nn.Module], model: nn.Module, fresh: torch.Tensor,
                  runs: int) -> dict[str, object]:
    """BNs left, error and time of one tool, or what it failed with."""
    try:
        seconds, result = median_seconds(run, runs)
    except Exception as exc:  # fx cannot trace some models: the table says so
        failed = f"fails ({type(exc).__name__})"
        return {f"left by {tool}": failed, f"rel error {tool}": "-", f"time {tool} (s)": "-"}
    return {f"left by {tool}": batchnorms(result), f"rel error {tool}": f"{relative_error(model, result, fresh):.1e}",
            f"time {tool} (s)": f"{seconds:.2f}"}


def measure(name: str, runs: int) -> dict[str, object]:
    """One table row for the timm model ``name``."""
    import timm

    torch.manual_seed(0)
    side = SIDE.get(name, 64)
    x = torch.randn(1, 3, side, side)
    model = give_realistic_stats(timm.create_model(name, pretrained=False), torch.randn(2, 3, side, side))
    fresh = torch.randn(2, 3, side, side)
    row: dict[str, object] = {"model": name if side == 64 else f"{name} ({side}px)", "BNs before": batchnorms(model)}
    row.update(_tool_columns("fx.fuse", lambda: _fx_fuse(model), model, fresh, runs))
    row.update(_tool_columns("timm", lambda: _timm(model), model, fresh, runs))
    row.update(_tool_columns("normsurgeon", lambda: fold_batchnorm(model, (x,), inplace=False).model, model, fresh,
                             runs))
    return row


def main() -> None:
    print_table(__doc__.splitlines()[0], MODELS, measure, COLUMNS, runs=3)


if __name__ == "__main__":
    main()
