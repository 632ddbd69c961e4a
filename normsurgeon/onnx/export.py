"""Export a model to ONNX (fold first), save it atomically, and prove it in onnxruntime.

Pipeline: pre-export passes run as one pipeline (weight norm and weight standardization baked,
summed conv+BN branches merged, BatchNorm folded; the list is
:func:`~normsurgeon.passes.registry.pre_export_passes`) on a deep copy — only when they have
something to change: otherwise (an LLM) the model itself is exported, in eval mode, and no copy is
made → ``torch.onnx.export(dynamo=True, optimize=True)`` → save to a temp file → the copy and the
exported program released → :func:`~normsurgeon.onnx.verify.verify_onnx` of that file against the
caller's *original* (unfolded) model (torch's reference first; onnxruntime then maps the file's weights in
place, from the temp file's hidden name beside the target, instead of holding a parsed copy) → rename over the
target. A failed export, save or onnxruntime
load leaves no output behind; a numerical mismatch keeps the file and fails the report.

Default opset, measured (torch 2.13, onnxscript 0.7.2, onnx 1.23, onnxruntime 1.32 CPU) on a
Conv→GroupNorm→LayerNorm→Linear→RMSNorm model and every model in ``models.REGISTRY``:

* opset 18-20: GroupNorm exports as Reshape+InstanceNormalization+Reshape, RMSNorm as a
  Pow/ReduceMean/Sqrt/Reciprocal chain; 21-22: native GroupNormalization, RMSNorm still a chain.
* opset 23: native LayerNormalization, GroupNormalization *and* RMSNormalization, and only at
  exactly 23 the exporter's onnxscript fusions also turn a hand-written (Llama/T5-style)
  RMSNorm into RMSNormalization (``onnxscript.rewriter.onnx_fusions`` fuses for opset 23 only).
* opset 24-25: ORT runs them and nn.RMSNorm stays native, but hand-written RMSNorms stay chains.
* opset 26-28: onnxscript's version converter stops at 25; torch falls back to onnx's C converter,
  which converts a Conv→GroupNorm model but fails on one with RMSNorm and leaves it declared
  opset 18 with opset-21+ nodes (ORT refuses to load it; :func:`_export` turns that into an
  ExportError). ORT itself runs hand-made opset-26..28 norm graphs: the exporter is the limit.

All of 18/23/25 matched torch within 1e-5 in ORT CPU for every reference model, so the
default is 23: the highest opset where ORT runs the export and every norm is a native op.
"""

from __future__ import annotations

import contextlib
import gc
import io
import linecache
import logging
import os
import re
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ExportError, LoadError
from ..inputs import ExampleInputs, InputsLike, PlainInputs
from ..io.saving import named_temp, write_atomically
from ..passes.registry import pre_export_passes
from ..pipeline import plan_only, run
from ..report import Report
from ..surgery import copy_model, eval_mode
from .dynamic_axes import (
    Axis,
    Dynamic,
    axis_sizes,
    describe_axes,
    export_dynamic_shapes,
    resolve_axes,
    runnable_axes,
    settle_axes,
    signature_order,
    verification_inputs,
    widened,
)
from .inline_save import save_inline
from .precision import add_float32_islands
from .optimize import Target, optimize_model
from .runtime import resolve_providers
from .verify import verify_onnx

DEFAULT_OPSET = 23
NORM_OPS = (
    "BatchNormalization", "LayerNormalization", "RMSNormalization",
    "GroupNormalization", "InstanceNormalization",
)
# Weights above this go to "<file>.data" beside the .onnx: protobuf cannot hold 2 GiB.
INLINE_WEIGHTS_LIMIT = 2**31 - 2**27


