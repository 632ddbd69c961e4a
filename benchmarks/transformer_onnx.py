"""Transformer ONNX: normsurgeon's export (and ``optimize --target ort``) against optimum's (issue 18).

For small random-weight ``transformers`` models (BERT, GPT-2, Llama, Qwen2: hidden 256, 4 layers, vocab 8000),
saved with ``save_pretrained`` to a temporary folder, four ONNX files with symbolic batch and sequence, no KV cache:

* ``ns`` -- ``normsurgeon export DIR --dynamic`` (opset 23, its default; verified in onnxruntime);
* ``ns+ort`` -- that file through ``normsurgeon optimize --target ort`` (onnxruntime's fused norm ops);
* ``optimum`` -- ``optimum-cli export onnx --task feature-extraction|text-generation`` (opset 18); where optimum
  cannot run (optimum-onnx 0.1.0 needs transformers < 4.58: see benchmarks/README.md) the stand-in
  ``torch.onnx.export(dynamo=True, opset_version=18)`` with the same dynamic axes, labelled ``torch18``;
* ``optimum+trf`` / ``torch18+trf`` -- that file through ``onnxruntime.transformers.optimizer.optimize_model``
  (model_type ``bert`` for BERT, ``gpt2`` for the decoders, as optimum's ORTConfigManager maps them; opt_level 1,
  optimum's ``OptimizationConfig`` default; CPU).

Export wall time and peak RSS come from a fresh process per export (``ru_maxrss`` through ``os.wait4``); *extra*
is that peak minus the peak of a fresh process that only imports normsurgeon and transformers and loads the
model (the loaded model). Max abs error is each file's first output in onnxruntime against torch on the same
token ids. Latency: onnxruntime CPU, 1 intra-op thread, batch 1, sequence 32 and 128, CPU time, median over
interleaved rounds of the four files (``benchmarks.timing.interleaved``)::

    python -m benchmarks.transformer_onnx            # ~10 min on 2 cores
    python -m benchmarks.transformer_onnx --quick    # a tiny Llama, sequence 32 (smoke)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
RESULTS = _ROOT / "benchmarks" / "results" / "transformer_onnx.json"

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
TRF_MODEL_TYPE = {"bert": "bert", "gpt2": "gpt2", "llama": "gpt2", "qwen2": "gpt2"}


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


def _load(folder: Path):
    import normsurgeon  # noqa: F401
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    auto = transformers.AutoModel if config.model_type == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder).eval()


# --------------------------------------------------------------------------- export workers (fresh processes)


def _torch18(folder: str, out: str) -> None:
    """The stand-in for optimum's export: torch's dynamo exporter at optimum's opset, batch and sequence dynamic."""
    import torch

    from normsurgeon.onnx.export import quiet

    model = _load(Path(folder))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    with quiet(), torch.no_grad():
        torch.onnx.export(model, (ids,), dynamo=True, opset_version=18, dynamic_shapes=dims).save(out)


def _optimum(folder: str, out: str) -> None:
    import normsurgeon  # noqa: F401
    from optimum.exporters.onnx import main_export

    task = "feature-extraction" if "bert" in Path(folder).name else "text-generation"
    main_export(folder, out, task=task, no_post_process=False)


def _baseline(folder: str, out: str) -> None:
    """Only what every export holds anyway: the libraries and the loaded model."""
    _load(Path(folder))


WORKERS = {"torch18": _torch18, "optimum": _optimum, "baseline": _baseline}


def _command(variant: str, folder: Path, out: Path) -> list[str]:
    if variant == "ns":
        return [sys.executable, "-m", "normsurgeon", "export", str(folder), "--dynamic", "-o", str(out), "--force"]
    job = json.dumps({"variant": variant, "folder": str(folder), "out": str(out)})
    return [sys.executable, "-m", "benchmarks.transformer_onnx", "--worker", job]


