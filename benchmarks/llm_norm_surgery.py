"""LLM norm surgery: normsurgeon's ``fold --affine`` against llm-compressor's norm fusion (issue 17).

Folding every RMSNorm/LayerNorm scale into the linear layers that read it is the first step of
rotation-based quantization (QuaRot, SpinQuant). Two ways to do it on a loaded ``transformers``
causal LM, each on the same model and the same 32 token ids (batch 1):

* ``normsurgeon`` -- what ``normsurgeon fold --affine`` runs: ``run_fold(Sequential(fold_passes(),
  FoldNormAffines()), model, inputs)``, its trace and its check against the original outputs included;
* ``llm-compressor`` -- ``llmcompressor.modeling.fuse_norm_linears`` over SpinQuant's norm mapping
  for the architecture, matched with ``compressed_tensors.match_modules_set`` as
  ``SpinQuantModifier._fuse_norms`` does; where llm-compressor has no mapping that matches (OPT,
  Phi), the one a user would write by hand (:data:`HAND_MAPPINGS`). It checks nothing.

Models: small random-weight configs of Llama, Qwen2, OPT and Phi (``tests/hf_models.py``: hidden 32,
2 layers, untied head) and a 0.17 B-parameter Llama (:data:`LLAMA_017B`), every norm affine
randomized (``models.calibrate.randomize_affine``: scales in +-[0.5, 1.5], LayerNorm shifts
N(0, 0.2)) so a fold that drops or misplaces one shows in the logits.

Each number comes from fresh processes, one torch thread, ``--reps`` of each (median), the methods
interleaved: *time* is the call's wall and CPU seconds (glibc's default allocator); *extra memory*
is the resident-set high-water mark during the call (``VmHWM``, the ``ru_maxrss`` of the kernel,
reset through ``/proc/self/clear_refs`` after the model is loaded) minus the resident set just
before the call, in another process with glibc's mmap threshold at 64 KiB so freed tensors go back
to the OS (as in ``benchmarks/pass_cost.py``). Before the call every worker warms its method up on
a tiny Llama and runs the model once for the reference logits; the logits error is the largest
absolute difference from that reference after the call, on the same ids::

    python -m benchmarks.llm_norm_surgery                 # ~6 min on 2 cores
    python -m benchmarks.llm_norm_surgery --quick         # tiny Llama, one rep (smoke)
    python -m benchmarks.llm_norm_surgery --models llama-0.17b --reps 5
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
from typing import Any

from benchmarks.pass_cost import _reset_peak, _rss_kib, _worker_env
from benchmarks.reparam_timm import table

_ROOT = Path(__file__).resolve().parent.parent
RESULTS = _ROOT / "benchmarks" / "results" / "llm_norm_surgery.json"

METHODS = ("normsurgeon", "llm-compressor")
MODELS = ("llama", "qwen2", "opt", "phi", "llama-0.17b")
SEQ_LEN = 32
# 0.168 B parameters: hidden 1024, 8 layers (16 decoder norms and the final one), vocab 32000, untied head.
LLAMA_017B = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": 32000, "tie_word_embeddings": False,
              "max_position_embeddings": SEQ_LEN}
# SpinQuant norm mappings (llmcompressor NormMapping fields) for architectures whose module names
# llm-compressor's registry and default mapping do not match; Llama and Qwen2 use its own.
HAND_MAPPINGS: dict[str, list[dict[str, Any]]] = {
    "OPTForCausalLM": [
        {"norm": "re:.*self_attn_layer_norm$", "linears": ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]},
        {"norm": r"re:.*layers\.\d+\.final_layer_norm$", "linears": ["re:.*fc1$"]},
        {"norm": "model.decoder.final_layer_norm", "linears": ["lm_head"]},
    ],
    "PhiForCausalLM": [  # parallel attention and MLP: one norm feeds q/k/v and fc1
        {"norm": "re:.*input_layernorm$", "linears": ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$", "re:.*fc1$"]},
        {"norm": "model.final_layernorm", "linears": ["lm_head"]},
    ],
}


# --------------------------------------------------------------------------- in the worker


def build(name: str):
    """The named causal LM (random weights, norm affines randomized, eval mode) and its token ids."""
    import torch

    import normsurgeon  # noqa: F401  (before transformers: it declares torchvision operators the CPU torch lacks)
    from tests.hf_models import VOCAB, causal_lm, prenorm_model

    if name == "llama-0.17b":
        import transformers

        from models.calibrate import randomize_affine

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_017B))
        model = randomize_affine(model, torch.Generator().manual_seed(0)).eval()
        vocab = LLAMA_017B["vocab_size"]
    else:
        model, vocab = (prenorm_model(name) if name == "phi" else causal_lm(name)), VOCAB
    ids = torch.randint(0, vocab, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def _normsurgeon(model, inputs) -> dict[str, Any]:
    """``fold --affine``'s pipeline on the loaded model (its check included): how many norms it folded, the check."""
    from normsurgeon.passes.fold_batchnorm import fold_passes, run_fold
    from normsurgeon.passes.fold_norm_affine import FoldNormAffines
    from normsurgeon.pipeline import Sequential

    report = run_fold(Sequential(fold_passes(), FoldNormAffines()), model, inputs, raise_on_mismatch=False)
    folded = {change.module for change in report.changed("folded-affine")}
    worst = max((check.max_abs_diff for check in report.checks), default=float("nan"))
    return {"norms_folded": len(folded), "check_passed": report.passed, "check_max_abs_diff": worst}