def export_onnx(
    model: nn.Module,
    example_inputs: InputsLike,
    path: str | Path,
    *,
    fold: bool = True,
    opset: int | None = None,
    dynamic: Dynamic | bool | Mapping[str, Mapping[int, str]] = False,
    dynamic_batch: bool = False,
    providers: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    protect: Sequence[Path] = (),
    verbose: bool = False,
    external_data: bool = False,
    target: str = "portable",
) -> Report:
    """Export ``model`` to ``path`` as ONNX and verify it in onnxruntime; ``model`` is not changed.

    ``example_inputs`` is a tuple of positional or a dict of keyword arguments (or
    :class:`~normsurgeon.inputs.ExampleInputs` of one kind). With ``fold``,
    BatchNorms are folded first (its check is labelled "folded vs original"). ``opset`` defaults
    to :data:`DEFAULT_OPSET`. ``dynamic`` makes input dims symbolic: True for the defaults per
    modality, ``{input: {dim: symbol}}`` for those axes, or a :class:`~normsurgeon.onnx.dynamic_axes.Dynamic`;
    ``dynamic_batch`` makes dim 0 of every tensor input ``batch``. The file is verified at two sizes
    along every dynamic axis. The weights go inline, or to ``<path>.data`` beside the file when they
    exceed protobuf's 2 GiB or ``external_data`` asks for it. ``target="ort"`` also fuses the norms into
    onnxruntime's own ops (:func:`~normsurgeon.onnx.optimize.optimize_model`) before the file is written. ``report.passed`` is False when
    onnxruntime's outputs differ from the original model's; a model that cannot be exported raises
    :class:`ExportError`.
    """
    path = Path(path)
    opset = DEFAULT_OPSET if opset is None else opset
    resolve_providers(providers)  # an unavailable provider fails before the slow work
    plain = signature_order(model, ExampleInputs.of(example_inputs).plain())  # the tuple or dict dynamic axes read
    inputs = ExampleInputs.of(plain)
    axes = resolve_axes(model, plain, _as_dynamic(dynamic, dynamic_batch))
    report = Report("export")
    if model.training:
        report.notes.append("the model was in training mode: exported and verified its eval-mode behaviour")
    with eval_mode(model):
        work = pre_export(model, inputs, fold, atol, rtol, report)
        axes = runnable_axes(work, plain, axes, report.notes)

        def write(tmp: Path) -> None:
            nonlocal work
            program, kept = _export(work, plain, opset, axes, verbose, report)
            tmp = finish_and_save(program.model, tmp, path, target=target, external_data=external_data, force=force,
                                  protect=protect, report=report)
            if not fold:
                _note_batchnorms_torch_folded(work, report)
            del program
            work = None  # the copy and the exported program go before onnxruntime loads the file
            gc.collect()
            tmp = named_temp(tmp)  # onnxruntime maps the weights in place from a file with a name in a directory
            with unloadable_as_export_error():
                verified = verify_onnx(
                    model, tmp, inputs, providers=providers, atol=atol, rtol=rtol,
                    extra_inputs=verification_inputs(plain, kept), axes=kept,
                )
            merge_reports(report, verified)
            report.facts["providers"] = verified.facts["providers"]
            report.facts["batch_sizes_verified"] = verified.facts["batch_sizes_verified"]
            if axes:
                report.facts["dynamic_axes"] = describe_axes(kept)
            if kept:  # every axis asked for may have been kept static (noted): then only the example's sizes ran
                report.facts["sizes_verified"] = verified.facts["sizes_verified"]

        write_with_data_cleanup(path, write, force=force, protect=protect)
    report.facts["file_bytes"] = path.stat().st_size
    return report


def pre_export(model: nn.Module, inputs: ExampleInputs, fold: bool, atol: float | None, rtol: float | None,
                report: Report) -> nn.Module:
    """The model to export: ``model`` itself when the pre-export passes have nothing to change (LLMs: no
    BatchNorm, no weight norm), else a copy they changed (and checked)."""
    unchanged = plan_only(pre_export_passes(fold=fold), model, inputs)
    if unchanged is not None:
        merge_reports(report, unchanged)
        return model
    work = copy_model(model).eval()
    merge_reports(report, run(pre_export_passes(fold=fold), work, inputs, atol=atol, rtol=rtol))
    return work


def finish_and_save(model: ir.Model, tmp: Path, target_path: Path, *, target: str, external_data: bool, force: bool,
                    protect: Sequence[Path], report: Report) -> Path:
    """The exported graph made ready and written: norms fused for ``target``, bfloat16 ops onnxruntime's CPU
    has no kernel for put in float32 islands, saved (:func:`save_exported`), described in the facts."""
    if target != Target.PORTABLE.value:
        fuse_for(Target(target), model, report)
    if note := add_float32_islands(model).note():
        report.notes.append(note)
    tmp = save_exported(model, tmp, target_path, force=force, protect=protect, report=report,
                        external_data=external_data)
    report.facts.update(describe_model(model))
    return tmp


def fuse_for(target: Target, model: ir.Model, report: Report) -> None:
    """The exported graph's norms fused into ``target``'s own ops (checked with the rest in onnxruntime)."""
    changes, skipped = optimize_model(model, target=target)
    report.changes.extend(changes)
    report.skipped.extend(skipped)
    report.facts["target"] = target.value


