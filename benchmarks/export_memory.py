"""Peak memory of ``normsurgeon export`` beyond the loaded model, against the weight bytes (issue 18).

A random-weight ``transformers`` LlamaForCausalLM (hidden 1024, intermediate 2816, 12 layers, 16 heads, 4 KV heads,
vocab 32000, untied head: 0.20 B parameters, 0.80 GB in float32) is written by ``save_pretrained`` to a temporary
folder in a process of its own, once per dtype. Then, per repetition, each in a fresh process, peak RSS
(``ru_maxrss`` through ``os.wait4``, glibc's default settings, what ``/usr/bin/time -f %M`` reports):

* ``export`` -- ``python -m normsurgeon export DIR -o OUT`` (the inferred 1x16 token ids, verified in onnxruntime);
* ``loaded`` -- the loaded model: the process imports normsurgeon, loads DIR the way the CLI does, runs one forward
  on the same inputs and reads every parameter once (a safetensors checkpoint is memory-mapped: a forward alone
  leaves most of the embedding unread, which the export's save reads);
* ``forward`` -- the same without reading every parameter (the lower baseline the README quoted before);
* ``imports`` -- ``loaded`` with the ONNX stack export imports (torch.onnx, onnxscript, onnx_ir, onnxruntime)
  imported too: how much of *beyond* is code, whatever the model's size.

*Beyond* is the export's peak minus the loaded model's, reported in bytes and as a multiple of the weight bytes
(median of ``--reps``). Twice: for the whole resident set, and for its anonymous part (``RssAnon``, sampled every
5 ms by the parent: the kernel keeps no high-water mark for it). The resident set counts the file pages a process
maps: the safetensors checkpoint torch reads, the .onnx onnxruntime reads its weights from; the kernel can drop
and reread those, so the anonymous part is what the export itself holds. ``--steps`` adds one more export in an
instrumented process that reads ``VmRSS``/``RssAnon``/``RssFile``/``VmHWM`` (high-water mark reset through
``/proc/self/clear_refs``) around each step: pre-export passes, torch.onnx.export, fuse + save, the onnxruntime
session, the comparison.

    python -m benchmarks.export_memory                 # float32, 3 reps, with --steps (~3 min on 2 cores)
    python -m benchmarks.export_memory --dtypes float32 bfloat16
    python -m benchmarks.export_memory --quick         # a tiny Llama, 1 rep (tests/benchmarks/test_export_memory.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
RESULTS = _ROOT / "benchmarks" / "results" / "export_memory.json"

LLAMA = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
         "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 2048}
QUICK_LLAMA = dict(LLAMA, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000)


# --------------------------------------------------------------------------- in the workers


def build(folder: Path, config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Write a random-weight LlamaForCausalLM (seed 0) in ``dtype`` to ``folder``; its parameter and weight bytes."""
    import torch

    import normsurgeon  # noqa: F401  (before transformers: it declares torchvision operators the CPU torch lacks)
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, use_cache=False))
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(folder)
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params), "weight_bytes": sum(p.nbytes for p in params)}


def load(folder: Path, *, touch: bool, onnx_stack: bool = False) -> dict[str, Any]:
    """Load ``folder`` as the CLI does, run one forward on the inputs export infers; with ``touch``, read every
    parameter too (a max over each: no converted copy); with ``onnx_stack``, also import what export imports (torch.onnx,
    onnxscript, onnx_ir, onnxruntime). Reports the process's resident set after."""
    import torch

    from normsurgeon.io.inputs import resolve_inputs
    from normsurgeon.io.loading import load_model

    if onnx_stack:
        import normsurgeon.onnx.export  # noqa: F401
    model = load_model(folder).model.eval()
    inputs = resolve_inputs(model, input_shapes=(), inputs_file=None, trust_pickle=False)
    with torch.no_grad():
        inputs.call(model)
        if touch:
            for parameter in model.parameters():
                parameter.detach().max()  # a reduction in place: no converted or widened copy
    return {"rss_bytes": _status_kib("VmRSS") * 1024}


