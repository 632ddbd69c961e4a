"""normsurgeon's reparameterize against timm's own ``reparameterize_model`` on timm's reparameterizable nets.

For repvgg_a0, mobileone_s0 and fastvit_t8 (random weights, BatchNorm statistics calibrated by
train-mode batches and affines randomized, as after training; 1x3x64x64 example input): the
BatchNorm-like modules before, the ones each tool leaves, each result's largest difference from the
original on fresh inputs (relative to the output's scale), and each tool's time (process CPU time,
one torch thread, median of 5 runs on the same model; both copy the model first: normsurgeon's time
includes its trace and the check of its result, timm's has no check)::

    python -m benchmarks.reparam_timm [--runs 5] [--models repvgg_a0 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import normsurgeon.torchvision_compat  # noqa: F401  (timm imports torchvision)
from normsurgeon.norms import is_batchnorm_like
from normsurgeon.passes.reparameterize import reparameterize
from tests.helpers import give_realistic_stats

MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8")
COLUMNS = ("model", "BNs before", "left by timm", "left by normsurgeon", "max rel error timm",
           "max rel error normsurgeon", "time timm (s)", "time normsurgeon (s)")


def batchnorms(model: nn.Module) -> int:
    """BatchNorm-like modules (torch BatchNorms, timm's BatchNormAct2d, frozen BatchNorms) in ``model``."""
    return sum(is_batchnorm_like(m) for m in model.modules())


def relative_error(original: nn.Module, changed: nn.Module, x: torch.Tensor) -> float:
    """max |changed(x) - original(x)| / max |original(x)|."""
    with torch.no_grad():
        want, got = original(x), changed(x)
    return ((got - want).abs().max() / want.abs().max()).item()


def median_seconds(fn: Callable[[], nn.Module], runs: int) -> tuple[float, nn.Module]:
    """The median process CPU time of ``runs`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(runs):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def measure(name: str, runs: int) -> dict[str, object]:
    """One table row for the timm model ``name``."""
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = give_realistic_stats(timm.create_model(name, pretrained=False), x)
    timm_seconds, by_timm = median_seconds(lambda: reparameterize_model(model, inplace=False), runs)
    ours_seconds, report = median_seconds(lambda: reparameterize(model, (x,), inplace=False), runs)
    fresh = torch.randn(2, 3, 64, 64)
    return {"model": name, "BNs before": batchnorms(model), "left by timm": batchnorms(by_timm),
            "left by normsurgeon": batchnorms(report.model),
            "max rel error timm": f"{relative_error(model, by_timm, fresh):.1e}",
            "max rel error normsurgeon": f"{relative_error(model, report.model, fresh):.1e}",
            "time timm (s)": f"{timm_seconds:.2f}", "time normsurgeon (s)": f"{ours_seconds:.2f}"}


def table(rows: list[dict[str, object]], columns: tuple[str, ...] = COLUMNS) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def print_table(description: str, models: tuple[str, ...], row: Callable[[str, int], dict[str, object]],
                columns: tuple[str, ...] = COLUMNS, runs: int = 5) -> None:
    """The command line of a timm benchmark: ``--runs``, ``--models``; one thread; the table on stdout."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=runs, help="timed runs per tool and model (the median is shown)")
    parser.add_argument("--models", nargs="+", default=list(models), help="timm model names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, timm {__import__('timm').__version__}, 1 thread, median of {args.runs} runs")
    print(table([row(name, args.runs) for name in args.models], columns))


def main() -> None:
    print_table(__doc__.splitlines()[0], MODELS, measure)


if __name__ == "__main__":
    main()
