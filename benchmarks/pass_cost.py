"""The cost of the passes themselves: time and peak extra memory of folding, by depth.

On ResNet-style models (``models.resnet.build_resnet(depth, width=...)``, one 32x32 image as
the example input) of growing depth, each method runs in a *fresh subprocess* on a fresh deep
copy of the model, several times:

* ``forward`` — one plain no-grad forward pass, for scale;
* ``ns_trace`` — normsurgeon's dataflow trace alone (part of the fold);
* ``ns_fold`` — ``fold_batchnorm(model, inputs)`` in place (trace, plan, fold, check);
* ``fx_fuse_copy`` — ``torch.fx.experimental.optimization.fuse(model)`` (deep copy, its default);
* ``fx_fuse_inplace`` — ``fuse(model, inplace=True)``.

Time and memory are measured in separate subprocesses, because measuring memory exactly slows
the passes down unevenly:

* **time** is process CPU time (a shared machine's waits for a core are left out; torch runs on
  the pinned thread count), with glibc's default allocator settings, as users run it;
* **peak extra memory** is the resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the call) minus the resident set just before it. RSS
  sees everything the pass allocates: torch's CPU tensors (which ``tracemalloc`` does not see: a
  50 MB ``torch.empty`` shows up there as 80 bytes) and Python objects (the trace's nodes). That
  subprocess fixes glibc's mmap threshold (64 KiB), so a freed large tensor is returned to the OS
  and a later allocation cannot hide in it. The price is an mmap and page faults for every
  activation, which doubled the time of a forward pass, so no time is taken there.

A warm-up run on a small model first loads the code paths, so their pages are not counted.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("forward", "ns_trace", "ns_fold", "fx_fuse_copy", "fx_fuse_inplace")
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


def measure(model_path: str, method: str, reps: int, threads: int, probe: str) -> dict:
    """CPU time (``probe="time"``) or peak extra RSS (``"memory"``) of ``method`` on deep copies of the model."""
    import warnings

    import torch

    from models.inputs import images
    from models.resnet import build_resnet

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    run = _method(method)
    inputs = images(1)
    _result = run(build_resnet(18, width=4), inputs)  # warm-up: load code paths
    del _result
    model = torch.load(model_path, weights_only=False)
    seconds, peaks, checks = [], [], []
    can_reset = _reset_peak()
    for _ in range(reps):
        work = copy.deepcopy(model)
        gc.collect()
        before = _rss_kib("VmRSS")
        can_reset = _reset_peak() and can_reset
        start = time.process_time()
        result = run(work, inputs)
        seconds.append(time.process_time() - start)
        peak = _rss_kib("VmHWM")
        if method == "ns_fold":
            check = result.check
            checks.append({"passed": check.passed, "max_abs_diff": check.max_abs_diff, "atol": check.atol,
                           "rtol": check.rtol})
        if can_reset and before is not None and peak is not None:
            peaks.append(max(0, peak - before) * 1024)
        del result, work
        gc.collect()
    if probe == "time":
        return {"method": method, "seconds": statistics.median(seconds), "seconds_all": seconds,
                "check": checks[0] if checks else None}
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
    *, depths: tuple[int, ...], width: int, reps: int, threads: int, one_process: bool = False
) -> list[dict]:
    """One row per (depth, method). ``one_process`` runs every job in one worker (smoke mode)."""
    import torch

    from benchmarks.subjects import count_batchnorms, weight_bytes
    from models.resnet import build_resnet

    rows, jobs = [], []
    with tempfile.TemporaryDirectory(prefix="nsbench-") as tmp:
        facts = {}
        for depth in depths:
            model = build_resnet(depth, width=width)
            path = Path(tmp) / f"resnet{depth}.pt"
            torch.save(model, path)
            facts[depth] = {
                "weight_bytes": weight_bytes(model), "batchnorms": count_batchnorms(model),
                "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
            }
            jobs += [{"depth": depth, "model_path": str(path), "method": m, "reps": reps} for m in METHODS]
        batches = [jobs] if one_process else [[job] for job in jobs]
        for batch in batches:
            timed, sized = _run_worker(batch, threads, "time"), _run_worker(batch, threads, "memory")
            for job, time_result, memory_result in zip(batch, timed, sized, strict=True):
                row = {"depth": job["depth"], "width": width, **facts[job["depth"]], **time_result, **memory_result}
                rows.append(row)
                mem = row["peak_extra_bytes"]
                share = f"{mem / row['weight_bytes']:.2f}x weights" if mem is not None else "n/a"
                print(f"  pass resnet{job['depth']} {job['method']}: {row['seconds']:.3f}s, peak extra {share}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="JSON list of jobs (internal)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe", choices=("time", "memory"), required=True)
    args = parser.parse_args()
    for job in json.loads(args.worker):
        result = measure(job["model_path"], job["method"], job["reps"], args.threads, args.probe)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