def steps(folder: Path, out: Path) -> list[dict[str, Any]]:
    """Export ``folder`` to ``out`` as the CLI does, with the resident set and its high-water mark read before and
    after each step; each step's peak is measured from its start (the mark is reset there)."""
    import torch

    from normsurgeon.io.inputs import resolve_inputs
    from normsurgeon.io.loading import load_model
    from normsurgeon.onnx import export, runtime, verify

    rows: list[dict[str, Any]] = []

    def probed(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            before = _reset_and_read()
            try:
                return inner(*args, **kwargs)
            finally:
                rows.append({"step": label, "rss_before_bytes": before * 1024, **_after()})

        setattr(owner, name, call)

    start = _reset_and_read()
    model = load_model(folder).model
    inputs = resolve_inputs(model, input_shapes=(), inputs_file=None, trust_pickle=False)
    rows.append({"step": "load", "rss_before_bytes": start * 1024, **_after()})
    for owner, name, label in ((export, "pre_export", "pre-export passes (a forward)"),
                               (torch.onnx, "export", "torch.onnx.export"),
                               (export, "finish_and_save", "fuse + save"),
                               (runtime, "session", "onnxruntime session"),
                               (verify, "compare_outputs", "comparison")):
        probed(owner, name, label)
    report = export.export_onnx(model, inputs, out, force=True)
    rows.append({"step": "passed", "passed": report.passed})
    return rows


def _status_kib(field: str, path: str = "/proc/self/status") -> int:
    with open(path) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _after() -> dict[str, int]:
    """The resident set now, its anonymous and file-backed parts, and its high-water mark, in bytes."""
    return {"rss_after_bytes": _status_kib("VmRSS") * 1024, "anon_after_bytes": _status_kib("RssAnon") * 1024,
            "file_after_bytes": _status_kib("RssFile") * 1024, "peak_bytes": _status_kib("VmHWM") * 1024}


def _reset_and_read() -> int:
    """Reset the high-water mark to the current resident set (Linux: write 5 to clear_refs); the resident set."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS")


# --------------------------------------------------------------------------- in the parent


def _python(args: list[str], *, timeout: float) -> tuple[str, dict[str, int], float, int]:
    """Run ``python args`` from the repository root: (stdout, peaks, wall seconds, return code). ``peaks``: the
    peak resident set (``ru_maxrss``) and the peak anonymous part of it (``RssAnon``, sampled every few ms)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env["PYTHONWARNINGS"] = "ignore"
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, *args], cwd=_ROOT, env=env, stdout=stdout, stderr=stderr)
        anon = _AnonSampler(process.pid)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            raise
        finally:
            anon.stop()
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if wall > timeout:
        raise RuntimeError(f"{args[:3]} took {wall:.0f} s, over {timeout:.0f} s")
    if process.returncode != 0 and args[:2] != ["-m", "normsurgeon"]:
        raise RuntimeError(f"worker {args[:4]} failed ({process.returncode}): {err[-2000:]}")
    return out, {"rss": usage.ru_maxrss * 1024, "anon": anon.peak_kib * 1024}, wall, process.returncode


