"""With-past (KV-cache) ONNX export of encoder-decoder models (T5, Whisper), verified over a generation loop.

The output is a folder in optimum's ``text2text-generation-with-past`` / ``automatic-speech-recognition-with-past``
layout, three files:

* ``encoder_model.onnx``: ``input_ids``, ``attention_mask`` (batch_size, encoder_sequence_length) for text
  (T5), or ``input_features`` (batch_size, mel bins, frames) for audio (Whisper, whose encoder accepts only its
  configured number of frames: that axis stays static) -> ``last_hidden_state``;
* ``decoder_model.onnx`` (the first step, no past): ``input_ids`` (batch_size, decoder_sequence_length),
  ``encoder_attention_mask`` (text only), ``encoder_hidden_states`` -> ``logits`` and per layer
  ``present.{i}.decoder.key/value`` (batch_size, heads, decoder_sequence_length, head_dim) and
  ``present.{i}.encoder.key/value`` (batch_size, heads, encoder_sequence_length_out, head_dim);
* ``decoder_with_past_model.onnx`` (every later step): ``input_ids``, ``encoder_attention_mask`` (text only) and
  per layer ``past_key_values.{i}.decoder.key/value`` (past_decoder_sequence_length) and
  ``past_key_values.{i}.encoder.key/value`` (encoder_sequence_length_out) -> ``logits`` and the decoder presents
  only (the cross-attention keys and values do not change after the first step). As in optimum's files it takes
  no ``encoder_hidden_states``: the cross-attention reads the cache.

Where optimum fixes the with-past ``input_ids`` to one token, here the decoder sequence stays dynamic (several
tokens a step work too); presents are then ``past_decoder_sequence_length + decoder_sequence_length`` long.
The decoders are traced through :class:`Seq2SeqDecoder`, which builds transformers' ``EncoderDecoderCache``
(two ``DynamicCache``) from the flat past tensors and returns flat presents.

Verification (:func:`verify_seq2seq`) is torch's own loop, at batch 1 and 2: the encoder is compared on the prompt
(row ``i`` of a text batch right-padded by ``2 * i``), then, on torch's encoder output, the first step
(``decoder_model`` on the start token) and greedy decode steps (``decoder_with_past_model`` fed its own presents)
against ``model(..., cache=EncoderDecoderCache, use_cache=True)`` on the same tokens; every step is a check. Under
the default tolerances a step beyond them but within 4x the model's own rounding noise
(:class:`~.with_past.TorchLoop`: the loop replayed in float64 on the same tokens) passes with a note, as
``verify_onnx``'s checks do.
Measured max differences per step on tiny float32 models: T5 1.2e-6 (the encoder and every decoder step),
Whisper 7e-7 on the encoder and 1e-7 on the decoder steps, BART and Marian 7e-7; a plain onnxruntime loop over the
three files generates the tokens ``generate(do_sample=False)`` does. Float16 and bfloat16 models export too
(float32 islands where onnxruntime CPU lacks a kernel), within their dtype's tolerance (tiny bfloat16 Whisper:
0.031 on the encoder, 0.002 per decoder step). Audio encoders other than Whisper's
(Speech2Text) are refused.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from ..errors import ExportError, OutputError
from ..inputs import ExampleInputs, forward_parameters
from ..io.pretrained_output import put_in_place
from ..report import Report
from ..surgery import eval_mode
from . import runtime
from .export import (
    DEFAULT_OPSET,
    describe_export_failure,
    finish_and_save,
    math_attention,
    merge_reports,
    pre_export,
    quiet,
    unloadable_as_export_error,
)
from .with_past import DECODE_STEPS, TorchLoop, TorchStep, returned_cache, run_step

ENCODER_FILE, DECODER_FILE, WITH_PAST_FILE = "encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"
FILES = (ENCODER_FILE, DECODER_FILE, WITH_PAST_FILE)
BATCH, ENCODER_SEQUENCE, DECODER_SEQUENCE, PAST = (
    "batch_size", "encoder_sequence_length", "decoder_sequence_length", "past_decoder_sequence_length")
CROSS_SEQUENCE = "encoder_sequence_length_out"  # optimum's name for the cross-attention keys' length
PROMPT_LENGTH = 6  # the text prompt at batch b has PROMPT_LENGTH + b tokens: two encoder lengths are verified
BATCH_SIZES = (1, 2)
_TRACE_BATCH, _TRACE_DECODER, _TRACE_PAST, _TRACE_ENCODER = 2, 3, 4, 5  # torch.export fixes dims of size 0 and 1


@dataclass(frozen=True)
class Seq2SeqLayout:
    """What an encoder-decoder takes and caches: text or audio encoder, decoder layers, heads, sizes, dtype."""

    audio: bool  # the encoder takes input_features (Whisper), else input_ids and attention_mask (T5)
    layers: int
    heads: int
    head_dim: int
    cross_heads: int
    cross_head_dim: int
    hidden: int  # the encoder output's width
    dtype: torch.dtype
    vocab: int
    start_token: int
    features: tuple[int, int] = (0, 0)  # audio: (mel bins, frames) the encoder accepts

    @classmethod
    def of(cls, model: nn.Module) -> Seq2SeqLayout:
        """Probe ``model``'s encoder and one decoder step; an ExportError for a model this export does not cover."""
        config = getattr(model, "config", None)
        params = forward_parameters(model)
        audio = "input_features" in params
        start = getattr(config, "decoder_start_token_id", None)
        if (not getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_encoder")
                or "cache" not in params or "decoder_input_ids" not in params
                or not (audio or "input_ids" in params)):
            raise ExportError("--with-past on an encoder-decoder needs a transformers *ForConditionalGeneration model "
                              "(forward() taking decoder_input_ids, encoder_outputs and a cache, as T5 and Whisper "
                              "do); export this model without --with-past")
        if start is None:
            raise ExportError("the model's config has no decoder_start_token_id, the token the decoder starts from; "
                              "set model.config.decoder_start_token_id")
        features = _audio_features(model) if audio else (0, 0)
        with torch.no_grad(), eval_mode(model):
            dtype = next(model.parameters()).dtype
            hidden = _torch_encoder(model, _encoder_feeds(audio, features, 1, vocab=2, dtype=dtype))
            out = _torch_decoder(model, torch.full((1, 1), start), hidden, None, _empty_cache(model))
        cache = returned_cache(out)
        sub = (getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None))
        if getattr(out, "logits", None) is None or sub[0] is None or not sub[0].layers:
            raise ExportError(f"{type(model).__name__} returns no logits and EncoderDecoderCache; --with-past exports "
                              "*ForConditionalGeneration models")
        if kinds := sorted({type(layer).__name__ for c in sub for layer in c.layers} - {"DynamicLayer"}):
            raise ExportError(f"the model's cache has {', '.join(kinds)} layers, which --with-past does not export yet "
                              "(only DynamicLayer caches)")
        keys, cross = sub[0].layers[0].keys, sub[1].layers[0].keys
        return cls(audio, len(sub[0].layers), keys.shape[1], keys.shape[3], cross.shape[1], cross.shape[3],
                   hidden.shape[-1], keys.dtype, out.logits.shape[-1], int(start), features)

    @property
    def encoder_inputs(self) -> list[str]:
        return ["input_features"] if self.audio else ["input_ids", "attention_mask"]

    @property
    def text_mask(self) -> list[str]:
        return [] if self.audio else ["encoder_attention_mask"]

    def past_names(self, prefix: str, *, cross: bool = True) -> list[str]:
        """``{prefix}.{i}.decoder.key/value`` (and ``.encoder.`` with ``cross``) per layer, optimum's order."""
        parts = ("decoder", "encoder") if cross else ("decoder",)
        return [f"{prefix}.{i}.{part}.{kv}" for i in range(self.layers) for part in parts for kv in ("key", "value")]

    def decoder_inputs(self, with_past: bool) -> list[str]:
        tail = self.past_names("past_key_values") if with_past else ["encoder_hidden_states"]
        return ["input_ids", *self.text_mask, *tail]

    def decoder_outputs(self, with_past: bool) -> list[str]:
        return ["logits", *self.past_names("present", cross=not with_past)]


