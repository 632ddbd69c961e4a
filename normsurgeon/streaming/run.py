"""Norm surgery on a save_pretrained folder one decoder block at a time, never holding the whole model.

1. **Ends.** A one-block skeleton with the real embeddings, final norm, head and block 0 gets the
   surgery (its own check included); what it does to the ends is kept, and the output's layout
   (every tensor's name, dtype, shape and shard: the input's sharding) is fixed.
2. **Blocks.** For each block, a one-block skeleton with a small vocabulary and that block's real
   weights gets the same surgery. The written tensors are loaded into the class ``from_pretrained``
   will build, and that block is run on the activations carried from the block before and
   compared with the original block on its own carried activations (for ``convert --to rmsnorm``,
   with the original's minus their mean: the centred stream). The block is written at its offsets.
3. **Logits.** The final norm and head, original and as written, run on the last carried states.

The result is a save_pretrained folder: the same config (where the surgery changed it, as
changed), the same shards and index, the other files copied. Written beside the target and renamed
into place only when every comparison passed.
"""

from __future__ import annotations

import copy
import gc
import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..check import compare_outputs
from ..errors import PreconditionError
from ..inputs import ExampleInputs
from ..io.huggingface import CONFIG, WEIGHT_FILES
from ..io.pretrained_output import check_directory_target, put_in_place
from ..io.safetensors_shards import INDEX, ShardedCheckpoint, ShardWriter, TensorEntry
from ..pipeline import raise_if_failed
from ..report import Action, Check, OutputDiff, Report
from .blocks import GivenOutput, block_io, centred, main_output, within_vocabulary
from .skeleton import Blueprint, blueprint, in_block, load, one_block_config, renamed, skeleton, stack_module

SMALL_VOCABULARY = 16  # the vocabulary of a block's skeleton: its ends are not what is checked there


@dataclass(frozen=True)
class StreamedSurgery:
    """What a command does to each skeleton, in place: ``surgery(model, inputs)`` returns its report."""

    name: str  # the report's pass name
    surgery: Callable[[nn.Module, ExampleInputs], Report]
    subject: str = "the edited model"
    require: Callable[[Report], None] = lambda report: None  # raises when the whole result is refused (nothing done)


@dataclass
class _Carried:
    """The activations entering the next block, original and edited, and the comparisons so far."""

    original: torch.Tensor
    edited: torch.Tensor
    atol: float | None
    rtol: float | None
    centred: bool  # the surgery centred the stream (LayerNorm -> RMSNorm): the edited one is the original's minus its mean
    rows: list[OutputDiff] = field(default_factory=list)
    length: int | None = None  # the length of the tuple the block returns (None: a tensor)

    def compare(self, name: str, original: torch.Tensor, edited: torch.Tensor) -> None:
        """One row: ``edited`` against ``original`` (centred, when the surgery centred the stream)."""
        expected = centred(original) if self.centred else original
        self.rows.append(compare_outputs(expected, edited, atol=self.atol, rtol=self.rtol, prefix=name).outputs[0])

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)


def stream_surgery(folder: Path, output: Path, job: StreamedSurgery, make_inputs: Callable[[nn.Module], ExampleInputs],
                   *, atol: float | None = None, rtol: float | None = None, force: bool = False,
                   protect: list[Path] | None = None, progress: bool = False, full_check: bool = False) -> Report:
    """Apply ``job`` to the save_pretrained ``folder`` block by block and write the result to ``output``;
    ``full_check``: also load the original and the written folder whole and compare them (when both fit)."""
    check_directory_target(output, force=force, protect=protect or [folder])
    plan = blueprint(folder)
    staging = output.with_name(f".{output.name}.{secrets.token_hex(8)}.tmp")
    staging.mkdir()
    gc.collect()
    gc.freeze()  # the objects alive now (torch, transformers) are not scanned again by each block's collection
    try:
        report, inputs = _stream(plan, staging, job, make_inputs, atol, rtol, progress)
        if full_check and report.passed:
            report.checks.append(_whole_model_check(folder, staging, inputs, report, atol, rtol))
        raise_if_failed(report, job.subject)
        job.require(report)
        put_in_place(staging, output)
    finally:
        gc.unfreeze()
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _stream(plan: Blueprint, staging: Path, job: StreamedSurgery, make_inputs: Callable[[nn.Module], ExampleInputs],
            atol: float | None, rtol: float | None, progress: bool) -> tuple[Report, ExampleInputs]:
    ends, inputs, out_config, report, carried = _edit_ends(plan, job, make_inputs, atol, rtol)
    writer = ShardWriter(staging, _layout(plan, ends, out_config), plan.checkpoint.file_metadata)
    for name, tensor in ends.items():
        writer.write(name, tensor)
    ends_names = list(ends)
    del ends
    gc.collect()  # a transformers model holds reference cycles: free the ends before the blocks come in
    small_ends = _small_ends(plan)
    small_inputs = within_vocabulary(inputs, SMALL_VOCABULARY)
    with _progress(progress, plan.count) as advance:
        for index in range(plan.count):
            block_report = _edit_block(plan, index, job, small_ends, small_inputs, out_config, carried, writer)
            gc.collect()
            report.changes += block_report.changes
            report.skipped += block_report.skipped
            report.left_out += block_report.left_out
            advance()
            if not carried.passed:
                break
    writer.close()
    _write_metadata(plan, staging, out_config, writer)
    if carried.passed:
        carried.rows.append(_logits_row(plan, staging, ends_names, inputs, out_config, carried, atol, rtol))
    report.checks = [_check(carried)]
    report.facts.update({"blocks streamed": str(plan.count), "stack": plan.stack})
    report.notes.append(f"streamed: {plan.count} blocks of {plan.stack} edited one at a time; each checked on the "
                        "activations carried from the block before" + (", against the original's centred stream"
                                                                       if carried.centred else ""))
    return report, inputs


