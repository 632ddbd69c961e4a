"""Transformer ONNX: normsurgeon's export (and ``optimize --target ort``) against optimum's (issue 18).

For small random-weight ``transformers`` models (BERT, GPT-2, Llama, Qwen2: hidden 256, 4 layers, vocab 8000),
saved with ``save_pretrained`` to a temporary folder, ONNX files with symbolic batch and sequence, no KV cache:

* ``ns`` -- ``normsurgeon export DIR --dynamic`` (opset 23, its default; verified in onnxruntime);
* ``ns+ort`` -- that file through ``normsurgeon optimize --target ort`` (onnxruntime's fused norm ops);
* ``ns+ort-cpu`` -- that file through ``normsurgeon optimize --target ort-cpu`` (the same without Skip ops, and
  residual Adds shielded from onnxruntime's own session-time Skip fusion);
* ``ns+trf`` -- that file through onnxruntime's transformer optimizer, as a user who runs it would; where the
  optimizer fails the failure is recorded and the row left out;
* ``optimum`` -- optimum's own ``main_export(DIR, OUT, task=feature-extraction|text-generation)`` (opset 18,
  validation on), run by the python of a separate virtual environment (``benchmarks/optimum_env.sh``: optimum-onnx
  0.1.0 needs transformers < 4.58) given by ``--optimum-python``, ``NS_OPTIMUM_PYTHON`` or found at
  /tmp/optimum-env/bin/python. Without it, the stand-in ``torch.onnx.export(dynamo=True, opset_version=18)`` with
  the same dynamic axes, labelled ``torch18`` (and the table says so);
* ``optimum+trf`` / ``torch18+trf`` -- that file through onnxruntime's transformer optimizer.

The transformer optimizer runs with the settings of optimum's ``optimum-cli onnxruntime optimize -O2``
(``AutoOptimizationConfig.O2``: opt_level 2, transformer fusions on, EmbedLayerNormalization fusion off, CPU;
``-O1`` runs no transformer fusion at all, ``-O3`` approximates Gelu, ``-O4`` is fp16), model type as optimum's
ORTConfigManager maps it (``bert``; ``gpt2`` for GPT-2, Llama and Qwen2). It is called here rather than through
optimum's ORTOptimizer so that the same call optimizes every file (ORTOptimizer also refuses Qwen2).

Export wall time and peak RSS come from a fresh process per export (``ru_maxrss`` through ``os.wait4``). *Extra*
memory is measured inside that process: the kernel's peak-RSS mark is reset once the model is loaded, and extra is
the peak after that minus the RSS then (``benchmarks/transformer_onnx_export.py``); "beyond load" seconds start at
the same moment. Max abs error is each file's first output in onnxruntime against torch on the same token ids.
Latency: onnxruntime CPU, 1 intra-op thread, batch 1, sequence 32 and 128, CPU time per call, in interleaved
rounds (every file once per round, shuffled); each file's ratio to the fastest reference is taken round by
round, and the table gives its median and interquartile range, so a 2% gap can be told from noise::

    python -m benchmarks.transformer_onnx            # ~10 min on 2 cores
    python -m benchmarks.transformer_onnx --quick    # a tiny Llama, sequence 32 (smoke)
    bash benchmarks/optimum_env.sh                   # once: optimum in /tmp/optimum-env
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import io
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

_ROOT = Path(__file__).resolve().parent.parent
NS_TARGETS = ("ort", "ort-cpu")  # normsurgeon optimize --target, each a variant "ns+TARGET"
RESULTS = _ROOT / "benchmarks" / "results" / "transformer_onnx.json"
EXPORT_WORKER = _ROOT / "benchmarks" / "transformer_onnx_export.py"
DEFAULT_OPTIMUM_PYTHON = Path("/tmp/optimum-env/bin/python")

MODELS = ("bert", "gpt2", "llama", "qwen2")
SEQ_LENS = (32, 128)
SIZE = {"hidden": 256, "layers": 4, "heads": 4, "vocab": 8000}
QUICK_SIZE = {"hidden": 64, "layers": 2, "heads": 4, "vocab": 1000}
# Ops worth counting: the fused kernels onnxruntime has for transformers, and the matmuls.
FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding", "RMSNormalization",
             "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "FusedMatMul", "MatMul", "Gemm", "Softmax")
FAILURES: list[str] = []
TRF_MODEL_TYPE = {"bert": "bert", "gpt2": "gpt2", "llama": "gpt2", "qwen2": "gpt2"}  # optimum's ORTConfigManager
TRF_OPT_LEVEL = 2  # optimum's AutoOptimizationConfig.O2


# --------------------------------------------------------------------------- models


def build(name: str, size: dict[str, int]):
    """The named model with random weights (seed 0), eval mode, no cache."""
    import torch

    import normsurgeon  # noqa: F401  (before transformers: it declares torchvision operators the CPU torch lacks)
    import transformers as T

    h, n, heads, vocab = size["hidden"], size["layers"], size["heads"], size["vocab"]
    torch.manual_seed(0)
    if name == "bert":
        config = T.BertConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                              intermediate_size=4 * h, vocab_size=vocab, max_position_embeddings=512)
        return T.BertModel(config).eval()
    if name == "gpt2":
        config = T.GPT2Config(n_embd=h, n_layer=n, n_head=heads, vocab_size=vocab, n_positions=512, use_cache=False)
        return T.GPT2LMHeadModel(config).eval()
    family = {"llama": (T.LlamaConfig, T.LlamaForCausalLM, heads), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, 2)}
    config_cls, model_cls, kv_heads = family[name]
    config = config_cls(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        intermediate_size=int(2.6875 * h), vocab_size=vocab, max_position_embeddings=512,
                        use_cache=False)
    return model_cls(config).eval()


# --------------------------------------------------------------------------- optimum's environment


def optimum_python(given: str | None) -> Path | None:
    """The python of optimum's environment: ``--optimum-python``, else $NS_OPTIMUM_PYTHON, else the default venv's."""
    chosen = given or os.environ.get("NS_OPTIMUM_PYTHON")
    if chosen:
        return Path(chosen)
    return DEFAULT_OPTIMUM_PYTHON if DEFAULT_OPTIMUM_PYTHON.exists() else None


def optimum_missing(python: Path | None) -> str | None:
    """None when optimum's ONNX exporter imports in ``python``, else why it cannot run."""
    if python is None:
        return (f"no optimum environment: {DEFAULT_OPTIMUM_PYTHON} does not exist and neither --optimum-python nor "
                "NS_OPTIMUM_PYTHON is set (bash benchmarks/optimum_env.sh makes it)")
    if not python.exists():
        return f"{python} does not exist (bash benchmarks/optimum_env.sh makes the optimum environment)"
    probe = "from optimum.exporters.onnx import main_export"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else f"{python}: " + (done.stderr.strip().splitlines() or ["?"])[-1]