def _llm_compressor_mapping(model) -> tuple[list, str]:
    """SpinQuant's norm mappings for ``model`` and where they come from (llm-compressor's registry or default, or
    :data:`HAND_MAPPINGS`)."""
    from llmcompressor.modifiers.transform.spinquant.norm_mappings import (
        NORM_MAPPING_REGISTRY,
        NormMapping,
        infer_norm_mapping_from_model,
    )

    architecture = type(model).__name__
    if architecture in HAND_MAPPINGS:
        return [NormMapping(**m) for m in HAND_MAPPINGS[architecture]], "hand-written"
    source = "registry" if architecture in NORM_MAPPING_REGISTRY else "default"
    return infer_norm_mapping_from_model(model), source


def _llm_compressor(model, inputs) -> dict[str, Any]:
    """SpinQuantModifier._fuse_norms on the loaded model, mapping lookup included: how many norms it fused."""
    import torch
    from compressed_tensors import match_modules_set
    from llmcompressor.modeling.fuse import fuse_norm_linears
    from torch.utils._pytree import tree_leaves

    mappings, source = _llm_compressor_mapping(model)
    fused = 0
    with torch.no_grad():
        for mapping in mappings:
            for norm, *linears in match_modules_set(model, (mapping.norm, *mapping.linears)):
                fuse_norm_linears(norm[0], tree_leaves(linears))
                fused += 1
    return {"norms_folded": fused, "mapping": source}


RUNNERS = {"normsurgeon": _normsurgeon, "llm-compressor": _llm_compressor}


def _import(method: str) -> None:
    """Load the method's library, so an absent one is reported before any model is built."""
    if method == "llm-compressor":
        import llmcompressor.modeling.fuse  # noqa: F401
        from loguru import logger

        logger.remove()  # its INFO/WARNING lines ('No accelerator available!') on stderr


def _logits(model, inputs):
    import torch

    with torch.no_grad():
        return model(*inputs).logits