def _note_batchnorms_torch_folded(model: nn.Module, report: Report) -> None:
    """Under --no-fold, say when torch.onnx's own optimizer folded BatchNorms: the file has fewer than the model."""
    in_model = sum(isinstance(m, _BatchNorm) for m in model.modules())
    in_file = report.facts["op_histogram"].get("BatchNormalization", 0)
    if in_file < in_model:
        report.notes.append(
            f"normsurgeon folded no BatchNorm (--no-fold), but torch.onnx.export's optimizer fused {in_model - in_file} "
            f"of the model's {in_model} into the convs before them; the file has {in_file} BatchNormalization nodes"
        )


def op_histogram(model: ir.Model | onnx.ModelProto) -> dict[str, int]:
    """Node count per op type over the main graph, its subgraphs and the model's functions.

    Norm op types are always present (0 when absent), so "BatchNormalization: 0" is visible.
    Ops of a custom domain are keyed ``domain::OpType``.
    """
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    counts: Counter[str] = Counter({op: 0 for op in NORM_OPS})
    for graph_like in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
    return dict(sorted(counts.items()))


def describe_model(model: ir.Model) -> dict:
    """Facts about an exported graph: opset, op histogram, input shapes (symbolic dims by name)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    inputs = {
        value.name: [d if isinstance(d, int) else str(d) for d in (value.shape or ())]
        for value in model.graph.inputs
    }
    return {"opset": opset, "op_histogram": op_histogram(model), "graph_inputs": inputs}


@contextlib.contextmanager
def unloadable_as_export_error() -> Iterator[None]:
    """onnxruntime refusing the exported file (a LoadError while verifying) as the ExportError the user sees."""
    try:
        yield
    except LoadError as exc:
        raise ExportError(f"onnxruntime cannot load the exported model ({cause_line(exc)}); try another --opset "
                          f"(default {DEFAULT_OPSET}) or export the model in float32") from exc


def merge_reports(report: Report, other: Report) -> None:
    """``other``'s changes, skips, checks and notes appended to ``report`` (its facts are the caller's to pick)."""
    report.changes.extend(other.changes)
    report.skipped.extend(other.skipped)
    report.checks.extend(other.checks)
    report.notes.extend(other.notes)


def _as_dynamic(dynamic: Dynamic | bool | Mapping[str, Mapping[int, str]], batch: bool) -> Dynamic:
    if isinstance(dynamic, Dynamic):
        return Dynamic(dynamic.defaults, dynamic.named, dynamic.batch or batch)
    if isinstance(dynamic, Mapping):
        return Dynamic(named=dynamic, batch=batch)
    return Dynamic(defaults=bool(dynamic), batch=batch)


def _export(
    model: nn.Module, inputs: PlainInputs, opset: int, axes: Sequence[Axis], verbose: bool, report: Report
) -> tuple[torch.onnx.ONNXProgram, tuple[Axis, ...]]:
    """``torch.onnx.export`` (dynamo, optimized) and the dynamic axes the graph kept; failures become a
    one-line ExportError. The trace runs on the example widened along size-1 dynamic axes."""
    traced, widened_symbols = widened(inputs, axes)
    example = ExampleInputs.of(traced)
    dynamic_shapes = export_dynamic_shapes(traced, axes) if axes else None
    start = time.perf_counter()
    try:
        with quiet(verbose), math_attention():
            program = torch.onnx.export(
                model, example.args, kwargs=example.kwargs or None, dynamo=True, opset_version=opset, optimize=True,
                dynamic_shapes=dynamic_shapes, verbose=verbose, report=False, dump_exported_program=False,
            )
    except Exception as exc:
        raise ExportError(describe_export_failure(exc, model, verbose=verbose)) from exc
    report.facts["export_seconds"] = round(time.perf_counter() - start, 3)
    produced = program.model.opset_imports.get("", program.model.opset_imports.get("ai.onnx"))
    if produced != opset:
        raise ExportError(
            f"the exporter could not produce opset {opset} (it produced {produced}); "
            f"use --opset {DEFAULT_OPSET} (the default) or another opset between 18 and 25"
        )
    expand_rotary_caches(program.model)
    if not axes:
        return program, ()
    kept = settle_axes(program, traced, axes, report.notes)
    if widened_symbols:
        sizes = axis_sizes(traced, [a for a in axes if a.symbol in widened_symbols])
        report.notes.append(
            "traced on an example widened to " + ", ".join(f"{s} {n}" for s, n in sizes.items())
            + " (torch.export treats a size-1 dim as fixed); verified at the example's size 1 as well"
        )
    return program, kept


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Trace ``scaled_dot_product_attention`` with its math backend (what transformers' own exporter does).

    The exported op is the same; only the strides torch.export assumes for its result change. CPU's
    flash kernel returns (batch, seq, heads, dim)-ordered memory, so a later ``transpose(1, 2).reshape``
    is traced as a view; the ONNX exporter's decomposition pass re-runs the graph with the math
    kernel's contiguous result, and that view fails ("Cannot view a tensor with shape ... and
    strides ..."): every T5 export did (pytorch/pytorch#136543). The math kernel has no batch-1 branch either.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


def expand_rotary_caches(model: ir.Model) -> int:
    """Give each RotaryEmbedding without position ids cos/sin caches of its input's batch; how many it fixed.

    The exporter's opset-23 fusion (onnxscript 0.7) turns transformers' ``x * cos + rotate_half(x) * sin``
    into a RotaryEmbedding node fed the cos/sin of batch 1 that the formula broadcast (position ids
    are ``arange(seq)[None]``); the op does not broadcast, so onnxruntime rejects every batch but 1 ("Inputs
    'cos_cache' and 'sin_cache' are expected to have the same shape as input 'x'"). An Expand to the
    input's batch restores the formula exactly (a no-op where the batch already matches).
    """
    fixed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        has_positions = len(node.inputs) > 3 and node.inputs[3] is not None
        if node.op_type != "RotaryEmbedding" or node.domain not in ("", "ai.onnx") or has_positions:
            continue
        batch = ir.node("Shape", [node.inputs[0]], attributes={"start": 0, "end": 1})
        ones = ir.node("Constant", [], attributes={"value": ir.tensor(np.ones(2, dtype=np.int64))})
        shape = ir.node("Concat", [batch.outputs[0], ones.outputs[0]], attributes={"axis": 0})
        expands = [ir.node("Expand", [node.inputs[i], shape.outputs[0]]) for i in (1, 2)]
        node.graph.insert_before(node, [batch, ones, shape, *expands])
        for i, expand in zip((1, 2), expands):
            node.replace_input_with(i, expand.outputs[0])
        fixed += 1
    return fixed


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Hide the exporters' prints, log lines and warnings unless ``verbose``."""
    if verbose:
        yield
        return
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "torch.utils._sympy",
             "onnxscript", "onnx_ir", "onnxslim")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def save_exported(
    model: ir.Model, tmp: Path, target: Path, *, force: bool, protect: Sequence[Path], report: Report,
    external_data: bool = False,
) -> Path:
    """Write ``model`` to ``tmp``: weights inline (streamed, one tensor at a time: no serialization spike), or
    in ``<target>.data`` when too big to inline or ``external_data`` asks for it.

    Returns the path the file is now at: ``tmp`` (an anonymous temp file, see
    :func:`~normsurgeon.io.saving.write_atomically`), or, with external data, a named temp beside
    the target (:func:`~normsurgeon.io.saving.named_temp`): the files are staged in a real directory
    and renamed into place, and onnxruntime finds the data file beside the .onnx when it verifies it.
    """
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weights <= INLINE_WEIGHTS_LIMIT and not external_data:
        save_inline(model, tmp, staging_dir=target.parent)
        return tmp
    data = data_path(target)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as staging:
        staged = Path(staging) / target.name
        ir.save(model, staged, external_data=data.name)

        def move_data(data_tmp: Path) -> None:
            os.replace(staged.with_name(data.name), named_temp(data_tmp))

        write_atomically(data, move_data, force=force, protect=protect)
        tmp = named_temp(tmp)
        os.replace(staged, tmp)
    report.facts["external_data_bytes"] = data.stat().st_size
    size = f"{weights / 2**30:.2f} GiB" if weights >= 2**28 else f"{weights / 2**20:.1f} MiB"
    report.notes.append(f"the weights ({size}) are in {data.name}, which must travel with {target.name}")
    return tmp


