"""``optimize``: fold BatchNormalization and fuse decomposed norms in an existing .onnx file.

For a file from any exporter (torch's dynamo exporter with ``optimize=False``, its legacy
TorchScript exporter, others), on onnx-ir with the onnxscript rewriter:

1. prepare: inline functions, name every node, fold constants (so a conv bias that the exporter
   computes at run time, ``Expand(0, Shape(W))``, becomes the constant it is), infer shapes,
   merge common subexpressions;
2. fold each inference-form BatchNormalization, ``BN(y) = s*y + t`` with
   ``s = gamma/sqrt(var + eps)``, ``t = beta - mean*s``, into the layer before it
   (``W' = W*s``, ``b' = (b - mean)*s + beta``) or, failing that, into the unpadded layers
   after it (``W' = W*s`` per input channel, ``b' = b + W·t``): :mod:`.rules`;
3. fuse decomposed LayerNorm / RMSNorm / GroupNorm into the native op where the opset has it; for
   ``target=Target.ORT`` or ``ORT_CPU``, also into onnxruntime's own ops where the opset has no ONNX one,
   and (``ORT`` only) each residual Add + norm into onnxruntime's Skip op (:mod:`.rules.ort_fusions`);
4. clean up (dead nodes and initializers, unused opsets);
5. run input and output in onnxruntime CPU (same optimization level for both) on the same
   random inputs, and write the output atomically only when they match.

The report has one Change per fold or fusion, one Skip per BatchNormalization left (and per norm
chain the opset could not take), the op histograms before and after, and the check.
"""

from __future__ import annotations

import collections
import enum
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import torch
from onnxscript.rewriter import pattern

from ..check import compare_outputs
from ..errors import LoadError, OutputError, UsageError, VerificationError, first_line
from ..io.saving import write_atomically
from ..report import Change, Check, Report, Skip, SkipReason
from . import runtime
from .rules import (
    FOLD_INTO_CONSUMER,
    FOLD_INTO_PRODUCER,
    NORM_FUSIONS,
    NormFusion,
    batchnorm_problem,
    describe,
    opset_version,
    take_changes,
)
from .rules.ort_fusions import (
    PLAIN_SKIP_FUSIONS,
    SKIP_FUSIONS,
    omit_unread_outputs,
    ort_norm_fusions,
    share_skip_sums,
    shield_residual_adds,
    describe_skip_pair,
)

CHECK_LABEL = "optimized vs input (onnxruntime cpu)"
_SMALL_CONSTANT = 1024  # elements
_MAX_ROUNDS = 8  # a rule set is re-applied until nothing changes (chains of rewrites), at most this often


class Target(enum.Enum):
    """Which runtime the optimized file is for."""

    PORTABLE = "portable"  # standard ai.onnx ops only: any runtime
    ORT = "ort"  # also onnxruntime's fused norm ops (SimplifiedLayerNormalization, Skip*LayerNormalization)
    ORT_CPU = "ort-cpu"  # onnxruntime's fused norm ops, residual Adds left (and shielded from its own Skip fusion)

    @property
    def onnxruntime_ops(self) -> bool:
        """Norms may become onnxruntime's own ops where the opset has no ONNX one."""
        return self is not Target.PORTABLE

    @property
    def skip_pairs(self) -> bool:
        """Each residual Add + norm becomes a Skip op. Not for CPU: onnxruntime 1.32's CPU
        SkipLayerNormalization takes 5-6x, SkipSimplifiedLayerNormalization 2x, the time of Add + norm
        (measured at (1, 32..128, 512), one thread; benchmarks/README.md)."""
        return self is Target.ORT