def optimum_versions(python: Path) -> dict[str, str]:
    """The versions that matter in optimum's environment, for the results file."""
    script = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
              "('optimum', 'optimum-onnx', 'transformers', 'torch', 'onnx', 'onnxruntime')}))")
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


# --------------------------------------------------------------------------- exports (fresh processes)


def run_export(variant: str, folder: Path, out: Path, python: Path) -> dict[str, float]:
    """Export in a fresh process of ``python``: wall and CPU seconds, peak RSS (``os.wait4``), and, from the worker,
    the RSS once the model was loaded, what the export needed beyond it, and the seconds after the load."""
    stats_file = out.parent / f"{out.name}.stats.json"
    job = json.dumps({"variant": variant, "folder": str(folder), "out": str(out), "stats": str(stats_file)})
    start_wall, start = time.time(), time.perf_counter()
    process = subprocess.Popen([str(python), str(EXPORT_WORKER), job], cwd=_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall, end_wall = time.perf_counter() - start, time.time()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{variant} export of {folder.name} failed ({process.returncode}): {output[-2000:]}")
    stats = json.loads(stats_file.read_text())
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "loaded_rss_bytes": stats["loaded_rss_bytes"],
            "extra_rss_bytes": stats["peak_after_load_bytes"] - stats["loaded_rss_bytes"],
            "extra_wall_s": end_wall - stats["loaded_at"], "load_wall_s": stats["loaded_at"] - start_wall}