def run_fresh(command: list[str]) -> dict[str, float]:
    """Run ``command`` in a fresh process: its wall seconds, CPU seconds and peak RSS (bytes)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command}: failed ({process.returncode}): {(stdout + stderr)[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024}


# --------------------------------------------------------------------------- files


def make_files(name: str, folder: Path, work: Path, reference: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """Every variant's file and the exports' costs (``reference`` is "optimum" or "torch18")."""
    import onnxruntime.transformers.optimizer as trf

    from normsurgeon.onnx.export import quiet

    files, costs = {}, {"baseline": run_fresh(_command("baseline", folder, work / "none"))}
    files["ns"] = work / "ns.onnx"
    costs["ns"] = run_fresh(_command("ns", folder, files["ns"]))
    files["ns+ort"] = work / "ns_ort.onnx"
    start = time.perf_counter()
    optimized = subprocess.run([sys.executable, "-m", "normsurgeon", "optimize", str(files["ns"]), "--target", "ort",
                                "--input-shape", "1,32", "-o", str(files["ns+ort"]), "--force"],
                               cwd=_ROOT, capture_output=True, text=True, check=False)
    if optimized.returncode != 0:
        raise RuntimeError(f"normsurgeon optimize failed: {(optimized.stdout + optimized.stderr)[-2000:]}")
    costs["ns+ort"] = {"wall_s": time.perf_counter() - start}
    out = work / reference
    costs[reference] = run_fresh(_command(reference, folder, out))
    files[reference] = out / "model.onnx" if reference == "optimum" else out
    config = json.loads((folder / "config.json").read_text())
    heads = config.get("num_attention_heads", config.get("n_head"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    start = time.perf_counter()
    try:
        with quiet():
            model = trf.optimize_model(str(files[reference]), model_type=TRF_MODEL_TYPE[name], num_heads=heads,
                                       hidden_size=hidden, opt_level=1, use_gpu=False)
            model.save_model_to_file(str(work / f"{reference}_trf.onnx"))
    except Exception as error:  # noqa: BLE001  (the optimizer's own failure is a result: recorded, row left out)
        FAILURES.append(f"{name} {reference}+trf: onnxruntime's transformer optimizer failed: {error!r}")
        print(FAILURES[-1], flush=True)
        return files, costs
    files[f"{reference}+trf"] = work / f"{reference}_trf.onnx"
    costs[f"{reference}+trf"] = {"wall_s": time.perf_counter() - start}
    return files, costs


def op_histogram(path: Path) -> dict[str, Any]:
    """Node count and the fused-op histogram of a file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(node.op_type for node in model.graph.node)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"nodes": len(model.graph.node), "opset": opset, "ops": {op: counts[op] for op in FUSED_OPS if counts[op]}}


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


def measure_runtime(model, files: dict[str, Path], seq_lens: tuple[int, ...], rounds: int) -> dict[str, Any]:
    """Per sequence length: each file's max abs error against torch and its median onnxruntime CPU seconds."""
    import torch

    from benchmarks.timing import interleaved

    sessions = {variant: _session(path) for variant, path in files.items()}
    out: dict[str, Any] = {}
    for seq in seq_lens:
        ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            reference = model(ids)[0].numpy()
        feeds = {v: _feeds(s, ids.numpy()) for v, s in sessions.items()}
        errors = {v: float(abs(s.run(None, feeds[v])[0] - reference).max()) for v, s in sessions.items()}
        calls = {v: (lambda s=s, f=feeds[v]: s.run(None, f)) for v, s in sessions.items()}
        timings = interleaved(calls, baseline="ns", rounds=rounds, min_block_s=0.02)
        out[str(seq)] = {v: {"max_abs_error": errors[v], "latency_s": timings[v].seconds,
                             "ratio_to_ns": timings[v].ratio} for v in files}
    return out


# --------------------------------------------------------------------------- the run


def optimum_available() -> str | None:
    """None when optimum's ONNX exporter imports here (after normsurgeon), else why not."""
    probe = "import normsurgeon; from optimum.exporters.onnx import main_export"
    done = subprocess.run([sys.executable, "-c", probe], cwd=_ROOT, capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]


def run(models: tuple[str, ...], size: dict[str, int], seq_lens: tuple[int, ...], rounds: int,
        reference: str) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="transformer_onnx_") as tmp:
        for name in models:
            folder, work = Path(tmp) / name, Path(tmp) / f"{name}_files"
            work.mkdir()
            model = build(name, size)
            model.save_pretrained(folder)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            files, costs = make_files(name, folder, work, reference)
            runtime = measure_runtime(model, files, seq_lens, rounds)
            base = costs.pop("baseline")
            for variant, path in files.items():
                row = {"model": name, "variant": variant, "params": sum(p.numel() for p in model.parameters()),
                       "weight_bytes": weight_bytes, **op_histogram(path), **costs[variant],
                       "runtime": {seq: r[variant] for seq, r in runtime.items()}}
                if "peak_rss_bytes" in row:
                    row["extra_rss_bytes"] = row["peak_rss_bytes"] - base["peak_rss_bytes"]
                    row["extra_wall_s"] = row["wall_s"] - base["wall_s"]
                rows.append(row)
                print(_describe(row), flush=True)
    return rows


def _describe(row: dict[str, Any]) -> str:
    latency = ", ".join(f"seq {s}: {r['latency_s'] * 1e3:.2f} ms (err {r['max_abs_error']:.1e})"
                        for s, r in row["runtime"].items())
    return f"{row['model']} {row['variant']}: {row['nodes']} nodes, {row['wall_s']:.2f} s, {latency}"