def optimize_onnx(
    in_path: str | Path,
    out_path: str | Path,
    *,
    input_shapes: Sequence[tuple[int, ...]] = (),
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    target: Target = Target.PORTABLE,
) -> Report:
    """Fold BatchNormalization and fuse norms in ``in_path``; write ``out_path`` if it still matches.

    ``input_shapes`` (one per graph input, in order) fill symbolic dims for the check's random
    inputs. ``target``: :class:`Target`. The input file is never overwritten. A mismatch in
    onnxruntime raises :class:`VerificationError` (``error.report`` holds the report) and writes nothing.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    proto = runtime.load_onnx(in_path)
    feeds = runtime.random_feeds(proto, input_shapes)  # fails fast on symbolic dims
    report = Report("optimize")
    report.facts["target"] = target.value
    report.facts["ops_before"] = op_histogram(node.op_type for node in proto.graph.node)
    report.facts["nodes_before"] = len(proto.graph.node)
    report.facts["opset"] = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    model = ir.serde.deserialize_model(proto)
    del proto

    changes, skipped = optimize_model(model, target=target)
    report.changes.extend(changes)
    report.skipped.extend(skipped)

    report.facts["ops_after"] = op_histogram(node.op_type for node in model.graph)
    report.facts["nodes_after"] = len(model.graph)
    _note_cleanup(report)
    data = serialize(model)
    report.facts["file_bytes"] = len(data)
    report.facts["input_file_bytes"] = in_path.stat().st_size
    report.checks.append(compare_in_onnxruntime(in_path, data, feeds, atol=atol, rtol=rtol))
    if not report.passed:
        check = report.checks[0]
        error = VerificationError(
            f"the optimized model differs from {in_path.name} by {check.max_abs_diff:.3g} in onnxruntime "
            f"(tolerance {check.atol:g} + {check.rtol:g}*max|output|); nothing was written"
        )
        error.report = report  # type: ignore[attr-defined]
        raise error
    write_atomically(out_path, lambda tmp: tmp.write_bytes(data), force=force, protect=[in_path])
    return report


def _note_cleanup(report: Report) -> None:
    """Say what the clean-up alone did (constant folding, dead code, duplicates): it is no norm change."""
    before, after = (sum(report.facts[key].values()) for key in ("ops_before", "ops_after"))
    if after < before:
        report.notes.append(f"the graph was also cleaned up (constants folded, dead and duplicate nodes removed): "
                            f"{before} → {after} nodes")


def optimize_model(model: ir.Model, *, target: Target = Target.PORTABLE) -> tuple[list[Change], list[Skip]]:
    """Fold BatchNormalization and fuse norms in ``model``, in place; the changes made and the skips.

    The graph half of :func:`optimize_onnx`, without the file or the check: for a caller that holds an
    ``ir.Model`` (an exporter's) and verifies it itself.
    """
    prepare(model)
    fold_batchnorms(model)
    skipped = explain_batchnorms(model)
    skipped.extend(fuse_norms(model, target=target))
    if target.skip_pairs:
        skipped.extend(fuse_skip_norms(model))
    cleanup(model)
    if target.skip_pairs:
        omit_unread_outputs(model.graph)
    elif target.onnxruntime_ops:
        shield_residual_adds(model.graph)
    return take_changes(model.graph), skipped


# --------------------------------------------------------------------------- steps


def prepare(model: ir.Model) -> None:
    """Inline, name, fold constants (with shape inference), drop dead code, merge duplicates."""
    common_passes.InlinePass()(model)
    common_passes.NameFixPass()(model)
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)  # "Evaluation failed: ..." only means that node stays unfolded
    try:
        onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True, should_fold=_fold_small_constant_of_shape)
    finally:
        folding_log.setLevel(level)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.CommonSubexpressionEliminationPass()(model)


def _fold_small_constant_of_shape(node: ir.Node) -> bool | None:
    """Fold a ConstantOfShape (which onnxscript keeps, to not grow files) when it is tiny: the
    legacy exporter builds a Pad's pads from one, and a fold needs them constant."""
    if node.op_type != "ConstantOfShape" or node.inputs[0] is None or node.inputs[0].const_value is None:
        return None
    return int(np.prod(node.inputs[0].const_value.numpy())) <= _SMALL_CONSTANT


def fold_batchnorms(model: ir.Model) -> int:
    """Fold into producers first; what is left, into consumers. Returns the number of rewrites."""
    return apply_rules(model, FOLD_INTO_PRODUCER) + apply_rules(model, FOLD_INTO_CONSUMER)


def fuse_norms(model: ir.Model, *, target: Target = Target.PORTABLE) -> list[Skip]:
    """Apply each norm fusion the opset (and ``target``) allows; report the chains of those it does not."""
    opset = opset_version(model)
    skipped: list[Skip] = []
    claimed: set[ir.Node] = set()  # a LayerNorm chain holds an RMSNorm-shaped tail: report it once
    for_ort = ort_norm_fusions(opset)  # NORM_FUSIONS' families, in order, as onnxruntime can take them
    for family, ort_family in zip(for_ort if target.onnxruntime_ops else NORM_FUSIONS, for_ort):
        if opset >= family.since:
            apply_rules(model, family.core, commute=True)
            apply_rules(model, family.absorb, commute=True)
        else:
            alternative = f" (--target ort would use onnxruntime's {ort_family.native})" \
                if opset >= ort_family.since else ""
            skipped.extend(_opset_skips(model, family, opset, claimed, alternative))
    return skipped


def fuse_skip_norms(model: ir.Model) -> list[Skip]:
    """Fuse each residual Add + norm into onnxruntime's Skip op; one Skip per pair left, saying why."""
    common_passes.NameFixPass()(model)  # the fused node names the Add output it reproduces
    apply_rules(model, SKIP_FUSIONS, commute=True)
    share_skip_sums(model.graph)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    skipped = []
    for node in model.graph:
        pair = describe_skip_pair(node)
        if pair is not None:
            reason = _failure(model, PLAIN_SKIP_FUSIONS, node) or "it does not match"
            skipped.append(Skip(node.name, SkipReason.UNSUPPORTED_STRUCTURE, f"{pair}: {reason}"))
    return skipped


def cleanup(model: ir.Model) -> None:
    """Drop dead nodes, initializers, functions and opsets; Constant nodes become initializers."""
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    common_passes.NameFixPass()(model)


def apply_rules(model: ir.Model, rules: Sequence[pattern.RewriteRule], *, commute: bool = False) -> int:
    """Apply ``rules`` until none matches (a rewrite can make the next one possible)."""
    rule_set = pattern.RewriteRuleSet(list(rules), commute=commute)
    total = 0
    for _ in range(_MAX_ROUNDS):
        count = rule_set.apply_to_model(model)
        total += count
        if not count:
            break
    return total


# --------------------------------------------------------------------------- why things were left


def explain_batchnorms(model: ir.Model) -> list[Skip]:
    """One Skip per BatchNormalization still in the graph, with what stopped each fold."""
    skips = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "BatchNormalization":
            continue
        problem = batchnorm_problem(node)
        if problem is not None:
            skips.append(Skip(node.name, *problem))
            continue
        before = _failure(model, FOLD_INTO_PRODUCER, node) or _source(node)
        after = _following_failure(model, node)
        skips.append(Skip(node.name, SkipReason.NO_FOLDABLE_NEIGHBOUR, f"before it: {before}; after it: {after}"))
    return skips


def _failure(model: ir.Model, rules: Sequence[pattern.RewriteRule], root: ir.Node) -> str | None:
    """The check-failure reason of the first rule whose pattern matches at ``root``."""
    for rule in rules:
        tracer = pattern.MatchingTracer()
        rule.match(model, root.graph, root, tracer=tracer, check_nodes_are_removable=rule.remove_nodes)
        for info in tracer.best_matches_map.get(rule, []):
            if info.status == pattern.MatchStatus.CONDITION_FAILED and info.match_result.reason:
                return info.match_result.reason
    return None


def _source(bn: ir.Node) -> str:
    value = bn.inputs[0]
    producer = value.producer() if value is not None else None
    if producer is None:
        return f"its input '{value.name if value is not None else '?'}' is a graph input"
    return f"its input comes from {describe(producer)}, not a Conv, ConvTranspose, Gemm or MatMul"


def _following_failure(model: ir.Model, bn: ir.Node) -> str:
    output = bn.outputs[0]
    consumers = output.consumers()
    if not consumers:
        return "its output is a graph output" if output.is_graph_output() else "its output is unused"
    padded = [c for consumer in consumers if consumer.op_type == "Pad" for c in consumer.outputs[0].consumers()]
    for consumer in [*consumers, *padded]:
        reason = _failure(model, FOLD_INTO_CONSUMER, consumer)
        if reason is not None:
            return reason
    return f"its output feeds {', '.join(sorted({describe(c) for c in consumers}))}, not a Conv, Gemm or MatMul"


def _opset_skips(
    model: ir.Model, family: NormFusion, opset: int, claimed: set[ir.Node], alternative: str
) -> list[Skip]:
    """A Skip at the first node of each chain ``family`` would fuse at a higher opset.

    Chains overlapping ``claimed`` (reported by an earlier family) are left out; their nodes are
    added to it.
    """
    order = {node: index for index, node in enumerate(model.graph)}
    rules = pattern.RewriteRuleSet(list(family.core), commute=True).rules
    firsts: list[ir.Node] = []
    for node in model.graph:
        for rule in rules:
            match = rule.match(model, model.graph, node)
            if match and not claimed.intersection(match.nodes):
                claimed.update(match.nodes)
                firsts.append(min(match.nodes, key=lambda n: order.get(n, len(order))))
                break
    detail = family.skip_detail(opset, alternative)
    return [Skip(first.name, SkipReason.OPSET_TOO_OLD, detail) for first in firsts]


# --------------------------------------------------------------------------- facts and the check


def op_histogram(op_types: Iterable[str]) -> dict[str, int]:
    """How many nodes of each op type (of the main graph), most frequent first."""
    counts = collections.Counter(op_types)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def serialize(model: ir.Model) -> bytes:
    """The model as one self-contained .onnx file's bytes."""
    try:
        return ir.serde.serialize_model(model).SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GiB
        raise OutputError(
            "the optimized model is over 2 GiB, which normsurgeon cannot yet write as one .onnx file "
            f"(external data is not supported by optimize): {exc}"
        ) from exc


def compare_in_onnxruntime(
    in_path: Path, data: bytes, feeds: dict[str, np.ndarray], *, atol: float | None, rtol: float | None
) -> Check:
    """Run the input file and the optimized bytes in onnxruntime CPU on ``feeds``; compare outputs."""
    try:
        reference = runtime.run(runtime.session(in_path), feeds)
    except LoadError:
        raise
    except Exception as exc:  # onnxruntime's own error types: the given shapes do not fit the model
        shapes = "; ".join(",".join(map(str, array.shape)) for array in feeds.values())
        raise UsageError(
            f"inputs of shape {shapes} do not fit {in_path.name} in onnxruntime ({first_line(exc)}); "
            "pass --input-shape with the shape the model expects"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="normsurgeon-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        path.write_bytes(data)
        try:
            optimized = runtime.session(path)
        except LoadError as exc:  # a rewrite produced something this onnxruntime cannot run
            raise VerificationError(
                f"onnxruntime cannot load the optimized model ({exc}); nothing was written"
            ) from exc
        candidate = runtime.run(optimized, feeds)
    return compare_outputs(_tensors(reference), _tensors(candidate), atol=atol, rtol=rtol, label=CHECK_LABEL)


def _tensors(outputs: list[tuple[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.asarray(array)) for name, array in outputs}