def ns_optimize(source: Path, out: Path, target: str) -> dict[str, float]:
    """``normsurgeon optimize --target TARGET`` on ``source``; its wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "normsurgeon", "optimize", str(source), "--target", target,
                           "--input-shape", "1,32", "-o", str(out), "--force"],
                          cwd=_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"normsurgeon optimize failed: {(done.stdout + done.stderr)[-2000:]}")
    return {"wall_s": time.perf_counter() - start}


def trf_optimize(source: Path, out: Path, name: str, folder: Path) -> dict[str, Any]:
    """onnxruntime's transformer optimizer on ``source`` with optimum's -O2 settings (see the module docstring).

    Returns its wall seconds, the nodes it added and removed per op type, and what it printed or logged (a failed
    symbolic shape inference, a skipped fusion); raises what the optimizer raises, or when onnxruntime cannot load
    its file."""
    import onnxruntime.transformers.optimizer as trf
    from onnxruntime.transformers.fusion_options import FusionOptions

    config = json.loads((folder / "config.json").read_text())
    heads = config.get("num_attention_heads", config.get("n_head"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    options = FusionOptions(TRF_MODEL_TYPE[name])
    options.enable_embed_layer_norm = False  # O2 keeps OptimizationConfig's disable_embed_layer_norm_fusion=True
    start = time.perf_counter()
    with _captured() as said:
        model = trf.optimize_model(str(source), model_type=TRF_MODEL_TYPE[name], num_heads=heads,
                                   hidden_size=hidden, opt_level=TRF_OPT_LEVEL, optimization_options=options,
                                   use_gpu=False)
        model.save_model_to_file(str(out))
    seconds = time.perf_counter() - start
    _session(out)  # a file onnxruntime cannot load is a failure of the optimizer too
    return {"wall_s": seconds, "trf_changed": op_change(source, out), "trf_said": said}


def op_change(before: Path, after: Path) -> dict[str, int]:
    """How many nodes of each op type a step added (positive) or removed (negative)."""
    import onnx

    counts = [collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
              for path in (before, after)]
    change = {op: counts[1][op] - counts[0][op] for op in counts[0].keys() | counts[1].keys()}
    return dict(sorted(((op, n) for op, n in change.items() if n), key=lambda item: (-item[1], item[0])))


@contextlib.contextmanager
def _captured():
    """Collect the lines the transformer optimizer prints and its warnings, instead of showing them."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(f"{record.name}: {record.getMessage()}")
    root = logging.getLogger()
    root.addHandler(handler)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            yield said
    finally:
        root.removeHandler(handler)
        said[:0] = [line for line in stdout.getvalue().splitlines() if line.strip()]


def optimized_row(step: Callable[[], dict[str, Any]], label: str) -> dict[str, Any] | None:
    """Run an optimizing step; its failure is a result (recorded, printed, row left out), not a crash."""
    try:
        return step()
    except Exception as error:  # noqa: BLE001
        where = traceback.extract_tb(error.__traceback__)[-1]
        message = str(error).splitlines()[0] if str(error) else ""
        FAILURES.append(f"{label}: {type(error).__name__}: {message} "
                        f"(in {Path(where.filename).name}:{where.lineno} {where.name}: {where.line})")
        print(FAILURES[-1], flush=True)
        return None