def _whole_model_check(folder: Path, staging: Path, inputs: ExampleInputs, report: Report, atol: float | None,
                       rtol: float | None) -> Check:
    """The original and the written folder loaded whole by from_pretrained, compared on the example inputs."""
    from ..io.huggingface import load_pretrained_dir

    with torch.no_grad():
        original = main_output(inputs.call(load_pretrained_dir(folder)))
        written = main_output(inputs.call(load_pretrained_dir(staging)))
    report.notes.append("--full-check: the original and the written folder were loaded whole and compared")
    return compare_outputs(original, written, atol=atol, rtol=rtol, prefix="logits",
                           label="whole model: from_pretrained(written) vs from_pretrained(original)")


def _edit_ends(plan: Blueprint, job: StreamedSurgery, make_inputs: Callable[[nn.Module], ExampleInputs],
               atol: float | None, rtol: float | None
               ) -> tuple[dict[str, torch.Tensor], ExampleInputs, Any, Report, _Carried]:
    """Phase 1: the surgery on the ends (with block 0): the edited end tensors to write, the example inputs, the
    output config, the report of the ends' changes, and the embeddings carried into block 0."""
    config = one_block_config(plan, 0)
    model = skeleton(plan, config)
    load(model, {**plan.checkpoint.read(plan.end_names), **plan.checkpoint.read(plan.block_names(0))})
    inputs = make_inputs(model)
    original, _, _ = block_io(model, stack_module(model, plan)[0], inputs)
    before = config.to_dict()
    report = job.surgery(model, inputs)
    _refuse_crossing(report, plan, model)
    edited_model = report.model if isinstance(report.model, nn.Module) else model
    out_config = _changed_config(plan, before, edited_model.config)
    arch = skeleton(plan, one_block_config(plan, 0, config=out_config))
    tensors = in_architecture(edited_model, arch, report)
    load(arch, tensors)
    edited, _, _ = block_io(arch, stack_module(arch, plan)[0], inputs)
    carried = _Carried(original, edited, atol, rtol, centred=bool(report.changed(Action.CENTRED)))
    carried.compare("embeddings (input of block 0)", original, edited)
    report.changes = [c for c in report.changes if not _in_blocks(c.module, plan)]
    report.skipped = [s for s in report.skipped if not _in_blocks(s.module, plan)]
    report.left_out = [o for o in report.left_out if not _in_blocks(o.module, plan)]
    report.checks = []
    report.model = None
    written = _untied(arch)
    ends = {name: tensor for name, tensor in tensors.items() if name in written and not _in_blocks(name, plan)}
    return ends, inputs, out_config, report, carried


