"""onnxruntime CPU latency of the ONNX files a user can make today, and of normsurgeon's.

For each model and batch size (static shapes), these files are made and run in onnxruntime
CPU, timed interleaved, as a ratio to the norm-free limit:

* ``torch_plain_noopt`` — ``torch.onnx.export(dynamo=True, optimize=False)``, ORT optimizations off;
* ``torch_plain`` — the same file with ``ORT_ENABLE_ALL``;
* ``torch_default`` — ``torch.onnx.export(dynamo=True)`` with its default onnxscript optimizer;
* ``onnxoptimizer`` — onnxoptimizer's fuse-and-elimination passes (they include
  ``fuse_bn_into_conv``) on the plain file, when onnxoptimizer is installed;
* ``onnxslim`` — ``onnxslim.slim`` on the plain file, when onnxslim is installed;
* ``ns_export`` — ``normsurgeon.onnx.export.export_onnx`` (fold, export, verify);
* ``ns_optimize`` — ``normsurgeon.onnx.optimize.optimize_onnx`` on the plain file;
* ``limit_bias`` — the limit with a bias in each layer a BN was folded into that had none
  (the floor of any fold, see :mod:`benchmarks.eager`), exported the same way;
* ``limit_again`` — the limit's file again, in sessions of its own: an A/A control (the resolution);
* ``limit`` — the norm-free limit exported with torch's defaults, the baseline.

All but the first run with ``ORT_ENABLE_ALL``. Each file's calls rotate over
``SESSIONS_PER_FILE`` sessions of it, which averages out the differences between sessions. Op
counts are taken from the file and from the graph onnxruntime really runs
(``optimized_model_filepath``): an unfoldable BatchNormalization there shows up as an extra
(NCHWc depthwise) Conv, not as a BatchNormalization. That graph's :func:`graph_signature` tells
when two files make onnxruntime run the very same program, where a timing difference is noise.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.subjects import Subject, flat_outputs, norm_free_limit, with_biases
from benchmarks.timing import interleaved
from normsurgeon import fold_batchnorm
from normsurgeon.onnx.export import export_onnx, quiet
from normsurgeon.onnx.optimize import optimize_onnx

VARIANTS = (
    "torch_plain_noopt", "torch_plain", "torch_default", "onnxoptimizer", "onnxslim",
    "ns_export", "ns_optimize", "limit_bias", "limit_again", "limit",
)
CONV_OPS = ("Conv", "FusedConv", "ConvTranspose")
# Two sessions of one file differ by up to ~3% (the A/A control): each candidate's calls rotate over
# several sessions, so no candidate's number rests on one session's luck.
SESSIONS_PER_FILE = 3


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """BatchNormalization, Conv-like (any domain, NCHWc included) and total node counts."""
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return {
        "BatchNormalization": counts["BatchNormalization"],
        "Conv": sum(counts[op] for op in CONV_OPS),
        "nodes": len(model.graph.node),
    }


def graph_signature(model: onnx.ModelProto) -> str:
    """A digest of the program a graph describes, without names or weight values.

    Each node: op type, domain, attributes (tensor attributes by shape), and where each input
    comes from (a graph input, a constant of some shape, or output k of an earlier node). Two
    graphs with the same digest run the same kernels on the same shapes in the same order.
    """
    sources: dict[str, object] = {value.name: ("input", k) for k, value in enumerate(model.graph.input)}
    sources.update({tensor.name: ("constant", tuple(tensor.dims)) for tensor in model.graph.initializer})
    digest = hashlib.sha256()
    for index, node in enumerate(model.graph.node):
        attributes = sorted((a.name, _attribute_text(a)) for a in node.attribute)
        inputs = [sources.get(name, name) if name else None for name in node.input]
        digest.update(repr((node.op_type, node.domain, attributes, inputs)).encode())
        sources.update({name: ("node", index, k) for k, name in enumerate(node.output)})
    return digest.hexdigest()[:16]


def _attribute_text(attribute: onnx.AttributeProto) -> str:
    if attribute.type == onnx.AttributeProto.TENSOR:
        return f"tensor{tuple(attribute.t.dims)}"
    return str(onnx.helper.get_attribute_value(attribute))


def session(path: Path, threads: int, *, optimize: bool, save_to: Path | None = None) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads, one inter-op thread, sequential execution."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_export(model: torch.nn.Module, inputs: tuple, path: Path, *, optimize: bool) -> None:
    with quiet():
        program = torch.onnx.export(model, inputs, dynamo=True, optimize=optimize)
        program.save(str(path))


def _timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``fn``; return its result and the wall and process-CPU seconds it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def make_files(
    subject: Subject, model, limit, limit_bias, inputs: tuple, folder: Path, *, export_reps: int = 1
) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """Write every variant's .onnx (or the reason it could not be made); and the exports' seconds.

    ``torch.onnx.export`` (defaults) and ``export_onnx`` run ``export_reps`` times each,
    alternating, so their times can be compared as medians; the other steps run once.
    """
    files: dict[str, Any] = {}
    seconds: dict[str, dict[str, list[float]]] = {}

    def record(name: str, fn: Callable[[], Any]) -> Any:
        result, taken = _timed(fn)
        for clock, value in taken.items():
            seconds.setdefault(name, {}).setdefault(clock, []).append(value)
        return result

    plain = folder / "torch_plain.onnx"
    record("torch_plain", lambda: _torch_export(model, inputs, plain, optimize=False))
    files["torch_plain_noopt"] = files["torch_plain"] = plain
    default, ns = folder / "torch_default.onnx", folder / "ns_export.onnx"
    for _ in range(export_reps):
        record("torch_default", lambda: _torch_export(model, inputs, default, optimize=True))
        with quiet():
            report = record("ns_export", lambda: export_onnx(model, inputs, ns, force=True))
    files["torch_default"] = default
    files["ns_export"] = ns if report.passed else f"export_onnx check failed: {report.check}"
    ns_opt = folder / "ns_optimize.onnx"
    try:
        with quiet():
            record("ns_optimize", lambda: optimize_onnx(plain, ns_opt, force=True))
        files["ns_optimize"] = ns_opt
    except Exception as exc:  # noqa: BLE001 - a failure is a result: record it, keep measuring the rest
        files["ns_optimize"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    files["onnxoptimizer"] = _peer_onnxoptimizer(plain, folder / "onnxoptimizer.onnx")
    files["onnxslim"] = _peer_onnxslim(plain, folder / "onnxslim.onnx")
    limit_path = folder / "limit.onnx"
    _torch_export(limit, inputs, limit_path, optimize=True)
    files["limit"] = files["limit_again"] = limit_path
    limit_bias_path = folder / "limit_bias.onnx"
    _torch_export(limit_bias, inputs, limit_bias_path, optimize=True)
    files["limit_bias"] = limit_bias_path
    return files, seconds


def _warm_up_exporter() -> None:
    """Export a tiny model once, so the first measured export does not pay for imports and caches."""
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    inputs = (torch.randn(1, 3, 8, 8),)
    with tempfile.TemporaryDirectory(prefix="nsbench-") as tmp:
        _torch_export(tiny, inputs, Path(tmp) / "a.onnx", optimize=True)
        _torch_export(tiny, inputs, Path(tmp) / "b.onnx", optimize=False)
        with quiet():
            export_onnx(tiny, inputs, Path(tmp) / "c.onnx", force=True)


def _peer_onnxoptimizer(plain: Path, out: Path) -> Path | str:
    try:
        import onnxoptimizer
    except ImportError:
        return "not installed (pip install onnxoptimizer)"
    try:
        with quiet():
            optimized = onnxoptimizer.optimize(onnx.load(plain), onnxoptimizer.get_fuse_and_elimination_passes())
        onnx.save(optimized, out)
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result: record it
        return f"fails: {type(exc).__name__}: {str(exc)[:160]}"
    return out


def _peer_onnxslim(plain: Path, out: Path) -> Path | str:
    try:
        import onnxslim
    except ImportError:
        return "not installed (pip install onnxslim)"
    try:
        with quiet():
            slimmed = onnxslim.slim(onnx.load(plain))
        onnx.save(slimmed, out)
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result: record it
        return f"fails: {type(exc).__name__}: {str(exc)[:160]}"
    return out


def run_onnx(
    subjects: list[Subject], *, batches: tuple[int, ...], rounds: int, min_block_s: float, threads: int,
    warm_up: bool = True, export_reps: int = 1,
) -> list[dict]:
    """One row per (model, batch): each variant's ratio to the limit, op counts and correctness.

    ``warm_up`` exports a tiny model first, so the export times do not include first-call costs;
    at the first batch size the two exports are timed ``export_reps`` times each.
    """
    rows = []
    if warm_up:
        _warm_up_exporter()
    for subject in subjects:
        model = subject.build().eval()
        folded = copy.deepcopy(model)
        report = fold_batchnorm(folded, subject.inputs(2))
        limit = norm_free_limit(model, [c.module for c in report.changed("folded")])
        limit_bias = with_biases(limit, [c.into for c in report.changed("folded") if c.into])
        for batch in batches:
            inputs = subject.inputs(batch)
            with torch.no_grad():
                expected = [t.numpy() for t in flat_outputs(model(*inputs))]
            with tempfile.TemporaryDirectory(prefix="nsbench-") as tmp:
                reps = export_reps if batch == batches[0] else 1
                files, export_seconds = make_files(
                    subject, model, limit, limit_bias, inputs, Path(tmp), export_reps=reps
                )
                row = _measure(files, inputs, expected, Path(tmp), rounds, min_block_s, threads)
            row.update(model=subject.name, source=subject.source, batch=batch, export_seconds=export_seconds)
            rows.append(row)
            print(f"  onnx {subject.name} b{batch}: " + ", ".join(
                f"{n} {v['ratio']:.3f}" if "ratio" in v else f"{n} -" for n, v in row["variants"].items()
            ), flush=True)
    return rows


def _measure(files, inputs, expected, folder: Path, rounds: int, min_block_s: float, threads: int) -> dict:
    variants: dict[str, dict[str, Any]] = {}
    candidates = {}
    for name in VARIANTS:
        target = files.get(name)
        if not isinstance(target, Path):
            variants[name] = {"status": target or "not made"}
            continue
        enabled = name != "torch_plain_noopt"
        seen = folder / f"{name}.ort.onnx"
        try:
            session(target, threads, optimize=enabled, save_to=seen)  # what ORT really runs
            sessions = [session(target, threads, optimize=enabled) for _ in range(SESSIONS_PER_FILE)]
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            variants[name] = {"status": f"onnxruntime cannot load it: {str(exc)[:160]}"}
            continue
        feeds = {i.name: x.numpy() for i, x in zip(sessions[0].get_inputs(), inputs)}
        got = sessions[0].run(None, feeds)
        diff = max(
            float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-12)) for g, e in zip(got, expected, strict=True)
        )
        variants[name] = {
            "status": "ok",
            "max_rel_diff": diff,
            "file_ops": op_counts(onnx.load(target)),
            "ort_ops": op_counts(onnx.load(seen)),
            "ort_graph": graph_signature(onnx.load(seen)),
        }
        if name.startswith("limit"):
            variants[name]["max_rel_diff"] = None  # computes something else by construction
        rotation = itertools.cycle(sessions)
        candidates[name] = (lambda r=rotation, f=feeds: next(r).run(None, f))
    timings = interleaved(candidates, baseline="limit", rounds=rounds, min_block_s=min_block_s)
    for name, timing in timings.items():
        variants[name].update(timing.to_dict())
    return {"variants": variants}