def make_files(name: str, folder: Path, work: Path, reference: str,
               optimum: Path | None) -> tuple[dict[str, Path], dict[str, Any]]:
    """Every variant's file and what making it cost (``reference`` is "optimum" or "torch18")."""
    files = {"ns": work / "ns.onnx"}
    costs = {"ns": run_export("ns", folder, files["ns"], Path(sys.executable))}
    for target in NS_TARGETS:
        files[f"ns+{target}"] = work / f"ns_{target}.onnx"
        costs[f"ns+{target}"] = ns_optimize(files["ns"], files[f"ns+{target}"], target)
    out = work / reference
    costs[reference] = run_export(reference, folder, out, optimum if reference == "optimum" else Path(sys.executable))
    files[reference] = out / "model.onnx" if reference == "optimum" else out
    for source in ("ns", reference):
        variant = f"{source}+trf"
        target = work / f"{source}_trf.onnx"
        cost = optimized_row(lambda s=source, t=target: trf_optimize(files[s], t, name, folder),
                             f"{name} {variant}: onnxruntime's transformer optimizer failed")
        if cost is not None:
            files[variant], costs[variant] = target, cost
    return files, costs


def op_histogram(path: Path) -> dict[str, Any]:
    """Node count and the fused-op histogram of a file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(node.op_type for node in model.graph.node)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"nodes": len(model.graph.node), "opset": opset, "ops": {op: counts[op] for op in FUSED_OPS if counts[op]}}


# --------------------------------------------------------------------------- onnxruntime: error and latency


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session, ids) -> dict[str, Any]:
    """input_ids, and the mask / position / type ids an exporter added, for a batch-1 unpadded sequence."""
    import numpy as np

    values = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
              "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    return {i.name: values[i.name] for i in session.get_inputs()}


def timed_rounds(calls: dict[str, Callable[[], Any]], rounds: int, min_block_s: float) -> dict[str, list[float]]:
    """Per-call CPU seconds of every candidate in each of ``rounds`` rounds (one block each, shuffled order).

    A block is as many calls as make the first candidate take about ``min_block_s``, the same count for all;
    3 warm-up calls each first; the garbage collector off while timing."""
    for call in calls.values():
        for _ in range(3):
            call()
    first = next(iter(calls.values()))
    single = min(_block(first, 1) for _ in range(3))
    count = max(1, round(min_block_s / max(single, 1e-9)))
    names, order = list(calls), random.Random(0)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            order.shuffle(names)
            for name in names:
                samples[name].append(_block(calls[name], count))
    finally:
        gc.enable()
    return samples


def _block(call: Callable[[], Any], count: int) -> float:
    start = time.process_time()
    for _ in range(count):
        call()
    return (time.process_time() - start) / count


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles (linear interpolation)."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return q1, median, q3


def ratio_summary(samples: dict[str, list[float]], references: list[str]) -> dict[str, dict[str, Any]]:
    """Each candidate's median seconds and, round by round, its time over the fastest reference's (the reference
    with the lowest median): median and interquartile range of those ratios."""
    best = min(references, key=lambda v: statistics.median(samples[v]))
    out = {}
    for variant, times in samples.items():
        q1, median, q3 = quartiles([t / b for t, b in zip(times, samples[best])])
        out[variant] = {"latency_s": statistics.median(times), "best_reference": best,
                        "ratio_to_best": median, "ratio_q1": q1, "ratio_q3": q3}
    return out


def measure_runtime(model, files: dict[str, Path], seq_lens: tuple[int, ...], rounds: int,
                    min_block_s: float) -> dict[str, Any]:
    """Per sequence length: each file's max abs error against torch and its latency against the best reference."""
    import torch

    sessions = {variant: _session(path) for variant, path in files.items()}
    references = [v for v in files if not v.startswith("ns")]
    out: dict[str, Any] = {}
    for seq in seq_lens:
        ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            reference = model(ids)[0].numpy()
        feeds = {v: _feeds(s, ids.numpy()) for v, s in sessions.items()}
        errors = {v: float(abs(s.run(None, feeds[v])[0] - reference).max()) for v, s in sessions.items()}
        calls = {v: (lambda s=s, f=feeds[v]: s.run(None, f)) for v, s in sessions.items()}
        timing = ratio_summary(timed_rounds(calls, rounds, min_block_s), references)
        out[str(seq)] = {v: {"max_abs_error": errors[v], **timing[v], "rounds": rounds} for v in files}
    return out