class _AnonSampler:
    """The peak ``RssAnon`` of a running process, read from ``/proc/PID/status`` every ``interval`` seconds.

    The kernel keeps a high-water mark for the whole resident set only; that one counts the file pages a process
    maps (a safetensors checkpoint, the .onnx onnxruntime maps), which the kernel can drop and reread. The
    anonymous part is the memory the export itself holds."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.peak_kib = 0
        self._status = f"/proc/{pid}/status"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._done.wait(interval):
            try:
                self.peak_kib = max(self.peak_kib, _status_kib("RssAnon", self._status))
            except (OSError, RuntimeError, ValueError):  # the process has exited
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _worker(job: dict[str, Any], *, timeout: float) -> Any:
    out, peak, wall, _ = _python(["-m", "benchmarks.export_memory", "--worker", json.dumps(job)], timeout=timeout)
    return json.loads(out.splitlines()[-1]), peak, wall


def measure(dtype: str, config: dict[str, Any], *, reps: int, with_steps: bool, work: Path,
            timeout: float) -> dict[str, Any]:
    """One row: the model's size, and per kind (export, loaded, forward) every repetition's peak, their median;
    the export's wall time and what it costs beyond the loaded model."""
    folder = work / f"llama-{dtype}"
    size, _, _ = _worker({"do": "build", "folder": str(folder), "config": config, "dtype": dtype}, timeout=timeout)
    row: dict[str, Any] = {"dtype": dtype, **size, "config": config}
    peaks: dict[str, list[dict[str, int]]] = {"export": [], "loaded": [], "forward": [], "imports": []}
    walls: list[float] = []
    for _ in range(reps):
        for kind in ("loaded", "forward", "imports"):
            job = {"do": "load", "folder": str(folder), "touch": kind != "forward", "onnx_stack": kind == "imports"}
            _, peak, _ = _worker(job, timeout=timeout)
            peaks[kind].append(peak)
        out = work / f"llama-{dtype}.onnx"
        _, peak, wall, code = _python(["-m", "normsurgeon", "export", str(folder), "-o", str(out), "--force"],
                                      timeout=timeout)
        if code != 0:
            raise RuntimeError(f"normsurgeon export failed ({code}) on the {dtype} Llama")
        peaks["export"].append(peak)
        walls.append(round(wall, 2))
        out.unlink()
    for kind, values in peaks.items():
        for measure_, suffix in (("rss", ""), ("anon", "_anon")):
            row[f"{kind}_peak{suffix}_bytes_all"] = [value[measure_] for value in values]
            row[f"{kind}_peak{suffix}_bytes"] = int(statistics.median(value[measure_] for value in values))
    row["export_wall_s_all"] = walls
    row["export_wall_s"] = statistics.median(walls)
    for baseline in ("loaded", "forward", "imports"):
        for suffix in ("", "_anon"):
            beyond = row[f"export_peak{suffix}_bytes"] - row[f"{baseline}_peak{suffix}_bytes"]
            row[f"beyond_{baseline}{suffix}_bytes"] = beyond
            row[f"beyond_{baseline}{suffix}_x_weights"] = round(beyond / row["weight_bytes"], 3)
    if with_steps:
        row["steps"], _, _ = _worker({"do": "steps", "folder": str(folder), "out": str(work / "steps.onnx")},
                                     timeout=timeout)
    return row


def describe(row: dict[str, Any]) -> str:
    """The row as the lines the README quotes."""
    mib = 2**20
    lines = [
        f"{row['dtype']}: {row['parameters'] / 1e9:.2f} B parameters, {row['weight_bytes'] / mib:.0f} MiB of weights; "
        f"export peak {row['export_peak_bytes'] / mib:.0f} MiB, {row['export_wall_s']:.1f} s; loaded model "
        f"{row['loaded_peak_bytes'] / mib:.0f} MiB (one forward only: {row['forward_peak_bytes'] / mib:.0f} MiB)",
        f"  beyond the loaded model: {row['beyond_loaded_bytes'] / mib:.0f} MiB = {row['beyond_loaded_x_weights']:.2f}x "
        f"the weights (beyond one forward: {row['beyond_forward_bytes'] / mib:.0f} MiB = "
        f"{row['beyond_forward_x_weights']:.2f}x); of it, importing the ONNX stack: "
        f"{(row['imports_peak_bytes'] - row['loaded_peak_bytes']) / mib:.0f} MiB",
        f"  anonymous memory (RssAnon, sampled): export peak {row['export_peak_anon_bytes'] / mib:.0f} MiB, loaded "
        f"model {row['loaded_peak_anon_bytes'] / mib:.0f} MiB; beyond: {row['beyond_loaded_anon_bytes'] / mib:.0f} MiB "
        f"= {row['beyond_loaded_anon_x_weights']:.2f}x the weights",
    ]
    for step in row.get("steps", []):
        if "peak_bytes" in step:
            lines.append(f"    {step['step']:30s} RSS {step['rss_before_bytes'] / mib:6.0f} -> "
                         f"{step['rss_after_bytes'] / mib:6.0f} MiB (anonymous {step['anon_after_bytes'] / mib:6.0f}, "
                         f"file {step['file_after_bytes'] / mib:6.0f}), peak {step['peak_bytes'] / mib:6.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-steps", action="store_true", help="skip the instrumented per-step export")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, 1 repetition")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        folder = Path(job["folder"])
        if job["do"] == "build":
            result: Any = build(folder, job["config"], job["dtype"])
        elif job["do"] == "load":
            result = load(folder, touch=job["touch"], onnx_stack=job["onnx_stack"])
        else:
            result = steps(folder, Path(job["out"]))
        print(json.dumps(result))
        return
    config, reps = (QUICK_LLAMA, 1) if args.quick else (LLAMA, args.reps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-memory.") as work:
        for dtype in args.dtypes:
            row = measure(dtype, config, reps=reps, with_steps=not args.no_steps, work=Path(work), timeout=900)
            rows.append(row)
            print(describe(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