class Seq2SeqEncoder(nn.Module):
    """``model``'s encoder: (input_ids, attention_mask) or (input_features,) -> last_hidden_state."""

    def __init__(self, model: nn.Module, layout: Seq2SeqLayout) -> None:
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return _torch_encoder(self.model, dict(zip(self.layout.encoder_inputs, inputs)))


class Seq2SeqDecoder(nn.Module):
    """``model``'s decoder with its cache as flat tensors: (ids[, mask], hidden or *past) -> (logits, *presents)."""

    def __init__(self, model: nn.Module, layout: Seq2SeqLayout, *, with_past: bool) -> None:
        super().__init__()
        self.model, self.layout, self.with_past = model, layout, with_past

    def forward(self, input_ids: torch.Tensor, *rest: torch.Tensor) -> tuple:
        from transformers import DynamicCache, EncoderDecoderCache

        mask, rest = (None, rest) if self.layout.audio else (rest[0], rest[1:])
        if not self.with_past:
            out = _torch_decoder(self.model, input_ids, rest[0], mask, _empty_cache(self.model))
            return (out.logits, *flat_presents(returned_cache(out), cross=True))
        config = self.model.config
        self_pairs, cross_pairs = list(zip(rest[0::4], rest[1::4])), list(zip(rest[2::4], rest[3::4]))
        cache = EncoderDecoderCache(DynamicCache(self_pairs, config=config), DynamicCache(cross_pairs, config=config))
        # The decoder reads the cross-attention keys from the cache; the hidden states only tell it their shape.
        cross_keys = rest[2]
        hidden = cross_keys.new_zeros((cross_keys.shape[0], cross_keys.shape[2], self.layout.hidden))
        out = _torch_decoder(self.model, input_ids, hidden, mask, cache)
        return (out.logits, *flat_presents(returned_cache(out), cross=False))