# --------------------------------------------------------------------------- the run


def run(models: tuple[str, ...], size: dict[str, int], seq_lens: tuple[int, ...], rounds: int, min_block_s: float,
        reference: str, optimum: Path | None) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="transformer_onnx_") as tmp:
        for name in models:
            folder, work = Path(tmp) / name, Path(tmp) / f"{name}_files"
            work.mkdir()
            model = build(name, size)
            model.save_pretrained(folder)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            files, costs = make_files(name, folder, work, reference, optimum)
            runtime = measure_runtime(model, files, seq_lens, rounds, min_block_s)
            for variant, path in files.items():
                row = {"model": name, "variant": variant, "params": sum(p.numel() for p in model.parameters()),
                       "weight_bytes": weight_bytes, **op_histogram(path), **costs[variant],
                       "runtime": {seq: r[variant] for seq, r in runtime.items()}}
                rows.append(row)
                print(_describe(row), flush=True)
    return rows


def _describe(row: dict[str, Any]) -> str:
    latency = ", ".join(f"seq {s}: {r['latency_s'] * 1e3:.2f} ms, {_ratio(r)} (err {r['max_abs_error']:.1e})"
                        for s, r in row["runtime"].items())
    return f"{row['model']} {row['variant']}: {row['nodes']} nodes, {row['wall_s']:.2f} s, {latency}"


def _ratio(timing: dict[str, Any]) -> str:
    return f"{timing['ratio_to_best']:.2f} [{timing['ratio_q1']:.2f}–{timing['ratio_q3']:.2f}]"


def table(rows: list[dict[str, Any]], seq_lens: tuple[int, ...]) -> str:
    """A markdown table, one line per model and variant."""
    head = ["model", "variant", "opset", "nodes", "fused ops", "export s (beyond load)", "extra MiB (x weights)",
            "max abs err"]
    head += [f"ms @{s}" for s in seq_lens] + [f"÷ best ref @{s} median [IQR]" for s in seq_lens]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        extra = (f"{row['extra_rss_bytes'] / 2**20:.0f} ({row['extra_rss_bytes'] / row['weight_bytes']:.1f}x)"
                 if "extra_rss_bytes" in row else "–")
        ops = ", ".join(f"{op} {n}" for op, n in row["ops"].items() if op not in ("MatMul", "Gemm", "Softmax"))
        error = max(r["max_abs_error"] for r in row["runtime"].values())
        seconds = f"{row['wall_s']:.1f}" + (f" ({row['extra_wall_s']:.1f})" if "extra_wall_s" in row else "")
        cells = [row["model"], row["variant"], str(row["opset"]), str(row["nodes"]), ops or "–", seconds, extra,
                 f"{error:.1e}"]
        cells += [f"{row['runtime'][str(s)]['latency_s'] * 1e3:.2f}" for s in seq_lens]
        cells += [_ratio(row["runtime"][str(s)]) for s in seq_lens]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], seq_lens: tuple[int, ...]) -> list[str]:
    """The issue's benchmark goals, each met or not with the measured gap and its round-to-round spread."""
    verdicts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["variant"]: r for r in rows if r["model"] == model}
        reference = next(r for v, r in by.items() if not v.startswith("ns") and not v.endswith("+trf"))
        for variant in ("ns", *(f"ns+{target}" for target in NS_TARGETS)):
            timings = {s: by[variant]["runtime"][str(s)] for s in seq_lens}
            verdicts.append(f"latency ({latency_verdict(list(timings.values()))}): {model} {variant} "
                            + ", ".join(f"seq {s} {_ratio(t)}x {t['best_reference']}" for s, t in timings.items())
                            + " (median [IQR] of per-round ratios)")
        ns = by["ns"]
        memory = ns["extra_rss_bytes"] / ns["weight_bytes"]
        verdicts.append(f"memory ({'met' if memory <= 1 else 'NOT met'}): {model} export extra "
                        f"{ns['extra_rss_bytes'] / 2**20:.0f} MiB = {memory:.1f}x the weight bytes (<= 1); "
                        f"{reference['variant']} {reference['extra_rss_bytes'] / 2**20:.0f} MiB = "
                        f"{reference['extra_rss_bytes'] / reference['weight_bytes']:.1f}x")
        speed = ns["wall_s"] / reference["wall_s"]
        verdicts.append(f"export time ({'met' if speed <= 3 else 'NOT met'}): {model} {ns['wall_s']:.1f} s = "
                        f"{speed:.1f}x {reference['variant']}'s {reference['wall_s']:.1f} s (<= 3); beyond the load "
                        f"{ns['extra_wall_s']:.1f} s against {reference['extra_wall_s']:.1f} s")
    return verdicts