def _edit_block(plan: Blueprint, index: int, job: StreamedSurgery, small_ends: dict[str, torch.Tensor],
                inputs: ExampleInputs, out_config: Any, carried: _Carried, writer: ShardWriter) -> Report:
    """Phase 2 for one block: edit it, check it on the carried activations, write it; its report, renamed."""
    model = skeleton(plan, one_block_config(plan, index, vocab=SMALL_VOCABULARY))
    load(model, {**small_ends, **in_block(plan.checkpoint.read(plan.block_names(index)), plan, index, 0)})
    _, original, carried.length = block_io(model, stack_module(model, plan)[0], inputs, carried.original)
    report = job.surgery(model, inputs)
    _refuse_crossing(report, plan, model)
    arch = skeleton(plan, one_block_config(plan, index, vocab=SMALL_VOCABULARY, config=out_config))
    tensors = in_architecture(report.model if isinstance(report.model, nn.Module) else model, arch, report)
    load(arch, tensors)
    _, edited, _ = block_io(arch, stack_module(arch, plan)[0], inputs, carried.edited)
    carried.compare(f"{plan.stack}.{index}", original, edited)
    carried.original, carried.edited = original, edited
    for name, tensor in in_block(tensors, plan, 0, index).items():
        writer.write(name, tensor)
    return Report(job.name,
                  changes=[replace(c, module=renamed(c.module, plan, index),
                                   into=c.into and renamed(c.into, plan, index)) for c in report.changes
                           if _in_blocks(c.module, plan)],
                  skipped=[replace(s, module=renamed(s.module, plan, index), detail=renamed(s.detail, plan, index))
                           for s in report.skipped if _in_blocks(s.module, plan)],
                  left_out=[replace(o, module=renamed(o.module, plan, index), detail=renamed(o.detail, plan, index))
                            for o in report.left_out if _in_blocks(o.module, plan)])


def in_architecture(edited: nn.Module, arch: nn.Module, report: Report) -> dict[str, torch.Tensor]:
    """The edited model's tensors under the names of ``arch`` (the class ``from_pretrained`` builds).

    A norm the surgery left without parameters (a LayerNorm converted to a parameter-free RMSNorm
    on a centred stream) is written with weight 1 and bias 0, which computes the same there; a
    tensor the class has no place for (a bias a fold adds) is refused.
    """
    state, wanted = edited.state_dict(), arch.state_dict()
    tensors, neutral = {}, []
    for key, slot in wanted.items():
        if key in state:
            tensors[key] = state[key]
            continue
        owner, _, leaf = key.rpartition(".")
        if leaf in ("weight", "bias") and not list(edited.get_submodule(owner).parameters(recurse=False)):
            tensors[key] = (torch.ones if leaf == "weight" else torch.zeros)(slot.shape, dtype=slot.dtype)
            neutral.append(owner)
            continue
        if ".parametrizations." in key:
            raise PreconditionError(
                f"{type(arch).__name__} builds {key.split('.parametrizations.')[0]} with a parametrization (weight "
                "norm) itself, so a save_pretrained folder of this class cannot hold its plain weight; drop --stream "
                "to write a .pt file instead")
        raise PreconditionError(f"the edited model has no tensor for {key}, which {type(arch).__name__} loads; "
                                "drop --stream to write a .pt file instead")
    extra = [key for key in state if key not in wanted]
    if extra:
        raise PreconditionError(
            f"{type(arch).__name__} has no place for {extra[0]} (the surgery added it"
            f"{f', and {len(extra) - 1} more' if len(extra) > 1 else ''}), so a save_pretrained folder cannot hold "
            "the result; drop --stream to write a .pt file instead")
    if neutral:
        note = (f"norms left without parameters are written as {type(arch).__name__} builds them, with weight 1 and "
                "bias 0 (the same on the centred stream; checked block by block)")
        if note not in report.notes:
            report.notes.append(note)
    return tensors


def _layout(plan: Blueprint, ends: dict[str, torch.Tensor], out_config: Any) -> dict[str, dict[str, TensorEntry]]:
    """Every output tensor's shard (the input's; a new one goes beside its module's others), dtype and shape."""
    arch = skeleton(plan, one_block_config(plan, 0, vocab=SMALL_VOCABULARY, config=out_config))
    written = _untied(arch)
    block = {name: t for name, t in arch.state_dict().items() if name in written and _in_blocks(name, plan)}
    entries = {name: (t.dtype, tuple(t.shape)) for name, t in ends.items()}
    for index in range(plan.count):
        for name, tensor in in_block(block, plan, 0, index).items():
            entries[name] = (tensor.dtype, tuple(tensor.shape))
    files = plan.checkpoint.files()
    layout: dict[str, dict[str, TensorEntry]] = {file: {} for file in files}
    for name, (dtype, shape) in entries.items():
        known = plan.checkpoint.entries.get(name)
        file = known.file if known else _beside(plan, name, files[-1])
        layout[file][name] = TensorEntry(file, dtype, shape)
    return layout


def _untied(model: nn.Module) -> set[str]:
    """The state_dict keys save_pretrained writes: the first of each group of tied tensors (one Parameter)."""
    seen, keys = set(), set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            keys.add(key)
    return keys


