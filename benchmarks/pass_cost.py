"""The cost of the passes themselves: time and peak extra memory of folding, by depth.

On ResNet-style models (``models.resnet.build_resnet(depth, width=...)``) of growing depth, with
one image of each requested size as the example input (32x32 by default; ``python -m benchmarks.run
--only pass_cost --input-size 32,224`` measures both), each method runs on a fresh deep copy of the
model:

* ``forward`` — one plain no-grad forward pass, for scale;
* ``ns_trace`` — normsurgeon's dataflow trace alone (part of the fold);
* ``ns_fold`` — ``fold_batchnorm(model, inputs)`` in place (trace, plan, fold, check);
* ``fx_fuse_copy`` — ``torch.fx.experimental.optimization.fuse(model)`` (deep copy, its default);
* ``fx_fuse_inplace`` — ``fuse(model, inplace=True)``.

Time and memory are measured in separate subprocesses, because measuring memory exactly slows
the passes down unevenly:

* **time** is process CPU time (a shared machine's waits for a core are left out; torch runs on
  the pinned thread count), with glibc's default allocator settings, as users run it. All methods
  of one depth run in one fresh process, *interleaved*: every round calls each method once, in a
  shuffled order, so a slow spell of the machine hits all of them alike; fold ÷ fx.fuse is the
  median over rounds of the ratio within a round (methods timed in separate processes one after
  the other moved ±25% against each other as the machine's load drifted);
* **peak extra memory** is the resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the call) minus the resident set just before it, each
  method in its own fresh process. RSS sees everything the pass allocates: torch's CPU tensors
  (which ``tracemalloc`` does not see: a 50 MB ``torch.empty`` shows up there as 80 bytes) and
  Python objects (the trace's nodes). That subprocess fixes glibc's mmap threshold (64 KiB), so a
  freed large tensor is returned to the OS and a later allocation cannot hide in it. The price is
  an mmap and page faults for every activation, which doubled the time of a forward pass, so no
  time is taken there.

A warm-up run on a small model first loads the code paths, so their pages are not counted.
A call on a larger image does (size/32)² times the work of a 32x32 one and varies relatively less,
so it is repeated fewer times (``reps_at``): the same pixel work, but at least 5 times.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("forward", "ns_trace", "ns_fold", "fx_fuse_copy", "fx_fuse_inplace")
PEERS = ("fx_fuse_copy", "fx_fuse_inplace")
BASE_SIZE = 32  # the input size ``reps`` is given for
MIN_REPS = 5
_STATUS = "/proc/self/status"


# --------------------------------------------------------------------------- in the worker


def _rss_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _method(name: str):
    import torch
    from torch.fx.experimental.optimization import fuse

    from normsurgeon import fold_batchnorm
    from normsurgeon.trace import trace

    def forward(model, inputs):
        with torch.no_grad():
            return model(*inputs)

    return {
        "forward": forward,
        "ns_trace": lambda model, inputs: trace(model, inputs),
        # a correct fold of a deep fp32 net can exceed the default tolerance (rounding grows with
        # depth); the check is computed either way, so not raising costs nothing extra
        "ns_fold": lambda model, inputs: fold_batchnorm(model, inputs, raise_on_mismatch=False),
        "fx_fuse_copy": lambda model, inputs: fuse(model),
        "fx_fuse_inplace": lambda model, inputs: fuse(model, inplace=True),
    }[name]


def reps_at(size: int, reps: int) -> int:
    """Repetitions at ``size``×``size``: ``reps`` at 32×32, fewer for larger images (never under 5 or ``reps``)."""
    return max(min(reps, MIN_REPS), round(reps * BASE_SIZE**2 / size**2))


def _load(model_path: str, threads: int, warm_up: list[str], size: int):
    """The saved model and one ``size``×``size`` image, after a warm-up call of each method on a small model."""
    import warnings

    import torch

    from models.inputs import images
    from models.resnet import build_resnet

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    inputs = images(1, size=size)
    for name in warm_up:  # load code paths (and their pages) before anything is measured
        _result = _method(name)(build_resnet(18, width=4), inputs)
        del _result
    return torch.load(model_path, weights_only=False), inputs


def _fold_check(result) -> dict:
    check = result.check
    return {"passed": check.passed, "max_abs_diff": check.max_abs_diff, "atol": check.atol, "rtol": check.rtol}


def measure_time(model_path: str, reps: int, threads: int, size: int) -> list[dict]:
    """CPU seconds of every method on deep copies of the model, interleaved in shuffled rounds."""
    model, inputs = _load(model_path, threads, list(METHODS), size)
    runs = {name: _method(name) for name in METHODS}
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    check = None
    order = list(METHODS)
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            work = copy.deepcopy(model)
            gc.collect()
            start = time.process_time()
            result = runs[name](work, inputs)
            seconds[name].append(time.process_time() - start)
            if name == "ns_fold" and check is None:
                check = _fold_check(result)
            del result, work
    fold = seconds["ns_fold"]
    ratios = {peer: statistics.median(a / b for a, b in zip(fold, seconds[peer], strict=True)) for peer in PEERS}
    return [
        {"method": name, "seconds": statistics.median(times), "seconds_all": times,
         **({"check": check, "ratio_to": ratios} if name == "ns_fold" else {})}
        for name, times in seconds.items()
    ]


def measure_memory(model_path: str, method: str, reps: int, threads: int, size: int) -> dict:
    """Peak extra RSS of ``method`` on deep copies of the model (median over ``reps`` calls)."""
    model, inputs = _load(model_path, threads, [method], size)
    run = _method(method)
    peaks = []
    can_reset = _reset_peak()
    for _ in range(reps):
        work = copy.deepcopy(model)
        gc.collect()
        before = _rss_kib("VmRSS")
        can_reset = _reset_peak() and can_reset
        result = run(work, inputs)
        peak = _rss_kib("VmHWM")
        if can_reset and before is not None and peak is not None:
            peaks.append(max(0, peak - before) * 1024)
        del result, work
        gc.collect()
    return {
        "method": method,
        "peak_extra_bytes": statistics.median(peaks) if peaks else None,
        "peak_extra_bytes_all": peaks,
        "memory_probe": "VmHWM after clear_refs" if can_reset else None,
    }


# --------------------------------------------------------------------------- in the parent


def _worker_env(probe: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    if probe == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        env["MALLOC_TRIM_THRESHOLD_"] = str(128 * 1024)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run_worker(jobs: list[dict], threads: int, probe: str) -> list[dict]:
    command = [sys.executable, "-m", "benchmarks.pass_cost", "--worker", json.dumps(jobs), "--threads", str(threads),
               "--probe", probe]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, cwd=root, env=_worker_env(probe), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pass-cost worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def run_pass_cost(
    *, depths: tuple[int, ...], width: int, reps: int, threads: int, input_sizes: tuple[int, ...] = (BASE_SIZE,),
    one_process: bool = False,
) -> list[dict]:
    """One row per (input size, depth, method), ``reps`` calls at 32×32 (``reps_at`` elsewhere).

    ``one_process`` measures every method's memory in one worker (smoke mode).
    """
    import torch

    from benchmarks.subjects import count_batchnorms, weight_bytes
    from models.resnet import build_resnet

    rows = []
    with tempfile.TemporaryDirectory(prefix="nsbench-") as tmp:
        for depth in depths:
            model = build_resnet(depth, width=width)
            path = str(Path(tmp) / f"resnet{depth}.pt")
            torch.save(model, path)
            facts = {
                "depth": depth, "width": width, "weight_bytes": weight_bytes(model),
                "batchnorms": count_batchnorms(model),
                "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
            }
            for size in input_sizes:
                rows += _measure(path, {**facts, "input_size": size, "reps": reps_at(size, reps)}, threads, one_process)
    return rows


def _measure(path: str, facts: dict, threads: int, one_process: bool) -> list[dict]:
    """Time (one worker, interleaved) and peak memory (a worker per method) of every method on one input size."""
    job = {"model_path": path, "reps": facts["reps"], "size": facts["input_size"]}
    timed = _run_worker([job], threads, "time")
    jobs = [{**job, "method": m} for m in METHODS]
    batches = [jobs] if one_process else [[job] for job in jobs]
    sized = [result for batch in batches for result in _run_worker(batch, threads, "memory")]
    rows = []
    for time_result, memory_result in zip(timed, sized, strict=True):
        row = {**facts, **time_result, **memory_result}
        rows.append(row)
        mem = row["peak_extra_bytes"]
        share = f"{mem / row['weight_bytes']:.2f}x weights" if mem is not None else "n/a"
        size = row["input_size"]
        print(f"  pass resnet{row['depth']} {size}x{size} {row['method']}: {row['seconds']:.3f}s, peak extra {share}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="JSON list of jobs (internal)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe", choices=("time", "memory"), required=True)
    args = parser.parse_args()
    for job in json.loads(args.worker):
        if args.probe == "time":
            results = measure_time(job["model_path"], job["reps"], args.threads, job["size"])
        else:
            results = [measure_memory(job["model_path"], job["method"], job["reps"], args.threads, job["size"])]
        for result in results:
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