def flat_presents(cache: object, *, cross: bool) -> list[torch.Tensor]:
    """An EncoderDecoderCache's tensors in the file's order: per layer decoder key, value (then encoder key, value)."""
    caches = (cache.self_attention_cache, cache.cross_attention_cache)
    return [t for layers in zip(*(c.layers for c in caches[: 2 if cross else 1]))
            for layer in layers for t in (layer.keys, layer.values)]


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder (its --with-past export is a folder)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def export_seq2seq_with_past(
    model: nn.Module,
    folder: str | Path,
    *,
    fold: bool = True,
    opset: int | None = None,
    providers: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    protect: Sequence[Path] = (),
    verbose: bool = False,
    external_data: bool = False,
    target: str = "portable",
    decode_steps: int = DECODE_STEPS,
) -> Report:
    """Export the encoder-decoder ``model`` to the folder ``folder`` in optimum's with-past layout (module docstring).

    Batch, encoder, decoder and past decoder lengths are dynamic. The folder is built beside ``folder`` under a
    hidden name and renamed into place once every file is written and loaded in onnxruntime; an existing
    ``folder`` is refused without ``force`` (and with it, unless it holds such an export). The files are verified
    over the first step and ``decode_steps`` greedy steps at two batch sizes (:func:`verify_seq2seq`);
    ``report.passed`` is False when a step differs from torch's. Pre-export passes, ``target`` and
    ``external_data`` are :func:`~normsurgeon.onnx.export.export_onnx`'s.
    """
    folder = Path(folder)
    opset = DEFAULT_OPSET if opset is None else opset
    runtime.resolve_providers(providers)
    check_folder_target(folder, force=force, protect=protect)
    report = Report("export")
    with eval_mode(model):
        layout = Seq2SeqLayout.of(model)
        work = pre_export(model, ExampleInputs.of(_no_cache_example(layout)), fold, atol, rtol, report)
        staging = folder.with_name(f".{folder.name}.{secrets.token_hex(8)}.tmp")
        staging.mkdir()
        try:
            parts = ((ENCODER_FILE, Seq2SeqEncoder(work, layout)),
                     (DECODER_FILE, Seq2SeqDecoder(work, layout, with_past=False)),
                     (WITH_PAST_FILE, Seq2SeqDecoder(work, layout, with_past=True)))
            per_file = {name: _export_part(part, layout, staging / name, opset=opset, target=target,
                                           external_data=external_data, verbose=verbose, report=report)
                        for name, part in parts}
            report.facts.update(_gather_facts(per_file))
            del parts, work
            with unloadable_as_export_error():
                verified = verify_seq2seq(model, staging, layout, providers=providers, atol=atol, rtol=rtol,
                                          decode_steps=decode_steps)
            merge_reports(report, verified)
            report.facts.update(verified.facts)
            check_folder_target(folder, force=force, protect=protect)  # again: nothing may have appeared meanwhile
            put_in_place(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if layout.audio:
        report.notes.append(f"the encoder takes exactly {layout.features[1]} frames of input_features (the model's "
                            "max_source_positions): that axis is static")
    report.facts["file_bytes"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return report


def _gather_facts(per_file: dict[str, dict]) -> dict:
    """export_onnx's fact keys, each a dict by file where the files differ (the opset, the target: one value)."""
    first = next(iter(per_file.values()))
    gathered: dict = {"opset": first["opset"], "export_seconds": round(sum(f["export_seconds"] for f in
                                                                           per_file.values()), 3)}
    if "target" in first:
        gathered["target"] = first["target"]
    for key in ("graph_inputs", "graph_outputs", "op_histogram"):
        gathered[key] = {name: facts[key] for name, facts in per_file.items()}
    if any("external_data_bytes" in f for f in per_file.values()):
        gathered["external_data_bytes"] = {name: f["external_data_bytes"] for name, f in per_file.items()}
    return gathered


def check_folder_target(folder: Path, *, force: bool, protect: Sequence[Path]) -> None:
    """The refusals a file output gets, for the export folder: an input inside it, an unwritable parent, an
    existing path without ``force`` (with it: anything but a folder this export wrote)."""
    for read in protect:
        if folder.resolve() == Path(read).resolve() or Path(read).resolve().is_relative_to(folder.resolve()):
            raise OutputError(f"refusing to write {folder}: it holds the input {read}; choose another path with -o")
    if not folder.parent.is_dir() or not os.access(folder.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {folder}: {folder.parent} is not a writable directory; choose another path "
                          "with -o")
    if folder.exists() or folder.is_symlink():
        if not force:
            raise OutputError(f"{folder} exists; pass --force to replace it")
        if folder.is_symlink() or not folder.is_dir() or not (folder / ENCODER_FILE).is_file():
            raise OutputError(f"refusing to replace {folder}: it is not an encoder-decoder ONNX export folder "
                              f"(no {ENCODER_FILE}); choose another path with -o")


def _export_part(part: nn.Module, layout: Seq2SeqLayout, path: Path, *, opset: int, target: str, external_data: bool,
                 verbose: bool, report: Report) -> dict:
    """Trace one of the three files and save it at ``path``; its facts (opset, ops, input shapes, export time)."""
    inputs, outputs, example, shapes = _signature(part, layout)
    start = time.perf_counter()
    try:
        with quiet(verbose), math_attention(), torch.no_grad():
            program = torch.onnx.export(
                part, example, dynamo=True, opset_version=opset, optimize=True, dynamic_shapes=shapes,
                input_names=inputs, output_names=outputs, verbose=verbose, report=False, dump_exported_program=False,
            )
    except Exception as exc:
        raise ExportError(f"{path.name}: {describe_export_failure(exc, part.model, verbose=verbose)}") from exc
    seconds = round(time.perf_counter() - start, 3)
    name_cross_axis(program.model)
    own = Report("export")
    finish_and_save(program.model, path, path, target=target, external_data=external_data, force=False, protect=(),
                    report=own)
    report.changes.extend(replace(c, module=f"{path.name}:{c.module}") for c in own.changes)  # node names repeat
    report.skipped.extend(replace(k, module=f"{path.name}:{k.module}") for k in own.skipped)
    report.notes.extend(f"{path.name}: {note}" for note in own.notes)
    outputs_shape = {v.name: [d if isinstance(d, int) else str(d) for d in v.shape] for v in program.model.graph.outputs}
    return {**own.facts, "graph_outputs": outputs_shape, "export_seconds": seconds}


def _signature(part: nn.Module, layout: Seq2SeqLayout) -> tuple[list[str], list[str], tuple, tuple]:
    """Input and output names, the traced example and its dynamic shapes for one of the three parts."""
    dims = {n: torch.export.Dim(n, min=1) for n in (BATCH, ENCODER_SEQUENCE, DECODER_SEQUENCE, PAST)}
    generator = torch.Generator().manual_seed(0)
    b, s, p, e = _TRACE_BATCH, _TRACE_DECODER, _TRACE_PAST, _TRACE_ENCODER
    tokens = {0: dims[BATCH], 1: dims[ENCODER_SEQUENCE]}
    if isinstance(part, Seq2SeqEncoder):
        if layout.audio:
            return (layout.encoder_inputs, ["last_hidden_state"],
                    (torch.randn(b, *layout.features, generator=generator).to(layout.dtype),), (({0: dims[BATCH]},),))
        ids = torch.randint(0, layout.vocab, (b, e), generator=generator)
        return layout.encoder_inputs, ["last_hidden_state"], (ids, torch.ones(b, e, dtype=torch.long)), ((tokens, tokens),)
    ids = torch.randint(0, layout.vocab, (b, s), generator=generator)
    mask = [] if layout.audio else [torch.ones(b, e, dtype=torch.long)]
    mask_shapes = [] if layout.audio else [tokens]
    decoder = {0: dims[BATCH], 1: dims[DECODER_SEQUENCE]}
    if not part.with_past:
        hidden = torch.randn(b, e, layout.hidden, generator=generator).to(layout.dtype)
        shapes = (decoder, (*mask_shapes, {0: dims[BATCH], 1: dims[ENCODER_SEQUENCE]}))
        return layout.decoder_inputs(False), layout.decoder_outputs(False), (ids, *mask, hidden), shapes
    self_shape, cross_shape = (b, layout.heads, p, layout.head_dim), (b, layout.cross_heads, e, layout.cross_head_dim)
    past = [torch.randn(shape, generator=generator).to(layout.dtype)
            for _ in range(layout.layers) for shape in (self_shape, self_shape, cross_shape, cross_shape)]
    past_shapes = [{0: dims[BATCH], 2: dims[PAST]}] * 2 + [{0: dims[BATCH], 2: dims[ENCODER_SEQUENCE]}] * 2
    shapes = (decoder, (*mask_shapes, *past_shapes * layout.layers))
    return layout.decoder_inputs(True), layout.decoder_outputs(True), (ids, *mask, *past), shapes


def name_cross_axis(model: ir.Model) -> None:
    """Name the cross-attention keys' length ``encoder_sequence_length_out`` on the graph's inputs and outputs, as
    optimum does (it equals ``encoder_sequence_length``; a name per role is what optimum's readers expect)."""
    for value in (*model.graph.inputs, *model.graph.outputs):
        if ".encoder." in (value.name or "") and value.shape is not None and not isinstance(value.shape[2], int):
            dims = list(value.shape)
            dims[2] = ir.SymbolicDim(CROSS_SEQUENCE)
            value.shape = ir.Shape(dims)


def _no_cache_example(layout: Seq2SeqLayout) -> dict:
    """Encoder inputs and decoder ids for the pre-export passes' check, without a cache (its outputs are tensors)."""
    feeds = _encoder_feeds(layout.audio, layout.features, _TRACE_BATCH, layout.vocab, dtype=layout.dtype)
    decoder = torch.randint(0, layout.vocab, (_TRACE_BATCH, 3), generator=torch.Generator().manual_seed(1))
    return {**feeds, "decoder_input_ids": decoder, "use_cache": False}


# --------------------------------------------------------------------------- torch's own calls


def _audio_features(model: nn.Module) -> tuple[int, int]:
    """The (mel bins, frames) Whisper's encoder accepts (it refuses any other number of frames)."""
    config, encoder = model.config, model.get_encoder()
    convs = [getattr(encoder, name, None) for name in ("conv1", "conv2")]
    if not all(isinstance(conv, nn.Conv1d) for conv in convs) or not all(
            hasattr(config, key) for key in ("max_source_positions", "num_mel_bins")):
        raise ExportError(f"{type(model).__name__}: of the audio encoder-decoders --with-past covers Whisper's "
                          "encoder (mel features through two Conv1d); export this model without --with-past")
    return config.num_mel_bins, config.max_source_positions * convs[0].stride[0] * convs[1].stride[0]


def _encoder_feeds(audio: bool, features: tuple[int, int], batch: int, vocab: int, length: int | None = None,
                   *, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Encoder inputs: random mel features (of ``dtype``), or random token ids with row ``i`` right-padded by
    ``2 * i``."""
    generator = torch.Generator().manual_seed(seed)
    if audio:
        return {"input_features": torch.randn(batch, *features, generator=generator).to(dtype)}
    length = length or PROMPT_LENGTH + batch
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, length - min(2 * row, length - 1):] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _torch_encoder(model: nn.Module, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.get_encoder()(**feeds).last_hidden_state


def _torch_decoder(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None,
                   cache: object) -> object:
    """One decoder step of the whole model on the encoder's output: what generate() calls."""
    extra = {} if mask is None else {"attention_mask": mask}
    return model(decoder_input_ids=ids, encoder_outputs=(hidden,), cache=cache, use_cache=True, **extra)


def _empty_cache(model: nn.Module) -> object:
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))


# --------------------------------------------------------------------------- verification over decode steps


def verify_seq2seq(
    model: nn.Module,
    folder: str | Path,
    layout: Seq2SeqLayout,
    *,
    providers: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    decode_steps: int = DECODE_STEPS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> Report:
    """The encoder, the first decoder step and ``decode_steps`` greedy steps in torch and onnxruntime, per batch size.

    Both decoders run on torch's encoder output and the same tokens (torch's greedy choice); onnxruntime's
    with-past decoder is fed its own presents. Checks are labelled "onnxruntime cpu vs torch (encoder_model,
    batch 2, sequence 8)", "(decoder_model, batch 2, sequence 1)", "(decode step 2, batch 2, past 2)". Under
    the default tolerances a check that fails within the model's own rounding noise (torch's loop replayed in
    float64 on the same tokens) passes with a note, as :func:`~normsurgeon.onnx.verify.verify_onnx` judges.
    """
    folder = Path(folder)
    report = Report("verify")
    chosen, skipped = runtime.resolve_providers(providers)
    report.notes.extend(skipped)
    with eval_mode(model):
        loops = [TorchLoop(functools.partial(_torch_steps, model, layout, batch, decode_steps))
                 for batch in batch_sizes]
        for provider in chosen:
            sessions = [runtime.session(folder / name, provider) for name in FILES]
            for loop in loops:
                _check_loop(loop, sessions, provider, atol, rtol, report)
    report.facts["providers"] = list(chosen)
    report.facts["batch_sizes_verified"] = sorted(batch_sizes)
    report.facts["decode_steps_verified"] = decode_steps
    return report


def _torch_steps(model: nn.Module, layout: Seq2SeqLayout, batch: int, steps: int,
                 tokens: Sequence[torch.Tensor] | None = None) -> list[TorchStep]:
    """The encoder, the first decoder step and ``steps`` decode steps, each on the token chosen greedily (or the
    given ``tokens``); the steps' sessions index :data:`FILES`."""
    feeds = _encoder_feeds(layout.audio, layout.features, batch, layout.vocab, dtype=layout.dtype)
    length = next(iter(feeds.values())).shape[-1]
    with torch.no_grad():
        hidden = _torch_encoder(model, feeds)
    loop = [TorchStep(f"encoder_model, batch {batch}, sequence {length}", feeds, {"last_hidden_state": hidden},
                      tokens=None, session=0)]
    mask = feeds.get("attention_mask")
    masks = {} if mask is None else {"encoder_attention_mask": mask}
    ids = torch.full((batch, 1), layout.start_token)
    cache = _empty_cache(model)
    for step in range(steps + 1):
        with torch.no_grad():
            out = _torch_decoder(model, ids, hidden, mask, cache)
        cache = returned_cache(out)
        first = step == 0
        names = layout.decoder_outputs(with_past=not first)
        reference = dict(zip(names, (out.logits, *flat_presents(cache, cross=first))))
        where = f"decoder_model, batch {batch}, sequence 1" if first else \
            f"decode step {step}, batch {batch}, past {step}"
        inputs = {"input_ids": ids, **masks, **({"encoder_hidden_states": hidden} if first else {})}
        loop.append(TorchStep(where, inputs, reference, tokens=ids, session=1 if first else 2))
        if step < steps:
            ids = out.logits[:, -1].argmax(-1, keepdim=True) if tokens is None else tokens[step]
    return loop


def _check_loop(loop: TorchLoop, sessions: list, provider: str, atol: float | None, rtol: float | None,
                report: Report) -> None:
    """onnxruntime over ``loop``'s steps, the with-past decoder fed its own presents: each check (and note) into
    ``report``."""
    past: dict[str, torch.Tensor] = {}
    for index, step in enumerate(loop.steps):
        sess = sessions[step.session]
        feeds = {**step.feeds, **past} if step.session == 2 else step.feeds
        produced = run_step(sess, feeds, [o.name for o in sess.get_outputs()], step.where)
        loop.record(report, index, produced, provider, atol, rtol)
        if step.session:
            past |= {name.replace("present", "past_key_values", 1): value for name, value in produced.items()
                     if name != "logits"}


__all__ = ["FILES", "Seq2SeqDecoder", "Seq2SeqEncoder", "Seq2SeqLayout", "check_folder_target",
           "export_seq2seq_with_past", "flat_presents", "is_encoder_decoder", "name_cross_axis", "verify_seq2seq"]