def data_path(target: Path) -> Path:
    """Where the external weights of a large model go: ``model.onnx`` -> ``model.onnx.data``."""
    return target.with_name(target.name + ".data")


def write_with_data_cleanup(
    path: Path, write: Callable[[Path], None], *, force: bool, protect: Sequence[Path]
) -> None:
    """``write_atomically``, also removing an external-data file this export made if it fails."""
    data = data_path(path)
    existed = data.exists()
    try:
        write_atomically(path, write, force=force, protect=protect)
    except BaseException:
        if data.exists() and not existed:
            with contextlib.suppress(OSError):
                data.unlink()
        raise


def cause_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = " ".join(str(cause).split())
    return text[:200] if text else type(cause).__name__


# --------------------------------------------------------------------------- export failures


@dataclass(frozen=True)
class _Site:
    """Where an export failed: module path and class, and the source line when known."""

    module: str | None = None
    cls: str | None = None
    source: str | None = None  # "file.py:12 `code`"

    def __str__(self) -> str:
        parts = []
        if self.cls is not None:
            where = f"module {self.module!r}" if self.module else "the top-level module"
            parts.append(f"in {where} ({self.cls})")
        if self.source:
            parts.append(f"at {self.source}")
        return (" " + " ".join(parts)) if parts else ""


