"""onnxruntime's Skip norm kernels against the residual Add + norm they replace (why ``--target ort-cpu`` exists).

One file per pair, built with onnx.helper at opset 23 (same weights, same inputs): ``Add`` then
``LayerNormalization`` / ``RMSNormalization``, against ``com.microsoft`` ``SkipLayerNormalization`` /
``SkipSimplifiedLayerNormalization`` with the sum as a second output (the next residual reads it, as in
a transformer). onnxruntime CPU (and CUDA where present), one thread, CPU-time medians of interleaved
rounds (:func:`benchmarks.timing.interleaved`); the ratio is Skip op / Add + norm, so above 1 means the
fusion costs time.

    python -m benchmarks.skip_kernels            # hidden 512 and 1024, sequence 32 and 128
    python -m benchmarks.skip_kernels --quick    # one shape, few rounds (tests/benchmarks/test_skip_kernels.py)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .timing import environment, interleaved

EPSILON = 1e-5
NORMS = {"layernorm": ("LayerNormalization", "SkipLayerNormalization"),
         "rmsnorm": ("RMSNormalization", "SkipSimplifiedLayerNormalization")}


def pair_model(norm: str, hidden: int, *, fused: bool, seed: int = 0) -> onnx.ModelProto:
    """(x, skip) -> (norm(x + skip), x + skip), as two ops or as onnxruntime's one Skip op."""
    plain, skip_op = NORMS[norm]
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.uniform(0.5, 1.5, hidden).astype(np.float32), "gamma")]
    if norm == "layernorm":
        weights.append(numpy_helper.from_array(rng.uniform(-0.5, 0.5, hidden).astype(np.float32), "beta"))
    params = [w.name for w in weights]
    if fused:
        nodes = [helper.make_node(skip_op, ["x", "skip", *params], ["y", "", "", "sum"], domain="com.microsoft",
                                  epsilon=EPSILON)]
    else:
        nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
                 helper.make_node(plain, ["sum", *params], ["y"], axis=-1, epsilon=EPSILON)]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", hidden])
              for name in ("x", "skip")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "sum")]
    graph = helper.make_graph(nodes, f"{norm}_{'skip' if fused else 'add'}", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])


def measure(norm: str, hidden: int, sequence: int, provider: str, rounds: int) -> dict:
    """Skip op / Add + norm latency ratio for one shape, with the outputs' max difference."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {fused: ort.InferenceSession(pair_model(norm, hidden, fused=fused).SerializeToString(), options,
                                            providers=[provider]) for fused in (False, True)}
    rng = np.random.default_rng(1)
    feeds = {name: rng.standard_normal((1, sequence, hidden), dtype=np.float32) for name in ("x", "skip")}
    outputs = {fused: s.run(None, feeds) for fused, s in sessions.items()}
    timings = interleaved({"add+norm": lambda: sessions[False].run(None, feeds),
                           "skip": lambda: sessions[True].run(None, feeds)}, baseline="add+norm", rounds=rounds)
    return {"norm": norm, "hidden": hidden, "sequence": sequence, "provider": provider,
            "add_norm_us": timings["add+norm"].seconds * 1e6, "skip_us": timings["skip"].seconds * 1e6,
            "ratio": timings["skip"].ratio, "ratio_q1": timings["skip"].ratio_q1, "ratio_q3": timings["skip"].ratio_q3,
            "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(outputs[False], outputs[True]))}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, few rounds")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    shapes = [(512, 32)] if args.quick else [(h, s) for h in (512, 1024) for s in (32, 128)]
    providers = [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    rows = [measure(norm, hidden, sequence, provider, rounds=5 if args.quick else 41)
            for provider in providers for norm in NORMS for hidden, sequence in shapes]
    print("| provider | norm | hidden | sequence | Add + norm µs | Skip op µs | Skip ÷ Add + norm (IQR) | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['provider'].removesuffix('ExecutionProvider')} | {r['norm']} | {r['hidden']} | {r['sequence']} | "
              f"{r['add_norm_us']:.1f} | {r['skip_us']:.1f} | {r['ratio']:.2f} ({r['ratio_q1']:.2f}–{r['ratio_q3']:.2f}) "
              f"| {r['max_abs_diff']:.1e} |")
    if args.out:
        args.out.write_text(json.dumps({"environment": environment(1), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
