"""Interleaved, median-of-rounds timing on a shared, noisy machine; the run's environment.

Absolute times on a 2-core shared box drift by tens of percent within a minute, so every
benchmark here reports *ratios* to a baseline measured in the same process, in the same
rounds: each round times one block of calls of every candidate, in a shuffled order, and the
ratio of a candidate is the median over rounds of (its time / the baseline's time in that
round). Slow drift cancels within a round; a burst of noise spoils one round, not the median.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """One candidate's timing: median seconds per call and its ratio to the baseline."""

    seconds: float  # median per-call time over rounds
    ratio: float  # median over rounds of (time / baseline time in the same round)
    ratio_q1: float  # 25th percentile of the per-round ratios
    ratio_q3: float  # 75th percentile
    rounds: int
    calls_per_block: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _block(fn: Callable[[], Any], calls: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    baseline: str,
    rounds: int,
    min_block_s: float = 0.005,
    warmup: int = 3,
    seed: int = 0,
    clock: str = "cpu",
) -> dict[str, Timing]:
    """Time every candidate in ``rounds`` interleaved rounds; ratios are to ``baseline``.

    Each candidate is called ``warmup`` times first. A block is as many calls as make the
    baseline take about ``min_block_s`` (the same count for every candidate, so a block of a
    slower candidate simply takes longer). The garbage collector is off while timing.

    ``clock="cpu"`` (default) measures the process's CPU time, which on an oversubscribed
    machine leaves out the time spent waiting for a core; it is the right clock when torch and
    onnxruntime each compute on one thread. ``"wall"`` measures elapsed time.
    """
    tick = CLOCKS[clock]
    if baseline not in candidates:
        raise KeyError(f"baseline {baseline!r} is not one of {list(candidates)}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    single = min(_block(candidates[baseline], 1, tick) for _ in range(3))
    calls = max(1, math.ceil(min_block_s / max(single, 1e-9)))
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    order_rng = random.Random(seed)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            order_rng.shuffle(names)
            for name in names:
                samples[name].append(_block(candidates[name], calls, tick))
    finally:
        if was_enabled:
            gc.enable()
    base = samples[baseline]
    result = {}
    for name in candidates:
        ratios = [t / b for t, b in zip(samples[name], base)]
        result[name] = Timing(
            seconds=statistics.median(samples[name]),
            ratio=statistics.median(ratios),
            ratio_q1=_quantile(ratios, 0.25),
            ratio_q3=_quantile(ratios, 0.75),
            rounds=rounds,
            calls_per_block=calls,
        )
    return result


def pin_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads and one inter-op thread in torch (ORT sessions take theirs)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass


def environment(threads: int) -> dict[str, Any]:
    """Versions and thread settings, recorded with every result file."""
    import onnx
    import onnxruntime
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ort_intra_op_threads": threads,
        "ort_inter_op_threads": 1,
    }
    for name in ("onnxscript", "onnx_ir", "transformers", "onnxoptimizer", "onnxslim"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except ImportError:
            env[name] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