def describe_export_failure(exc: BaseException, model: nn.Module, *, verbose: bool = False) -> str:
    """One line naming what failed to export (operator or construct), where, and the fix."""
    chain = _exception_chain(exc)
    names = {type(e).__name__ for e in chain}
    text = "\n".join(str(e) for e in chain)
    op = _untranslated_op(chain)
    if op is not None:
        what, fix = f"operator {op} has no ONNX translation", "replace that operation in the model"
    elif any("DataDependent" in name for name in names):
        what = "data-dependent control flow (a Python branch or size taken from a tensor's values)"
        fix = "rewrite it with torch.where / torch.cond, or move it out of the model"
    elif "ConstraintViolationError" in names or "Constraints violated" in text:
        fixed = ", ".join(dict.fromkeys(re.findall(r"You marked (\w+) as dynamic", text))) or "a dynamic axis"
        what = f"the model fixes {fixed}, which was asked to be dynamic (or ties it to another axis)"
        fix = "export with it static (leave it out of --dynamic-axis, or leave out --dynamic-batch)"
    elif output := re.search(r"Found <class '([\w.]+)'> in output, which is not a known type", text):
        what = f"the model returns a {output[1].rsplit('.', 1)[-1]} ({output[1]}), which ONNX outputs cannot hold"
        fix = ("set model.config.use_cache = False before saving the model (transformers), or return only tensors"
               " (a causal LM's cache as ONNX inputs and outputs: export with --with-past)"
               if "cache" in output[1].lower() else "make forward() return tensors, or tuples/dicts of them")
    else:
        root = chain[-1]
        what, fix = f"{type(root).__name__}: {_first_line(root)}", "rewrite that code so torch.export can trace it"
    message = f"cannot export the model to ONNX: {what}{_failure_site(chain, model)}; {fix}"
    return message if verbose else f"{message}; rerun with --verbose for the full traceback"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _untranslated_op(chain: list[BaseException]) -> str | None:
    for exc in chain:
        match = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'", str(exc))
        if match:
            return f"{match[1]}.{match[2]}"
    for exc in chain:
        if type(exc).__name__ == "DispatchError":
            node = _fx_node(exc)
            return str(node.target) if node is not None else _first_line(exc)
    return None


def _failure_site(chain: list[BaseException], model: nn.Module) -> _Site:
    """The fx node's module stack (conversion errors), else the deepest model forward() frame."""
    for exc in chain:
        node = _fx_node(exc)
        if node is not None and node.meta.get("nn_module_stack"):
            path, cls = list(node.meta["nn_module_stack"].values())[-1]
            cls_name = getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]
            return _Site(path, cls_name, _last_stack_entry(node.meta.get("stack_trace") or ""))
    paths = {id(m): name for name, m in model.named_modules()}
    site = _Site()
    for exc in chain:
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            owner = frame.f_locals.get("self")
            if frame.f_code.co_name == "forward" and id(owner) in paths:
                code = linecache.getline(frame.f_code.co_filename, lineno).strip()
                source = f"{Path(frame.f_code.co_filename).name}:{lineno} `{code[:80]}`"
                site = _Site(paths[id(owner)], type(owner).__name__, source)
        if site.cls is not None:
            return site
    return site


def _fx_node(exc: BaseException) -> torch.fx.Node | None:
    """The fx node the exporter was translating when ``exc`` was raised (a ``node`` local)."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        node = frame.f_locals.get("node")
        if isinstance(node, torch.fx.Node):
            found = node
    return found


def _last_stack_entry(stack_trace: str) -> str | None:
    matches = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', stack_trace)
    if not matches:
        return None
    file, line, code = matches[-1]
    return f"{Path(file).name}:{line} `{code.strip()[:80]}`"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The message's first line; a long one is cut after its last full sentence (or word) within ``limit``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the exporter colours its messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if len(line) <= limit:
        return line
    cut = line[:limit]
    sentence = cut.rfind(". ")
    return cut[: sentence + 1] if sentence > limit // 2 else cut[: cut.rfind(" ")] + " ..."


__all__ = [
    "DEFAULT_OPSET", "describe_export_failure", "describe_model", "export_onnx",
    "expand_rotary_caches", "math_attention", "op_histogram", "pre_export_passes",
]