def latency_verdict(timings: list[dict[str, Any]]) -> str:
    """"met" when every median ratio is <= 1; "NOT met" when some ratio's whole interquartile range is above 1;
    otherwise "within noise": a median above 1 whose spread still reaches 1."""
    if all(t["ratio_to_best"] <= 1.0 for t in timings):
        return "met"
    return "NOT met" if any(t["ratio_q1"] > 1.0 for t in timings) else "within noise"


def trf_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the transformer optimizer changed in each file (nodes per op type) and what it complained about."""
    notes = []
    for row in rows:
        if row["variant"].endswith("+trf"):
            said = "; ".join(dict.fromkeys(row["trf_said"])) or "nothing"
            changed = ", ".join(f"{op} {n:+d}" for op, n in row["trf_changed"].items()) or "nothing"
            notes.append(f"{row['model']} {row['variant']}: the optimizer changed {changed}; it said: {said}")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=61, help="interleaved latency rounds (median and IQR)")
    parser.add_argument("--min-block-s", type=float, default=0.05, help="CPU seconds of one timed block")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, sequence 32, few rounds (smoke run)")
    parser.add_argument("--optimum-python", help="python of optimum's environment (default $NS_OPTIMUM_PYTHON, "
                        f"else {DEFAULT_OPTIMUM_PYTHON} if it exists; bash benchmarks/optimum_env.sh makes it)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON results file")
    args = parser.parse_args()
    models, size, seq_lens, rounds, block = ((("llama",), QUICK_SIZE, (32,), 7, 0.01) if args.quick
                                             else (tuple(args.models), SIZE, SEQ_LENS, args.rounds, args.min_block_s))
    python = optimum_python(args.optimum_python)
    missing = optimum_missing(python)
    reference = "optimum" if missing is None else "torch18"
    if missing:
        print(f"optimum cannot run ({missing}): torch.onnx.export(dynamo=True, opset 18) stands in", flush=True)
    start = time.perf_counter()
    rows = run(models, size, seq_lens, rounds, block, reference, None if missing else python)
    seconds = time.perf_counter() - start
    printed = table(rows, seq_lens)
    if missing:
        printed = (f"Reference: the STAND-IN torch18 (torch.onnx.export dynamo, opset 18), not optimum: {missing}"
                   f"\n\n{printed}")
    else:
        printed = f"Reference: optimum itself ({python})\n\n{printed}"
    verdicts, notes = goals(rows, seq_lens), trf_notes(rows)
    print(printed + "\n\n" + "\n".join(FAILURES + notes + verdicts))
    from benchmarks.timing import environment

    env = environment(1)
    env["optimum_environment"] = None if missing else {"python": str(python), **optimum_versions(python)}
    command = "python -m benchmarks.transformer_onnx " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "seconds": round(seconds, 1), "size": size,
                                    "seq_lens": seq_lens, "rounds": rounds, "min_block_s": block,
                                    "reference": reference, "optimum_missing": missing,
                                    "trf_settings": {"opt_level": TRF_OPT_LEVEL, "model_type": TRF_MODEL_TYPE,
                                                     "as": "optimum-cli onnxruntime optimize -O2"},
                                    "failures": FAILURES, "trf_notes": notes, "environment": env,
                                    "goals": verdicts, "rows": rows, "table": printed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