def measure(model_name: str, method: str, probe: str) -> dict[str, Any]:
    """One call of ``method`` on a freshly built ``model_name``: its seconds (probe "time") or peak extra resident
    bytes (probe "memory"), what it folded, and the logits' largest difference from the original's."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    _import(method)
    run = RUNNERS[method]
    run(*build("llama"))  # warm-up: the code paths are loaded before the call
    model, inputs = build(model_name)
    reference = _logits(model, inputs)
    size = {"params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    gc.collect()
    before = _rss_kib("VmRSS")
    if probe == "memory" and (not _reset_peak() or before is None):
        raise SystemExit("this kernel has no /proc/self/clear_refs: peak RSS cannot be measured")
    wall, cpu = time.perf_counter(), time.process_time()
    facts = run(model, inputs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _rss_kib("VmHWM")
    error = (_logits(model, inputs) - reference).abs().max().item()
    measured = {"peak_extra_bytes": (peak - before) * 1024} if probe == "memory" else {"wall_s": wall, "cpu_s": cpu}
    return {"model": model_name, "method": method, "probe": probe, "logits_max_abs_error": error, **facts, **measured,
            **size}


# --------------------------------------------------------------------------- in the parent


def _run_worker(job: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.llm_norm_surgery", "--worker", json.dumps(job)]
    done = subprocess.run(command, cwd=_ROOT, env=_worker_env(job["probe"]), capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{job}: worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def available(method: str) -> str | None:
    """None when ``method`` can run here, else why not (llm-compressor is optional: see benchmarks/README.md)."""
    if method != "llm-compressor":
        return None
    probe = "import normsurgeon, llmcompressor.modeling.fuse"  # normsurgeon first, as in the workers
    done = subprocess.run([sys.executable, "-c", probe], cwd=_ROOT, capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else f"cannot be imported ({done.stderr.strip().splitlines()[-1]})"


def run(models: tuple[str, ...], methods: tuple[str, ...], reps: int) -> list[dict[str, Any]]:
    """One summary row per model and method: medians over ``reps`` fresh processes per probe, methods interleaved."""
    summaries = []
    for model in models:
        results: dict[str, dict[str, list[dict]]] = {m: {"time": [], "memory": []} for m in methods}
        for _ in range(reps):
            for method in methods:
                for probe in ("time", "memory"):
                    results[method][probe].append(_run_worker({"model": model, "method": method, "probe": probe}))
        for method in methods:
            summaries.append(_summary(results[method]))
            print(_describe(summaries[-1]), flush=True)
    return summaries


def _summary(results: dict[str, list[dict]]) -> dict[str, Any]:
    """One method on one model: the first run's facts, the medians, and every run's numbers."""
    every = results["time"] + results["memory"]
    row = {key: value for key, value in results["memory"][0].items() if key not in ("probe", "peak_extra_bytes")}
    row["logits_max_abs_error"] = max(r["logits_max_abs_error"] for r in every)
    if "check_passed" in row:
        row["check_passed"] = all(r["check_passed"] for r in every)
    for key, probe in (("wall_s", "time"), ("cpu_s", "time"), ("peak_extra_bytes", "memory")):
        row[f"{key}_all"] = [r[key] for r in results[probe]]
        row[key] = statistics.median(row[f"{key}_all"])
    return row


def _describe(row: dict[str, Any]) -> str:
    return (f"{row['model']} {row['method']}: {row['norms_folded']} norms, {row['wall_s']:.3f} s wall, "
            f"{row['cpu_s']:.3f} s CPU, +{row['peak_extra_bytes'] / 2**20:.1f} MiB, "
            f"logits error {row['logits_max_abs_error']:.1e}")


# A pair "a / b" is normsurgeon's / llm-compressor's.
COLUMNS = ("model", "params", "norms folded", "CPU s", "ns ÷ llmc CPU", "wall s", "ns ÷ llmc wall", "extra MiB",
           "ns ÷ llmc memory", "logits max abs error", "ns check", "llmc mapping")
_PAIRS = {"norms folded": "norms", "CPU s": "cpu", "wall s": "wall", "extra MiB": "mib", "logits max abs error": "error"}
_RATIOS = {"ns ÷ llmc CPU": "cpu_s", "ns ÷ llmc wall": "wall_s", "ns ÷ llmc memory": "peak_extra_bytes"}


def table_rows(rows: list[dict[str, Any]], missing: dict[str, str]) -> list[dict[str, object]]:
    """The printed table's rows: one per model, the two methods side by side (n/a where one is not installed)."""
    by = {(r["model"], r["method"]): r for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ns, llmc = (by.get((model, m)) for m in METHODS)
        cells = [_side(row, "n/a" if m in missing else "not run") for m, row in zip(METHODS, (ns, llmc))]
        params = next(r for r in (ns, llmc) if r)["params"]
        line: dict[str, object] = {"model": model, "params": f"{params / 1e6:.3g} M"}
        line.update({column: f"{cells[0][key]} / {cells[1][key]}" for column, key in _PAIRS.items()})
        line.update({column: _ratio(ns, llmc, key) for column, key in _RATIOS.items()})
        out.append({**line, "ns check": cells[0]["check"], "llmc mapping": cells[1]["mapping"]})
    return out


def _ratio(ns: dict[str, Any] | None, llmc: dict[str, Any] | None, key: str) -> str:
    """ns's ``key`` over llm-compressor's, or "–" (one did not run, or llm-compressor's is 0)."""
    return f"{ns[key] / llmc[key]:.2f}" if ns and llmc and llmc[key] > 0 else "–"


def _side(row: dict[str, Any] | None, why: str) -> dict[str, str]:
    """One method's cells of a table row, or ``why`` in each where it did not run."""
    if row is None:
        return dict.fromkeys(("norms", "cpu", "wall", "mib", "error", "check", "mapping"), why)
    check = row.get("check_passed")
    return {"norms": str(row["norms_folded"]), "cpu": f"{row['cpu_s']:.3f}", "wall": f"{row['wall_s']:.3f}",
            "mib": f"{row['peak_extra_bytes'] / 2**20:.1f}", "error": f"{row['logits_max_abs_error']:.1e}",
            "check": "–" if check is None else f"{'passed' if check else 'FAILED'} ({row['check_max_abs_diff']:.1e})",
            "mapping": row.get("mapping", "–")}


def goal(rows: list[dict[str, Any]]) -> str | None:
    """The in-memory goal on the 0.17 B Llama: no slower than llm-compressor (median CPU time: on a shared machine
    wall time also counts waits for a core) and within 1.5x its extra memory, with normsurgeon's check included
    and passing; None when either was not measured."""
    by = {r["method"]: r for r in rows if r["model"] == "llama-0.17b"}
    if set(by) != set(METHODS):
        return None
    ns, llmc = by["normsurgeon"], by["llm-compressor"]
    cpu, wall = ns["cpu_s"] / llmc["cpu_s"], ns["wall_s"] / llmc["wall_s"]
    memory = ns["peak_extra_bytes"] / llmc["peak_extra_bytes"]
    met = cpu <= 1.0 and memory <= 1.5 and ns["check_passed"]
    return (f"in-memory goal ({'met' if met else 'NOT met'}): llama-0.17b fold --affine takes {cpu:.2f}x "
            f"llm-compressor's CPU time (<= 1; wall {wall:.2f}x) and {memory:.2f}x its extra memory (<= 1.5), "
            f"check {'passed' if ns['check_passed'] else 'failed'}")


def _environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from benchmarks.timing import environment

    env = environment(1)
    for name in ("llmcompressor", "compressed-tensors"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per model, method and probe (median)")
    parser.add_argument("--quick", action="store_true", help="the tiny Llama, one rep (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(measure(job["model"], job["method"], job["probe"])))
        return
    models, reps = (("llama",), 1) if args.quick else (tuple(args.models), args.reps)
    missing = {m: why for m in args.methods if (why := available(m)) is not None}
    for method, why in missing.items():
        print(f"{method} {why}: its columns read n/a", flush=True)
    start = time.perf_counter()
    rows = run(models, tuple(m for m in args.methods if m not in missing), reps)
    seconds = time.perf_counter() - start
    printed = table(table_rows(rows, missing), COLUMNS)
    verdict = goal(rows)
    print(printed + ("\n\n" + verdict if verdict else ""))
    command = "python -m benchmarks.llm_norm_surgery " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "seconds": round(seconds, 1), "reps": reps,
                                    "seq_len": SEQ_LEN, "environment": _environment(), "missing": missing,
                                    "goal": verdict, "rows": rows, "table": printed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