def table(rows: list[dict[str, Any]], seq_lens: tuple[int, ...]) -> str:
    """A markdown table, one line per model and variant."""
    head = ["model", "variant", "opset", "nodes", "fused ops", "export s (beyond load)", "extra MiB (x weights)",
            "max abs err"]
    head += [f"ms @{s}" for s in seq_lens] + [f"÷ best optimum @{s}" for s in seq_lens]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        best = {s: _best_reference(rows, row["model"], str(s)) for s in seq_lens}
        extra = (f"{row['extra_rss_bytes'] / 2**20:.0f} ({row['extra_rss_bytes'] / row['weight_bytes']:.1f}x)"
                 if "extra_rss_bytes" in row else "–")
        ops = ", ".join(f"{op} {n}" for op, n in row["ops"].items() if op not in ("MatMul", "Gemm", "Softmax"))
        error = max(r["max_abs_error"] for r in row["runtime"].values())
        seconds = f"{row['wall_s']:.1f}" + (f" ({row['extra_wall_s']:.1f})" if "extra_wall_s" in row else "")
        cells = [row["model"], row["variant"], str(row["opset"]), str(row["nodes"]), ops or "–", seconds, extra,
                 f"{error:.1e}"]
        cells += [f"{row['runtime'][str(s)]['latency_s'] * 1e3:.2f}" for s in seq_lens]
        cells += [f"{row['runtime'][str(s)]['latency_s'] / best[s]:.2f}" for s in seq_lens]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _references(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["model"] == model and not r["variant"].startswith("ns")]


def _best_reference(rows: list[dict[str, Any]], model: str, seq: str) -> float:
    return min(r["runtime"][seq]["latency_s"] for r in _references(rows, model))


def goals(rows: list[dict[str, Any]], seq_lens: tuple[int, ...]) -> list[str]:
    """The issue's benchmark goals, each met or not with the measured gap."""
    verdicts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["variant"]: r for r in rows if r["model"] == model}
        reference = next(r for r in _references(rows, model) if "+trf" not in r["variant"])
        for variant in ("ns", "ns+ort"):
            ratios = {s: by[variant]["runtime"][str(s)]["latency_s"] / _best_reference(rows, model, str(s))
                      for s in seq_lens}
            met = all(x <= 1.0 for x in ratios.values())
            verdicts.append(f"latency ({'met' if met else 'NOT met'}): {model} {variant} "
                            + ", ".join(f"seq {s} {x:.2f}x" for s, x in ratios.items()) + " of the best reference")
        ns = by["ns"]
        memory = ns["extra_rss_bytes"] / ns["weight_bytes"]
        verdicts.append(f"memory ({'met' if memory <= 1 else 'NOT met'}): {model} export extra "
                        f"{ns['extra_rss_bytes'] / 2**20:.0f} MiB = {memory:.1f}x the weight bytes (<= 1); "
                        f"{reference['variant']} {reference['extra_rss_bytes'] / 2**20:.0f} MiB")
        speed = ns["wall_s"] / reference["wall_s"]
        verdicts.append(f"export time ({'met' if speed <= 3 else 'NOT met'}): {model} {ns['wall_s']:.1f} s = "
                        f"{speed:.1f}x {reference['variant']}'s {reference['wall_s']:.1f} s (<= 3); beyond the load "
                        f"{ns['extra_wall_s']:.1f} s against {reference['extra_wall_s']:.1f} s")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=21, help="interleaved latency rounds (median)")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, sequence 32, few rounds (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        WORKERS[job["variant"]](job["folder"], job["out"])
        return
    models, size, seq_lens, rounds = ((("llama",), QUICK_SIZE, (32,), 3) if args.quick
                                      else (tuple(args.models), SIZE, SEQ_LENS, args.rounds))
    missing = optimum_available()
    reference = "optimum" if missing is None else "torch18"
    if missing:
        print(f"optimum cannot run ({missing}): torch.onnx.export(dynamo=True, opset 18) stands in", flush=True)
    start = time.perf_counter()
    rows = run(models, size, seq_lens, rounds, reference)
    seconds = time.perf_counter() - start
    printed, verdicts = table(rows, seq_lens), goals(rows, seq_lens)
    print(printed + "\n\n" + "\n".join(FAILURES + verdicts))
    from benchmarks.timing import environment

    env = environment(1)
    for package in ("optimum", "optimum-onnx"):
        try:
            from importlib.metadata import version

            env[package] = version(package)
        except Exception:  # noqa: BLE001  (PackageNotFoundError)
            env[package] = None
    command = "python -m benchmarks.transformer_onnx " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "seconds": round(seconds, 1), "size": size,
                                    "seq_lens": seq_lens, "rounds": rounds, "reference": reference,
                                    "optimum_missing": missing, "failures": FAILURES,
                                    "environment": env, "goals": verdicts,
                                    "rows": rows, "table": printed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
