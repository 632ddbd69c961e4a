"""Peak memory (and CPU time) of normsurgeon's numerical check, on large outputs (issue 17).

Three measurements, each in a fresh process per repetition (median of ``--reps``):

* ``compare`` — :func:`normsurgeon.compare_outputs` on two float32 tensors of ``--elements``
  elements (the second one the first plus 1e-6 noise), reported over one tensor's bytes;
* ``fold_affine`` — what ``normsurgeon fold --affine`` runs on a loaded model (``fold_batchnorm``
  then ``fold_norm_affines``, each with its trace and its check) on a ``transformers``
  LlamaForCausalLM built from a config (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab
  32000, untied head, random weights) at batch 1, sequence length ``--seq-len`` (2048);
* ``float64_reference`` — :func:`normsurgeon.check.rounding_noise` on the same model and inputs:
  the float64 run a BatchNorm fold falls back on, which converts each layer's weights per call.

Peak extra memory is the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the call) minus the resident set just before it, with
glibc's mmap threshold fixed at 64 KiB so a freed tensor goes back to the OS and a later one cannot
hide in it (as in ``benchmarks/pass_cost.py``). CPU time is measured in other processes, with
glibc's default settings. A warm-up call on small inputs loads the code paths first.

    python -m benchmarks.check_memory                      # this checkout's normsurgeon
    python -m benchmarks.check_memory --source DIR         # the normsurgeon package in DIR instead, e.g. an
                                                           # older commit: git archive C normsurgeon | tar -x -C DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.pass_cost import _reset_peak, _rss_kib, _worker_env

_ROOT = Path(__file__).resolve().parent.parent

METHODS = ("compare", "fold_affine", "float64_reference")
LLAMA = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}


# --------------------------------------------------------------------------- in the worker


def _llama(seq_len: int, *, small: bool = False):
    """The benchmark's LlamaForCausalLM (random weights, eval mode) and its input ids."""
    import torch
    import transformers

    config = dict(LLAMA, hidden_size=32, intermediate_size=64, vocab_size=64) if small else LLAMA
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, max_position_embeddings=seq_len)).eval()
    ids = torch.randint(0, config["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def _subject(method: str, elements: int, seq_len: int):
    """The call to measure and what it reads: (run, inputs, facts about their size)."""
    import torch

    from normsurgeon import compare_outputs, fold_batchnorm, fold_norm_affines
    from normsurgeon.check import rounding_noise

    if method == "compare":
        ref = torch.randn(elements, generator=torch.Generator().manual_seed(0))
        new = ref + 1e-6 * torch.randn(elements, generator=torch.Generator().manual_seed(1))
        facts = {"output_bytes": ref.numel() * ref.element_size()}
        return (lambda: compare_outputs(ref, new).passed), facts
    model, inputs = _llama(seq_len)
    facts = {"weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
             "output_bytes": seq_len * LLAMA["vocab_size"] * 4}
    if method == "fold_affine":
        def fold() -> bool:
            report = fold_batchnorm(model, inputs)
            return fold_norm_affines(report.model, inputs).check.passed
        return fold, facts
    with torch.no_grad():
        outputs = model(*inputs)
    return (lambda: rounding_noise(model, inputs, outputs) is not None), facts


def _warm_up(method: str) -> None:
    import torch

    from normsurgeon import compare_outputs, fold_batchnorm, fold_norm_affines
    from normsurgeon.check import rounding_noise

    model, inputs = _llama(16, small=True)
    compare_outputs(torch.randn(1000), torch.randn(1000))
    if method != "compare":
        fold_norm_affines(fold_batchnorm(model, inputs).model, inputs)
        with torch.no_grad():
            rounding_noise(model, inputs, model(*inputs))


def measure(method: str, probe: str, elements: int, seq_len: int, threads: int) -> dict:
    """One call of ``method``: its peak extra RSS (probe "memory") or its CPU seconds (probe "time")."""
    import warnings

    import torch

    import normsurgeon

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    _warm_up(method)
    run, facts = _subject(method, elements, seq_len)
    gc.collect()
    before = _rss_kib("VmRSS")
    if probe == "memory" and (not _reset_peak() or before is None):
        raise SystemExit("this kernel has no /proc/self/clear_refs: peak RSS cannot be measured")
    start = time.process_time()
    passed = run()
    seconds = time.process_time() - start
    peak = _rss_kib("VmHWM")
    return {"method": method, "probe": probe, "passed": passed, "normsurgeon": str(Path(normsurgeon.__file__).parent),
            **facts, **({"peak_extra_bytes": (peak - before) * 1024} if probe == "memory" else {"seconds": seconds})}


# --------------------------------------------------------------------------- in the parent


def _run_worker(job: dict, source: Path | None) -> dict:
    env = _worker_env(job["probe"])
    env["PYTHONPATH"] = str(_ROOT)  # for this module; normsurgeon comes from the working folder, ``source`` first
    command = [sys.executable, "-m", "benchmarks.check_memory", "--worker", json.dumps(job)]
    done = subprocess.run(command, cwd=source or _ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"check-memory worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def run(methods: tuple[str, ...], *, elements: int, seq_len: int, reps: int, threads: int,
        source: Path | None) -> list[dict]:
    """One summary row per method: median peak extra bytes and CPU seconds over ``reps`` fresh processes each."""
    rows = []
    for method in methods:
        jobs = {probe: {"method": method, "probe": probe, "elements": elements, "seq_len": seq_len,
                        "threads": threads} for probe in ("memory", "time")}
        results = {probe: [_run_worker(job, source) for _ in range(reps)] for probe, job in jobs.items()}
        first = results["memory"][0]
        row = {key: first[key] for key in ("method", "normsurgeon", "output_bytes", "weight_bytes") if key in first}
        row["passed"] = all(r["passed"] for rs in results.values() for r in rs)
        row["peak_extra_bytes_all"] = [r["peak_extra_bytes"] for r in results["memory"]]
        row["seconds_all"] = [round(r["seconds"], 3) for r in results["time"]]
        row["peak_extra_bytes"] = statistics.median(row["peak_extra_bytes_all"])
        row["seconds"] = statistics.median(row["seconds_all"])
        rows.append(row)
        print(_describe(row), flush=True)
    return rows


def _describe(row: dict) -> str:
    mib = row["peak_extra_bytes"] / 2**20
    shares = [f"{row['peak_extra_bytes'] / row[key]:.2f}x {key[:-6]}s" for key in ("output_bytes", "weight_bytes")
              if key in row]
    return (f"{row['method']}: peak extra {mib:.0f} MiB ({', '.join(shares)}), {row['seconds']:.2f} s CPU, "
            f"passed={row['passed']}  [{row['normsurgeon']}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--elements", type=int, default=32 << 20, help="elements of each compared tensor")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--source", type=Path, help="a folder holding the normsurgeon package to measure")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(measure(job["method"], job["probe"], job["elements"], job["seq_len"], job["threads"])))
        return
    rows = run(tuple(args.methods), elements=args.elements, seq_len=args.seq_len, reps=args.reps,
               threads=args.threads, source=args.source.resolve() if args.source else None)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