def _beside(plan: Blueprint, name: str, default: str) -> str:
    owner = name.rpartition(".")[0]
    for other, entry in plan.checkpoint.entries.items():
        if other.rpartition(".")[0] == owner:
            return entry.file
    return default


def _small_ends(plan: Blueprint) -> dict[str, torch.Tensor]:
    """The ends cut to the small vocabulary (their first rows, only those read): what a block's skeleton runs
    around it."""
    model = skeleton(plan, one_block_config(plan, 0, vocab=SMALL_VOCABULARY))
    wanted = model.state_dict()
    return plan.checkpoint.read({name: tuple(wanted[name].shape) for name in plan.end_names if name in wanted})


def _changed_config(plan: Blueprint, before: dict[str, Any], after: Any) -> Any:
    """The whole model's config with what the surgery changed in the skeleton's (e.g. untied embeddings)."""
    config = copy.deepcopy(plan.config)
    for key, value in after.to_dict().items():
        if before.get(key) != value and key != "num_hidden_layers":
            setattr(config, key, value)
    return config


def _in_blocks(name: str, plan: Blueprint) -> bool:
    return name == plan.stack or name.startswith(plan.stack + ".")


def _refuse_crossing(report: Report, plan: Blueprint, model: nn.Module) -> None:
    """A change that reaches from a block to a layer outside it (a post-norm model's norm folding into the next
    block's layers) cannot be made one block at a time."""
    for change in report.changes:
        for into in (part.strip() for part in (change.into or "").split(",")):
            if _is_layer(model, into) and _in_blocks(change.module, plan) != _in_blocks(into, plan):
                raise PreconditionError(
                    f"{change.module} {change.action.value} into {into}: the edit reaches across blocks (a post-norm "
                    "model), which streaming cannot do one block at a time; drop --stream")


def _is_layer(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return bool(path)


def _logits_row(plan: Blueprint, staging: Path, ends_names: list[str], inputs: ExampleInputs, out_config: Any,
                carried: _Carried, atol: float | None, rtol: float | None) -> OutputDiff:
    """Phase 3: the final norm and head, original and as written, on the last carried activations."""
    last = plan.count - 1
    original = _head(plan, one_block_config(plan, last), plan.checkpoint, plan.end_names, inputs,
                     GivenOutput(carried.original, carried.length))
    edited = _head(plan, one_block_config(plan, last, config=out_config), ShardedCheckpoint(staging), ends_names,
                   inputs, GivenOutput(carried.edited, carried.length))
    return compare_outputs(original, edited, atol=atol, rtol=rtol, prefix="logits (final norm and head)").outputs[0]


def _head(plan: Blueprint, config: Any, checkpoint: ShardedCheckpoint, names: list[str], inputs: ExampleInputs,
          block: nn.Module) -> torch.Tensor:
    model = skeleton(plan, config)
    stack_module(model, plan)[0] = block
    load(model, checkpoint.read(names))
    with torch.no_grad():
        output = main_output(inputs.call(model))
    del model
    gc.collect()
    return output


def _check(carried: _Carried) -> Check:
    reference = carried.original
    resolved = compare_outputs(reference[:0], reference[:0], atol=carried.atol, rtol=carried.rtol)
    return Check(tuple(carried.rows), atol=resolved.atol, rtol=resolved.rtol,
                 label="streamed, block by block on carried activations: edited vs original"
                       + (" (centred)" if carried.centred else ""))


def _write_metadata(plan: Blueprint, staging: Path, out_config: Any, writer: ShardWriter) -> None:
    """config.json (as changed), the index (same shards), and every other file of the folder, copied."""
    out_config.save_pretrained(staging)
    if plan.checkpoint.sharded:
        weight_map = {name: file for name, (file, _, _) in sorted(writer.where.items())}
        total = sum(entry.nbytes for _, _, entry in writer.where.values())
        index = {"metadata": {**plan.checkpoint.index_metadata, "total_size": total}, "weight_map": weight_map}
        (staging / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    skip = {CONFIG, *WEIGHT_FILES, *plan.checkpoint.files()}
    for path in sorted(plan.folder.iterdir()):
        if path.name not in skip and path.is_file() and not (staging / path.name).exists():
            shutil.copy2(path, staging / path.name)


@contextmanager
def _progress(shown: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over the blocks on stderr (when ``shown``); yields the step function."""
    if not shown:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("streaming blocks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("blocks", total=total)
        yield lambda: bar.advance(task)
