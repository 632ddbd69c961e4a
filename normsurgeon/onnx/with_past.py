"""With-past (KV-cache) ONNX export of decoder-only causal LMs, verified over a generation loop.

The file has optimum's ``text-generation-with-past`` layout (onnxruntime-genai reads the same names):

* inputs ``input_ids`` (batch, sequence), ``attention_mask`` (batch, total_sequence), ``position_ids``
  (batch, sequence; where ``forward()`` takes them), and per layer ``past_key_values.{i}.key`` /
  ``past_key_values.{i}.value`` (batch, kv_heads, past_sequence, head_dim);
* outputs ``logits`` (batch, sequence, vocab) and ``present.{i}.key`` / ``present.{i}.value``
  (batch, kv_heads, past_sequence + sequence, head_dim).

One file serves prefill and decode: the prefill feeds a past of length 0 (what onnxruntime-genai
does), which onnxruntime runs (Concat of an empty past), so no separate no-past model is needed.
The trace goes through :class:`FlatCache`, which builds transformers' ``DynamicCache`` from the flat
past tensors and returns flat presents; it runs on a past of length 4 and 3 new tokens, since
torch.export fixes dims of size 0 or 1.

Verification (:func:`verify_with_past`) is torch's own loop: a prefill then greedy decode steps, ``model(...,
cache=DynamicCache, use_cache=True)`` against onnxruntime fed its own presents back, on the same tokens, at batch
1 and at batch 2 with the second row left-padded; every step is a check. Under the default tolerances a step
beyond them but within 4x the model's own rounding noise (:class:`TorchLoop`: the loop replayed in float64 on the
same tokens) passes with a note, as ``verify_onnx``'s checks do.
Measured max differences per step: 6e-8 to 1.2e-7 on tiny float32 Llama, Qwen2, GPT-2, Gemma, Phi-3 and
OPT; float16 and bfloat16 models export too (float32 islands where onnxruntime CPU lacks a kernel) within
their dtype's tolerance (tiny Llama: 4.9e-4 and 2.8e-3).
Encoder-decoders (T5, Whisper: an ``EncoderDecoderCache`` and an encoder pass) are
:mod:`.with_past_seq2seq`'s; caches with sliding-window layers are refused.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..check import in_float64, noise_between
from ..errors import ExportError
from ..inputs import ExampleInputs, forward_parameters
from ..report import Report
from ..surgery import eval_mode
from . import runtime
from .export import (
    DEFAULT_OPSET,
    describe_export_failure,
    expand_rotary_caches,
    finish_and_save,
    math_attention,
    merge_reports,
    pre_export,
    quiet,
    unloadable_as_export_error,
    write_with_data_cleanup,
)
from .precision import run_torch
from .verify import compare_named

BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"
PROMPT_LENGTH = 7
DECODE_STEPS = 3
BATCH_SIZES = (1, 2)
_TRACE_BATCH, _TRACE_SEQUENCE, _TRACE_PAST = 2, 3, 4  # torch.export fixes dims of size 0 and 1


@dataclass(frozen=True)
class CacheLayout:
    """What the model's KV cache looks like: layers, heads, head size, dtype, and how ``forward()`` takes it."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    vocab: int
    cache_keyword: str  # "cache" (transformers 5) or "past_key_values"
    positions: bool  # forward() takes position_ids

    @classmethod
    def of(cls, model: nn.Module) -> CacheLayout:
        """Probe ``model`` with two tokens; an ExportError for a model this export does not cover."""
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise ExportError("export_with_past covers decoder-only causal LMs; for an encoder-decoder (T5, Whisper, "
                              "...) call normsurgeon.onnx.with_past_seq2seq.export_seq2seq_with_past, which writes "
                              "optimum's three files to a folder (the CLI's export --with-past does so itself)")
        params = forward_parameters(model)
        keyword = next((k for k in ("cache", "past_key_values") if k in params), None)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if config is None or keyword is None or "use_cache" not in params or embeddings is None:
            raise ExportError("--with-past needs a transformers causal LM (forward() taking input_ids, a cache and "
                              "use_cache); export this model without --with-past")
        vocab = embeddings.num_embeddings
        with torch.no_grad(), eval_mode(model):
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
        layers = getattr(returned_cache(out), "layers", None)
        if getattr(out, "logits", None) is None or not layers:
            raise ExportError(f"{type(model).__name__} returns no logits and KV cache; --with-past exports "
                              "*ForCausalLM models")
        if kinds := sorted({type(layer).__name__ for layer in layers} - {"DynamicLayer"}):
            raise ExportError(f"the model's cache has {', '.join(kinds)} layers (sliding window or other), which "
                              "--with-past does not export yet (only full-attention DynamicLayer caches)")
        keys = layers[0].keys
        return cls(len(layers), keys.shape[1], keys.shape[3], keys.dtype, vocab, keyword, "position_ids" in params)

    @property
    def input_names(self) -> list[str]:
        tokens = ["input_ids", "attention_mask"] + (["position_ids"] if self.positions else [])
        return tokens + [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def empty_past(self, batch: int, length: int = 0, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Flat past tensors (key, value per layer) of ``length``: zeros, or random with a generator."""
        shape = (batch, self.kv_heads, length, self.head_dim)
        if generator is None:
            return [torch.zeros(shape, dtype=self.dtype) for _ in range(2 * self.layers)]
        return [torch.randn(shape, generator=generator).to(self.dtype) for _ in range(2 * self.layers)]


class FlatCache(nn.Module):
    """``model`` with its KV cache as flat tensors: (ids, mask[, positions], *past) -> (logits, *presents)."""

    def __init__(self, model: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> tuple:
        from transformers import DynamicCache

        positions, past = (rest[0], rest[1:]) if self.layout.positions else (None, rest)
        cache = DynamicCache(list(zip(past[0::2], past[1::2])), config=self.model.config)
        extra = {"position_ids": positions} if self.layout.positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra,
                         **{self.layout.cache_keyword: cache}, use_cache=True)
        return (out.logits, *flat_cache(returned_cache(out)))


def returned_cache(output: object) -> object:
    """The cache a forward returned: ``cache`` (transformers 5.2x) or ``past_key_values`` (before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def flat_cache(cache: object) -> list[torch.Tensor]:
    """A DynamicCache's tensors in the file's order: key, value of layer 0, then layer 1, ..."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def export_with_past(
    model: nn.Module,
    path: str | Path,
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
    """Export the causal LM ``model`` with its KV cache as inputs and outputs (module docstring) to ``path``.

    Batch, sequence, past and total length are dynamic. The file is verified over a prefill and
    ``decode_steps`` greedy steps at two batch sizes (:func:`verify_with_past`); ``report.passed`` is False
    when a step's logits or presents differ from torch's. The pre-export passes, ``target``,
    ``external_data`` and the atomic write are :func:`~normsurgeon.onnx.export.export_onnx`'s.
    """
    path = Path(path)
    opset = DEFAULT_OPSET if opset is None else opset
    runtime.resolve_providers(providers)
    report = Report("export")
    with eval_mode(model):
        layout = CacheLayout.of(model)
        work = pre_export(model, ExampleInputs.of(_no_cache_example(model, layout)), fold, atol, rtol, report)

        def write(tmp: Path) -> None:
            nonlocal work
            program = _trace(FlatCache(work, layout), layout, opset, verbose, report)
            tmp = finish_and_save(program.model, tmp, path, target=target, external_data=external_data, force=force,
                                  protect=protect, report=report)
            report.facts["graph_outputs"] = {v.name: [d if isinstance(d, int) else str(d) for d in v.shape]
                                             for v in program.model.graph.outputs}
            del program
            work = None
            with unloadable_as_export_error():
                verified = verify_with_past(model, tmp, layout, providers=providers, atol=atol, rtol=rtol,
                                            decode_steps=decode_steps)
            merge_reports(report, verified)
            report.facts.update(verified.facts)

        write_with_data_cleanup(path, write, force=force, protect=protect)
    report.facts["file_bytes"] = path.stat().st_size
    return report


def _no_cache_example(model: nn.Module, layout: CacheLayout) -> dict:
    """Token ids for the pre-export passes' check, without a cache (its outputs are then tensors)."""
    ids = torch.randint(0, layout.vocab, (_TRACE_BATCH, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "use_cache": False}


def trace_example(layout: CacheLayout) -> tuple[torch.Tensor, ...]:
    """FlatCache's arguments at the traced sizes: batch 2, 3 new tokens after a past of 4."""
    generator = torch.Generator().manual_seed(0)
    b, s, p = _TRACE_BATCH, _TRACE_SEQUENCE, _TRACE_PAST
    ids = torch.randint(0, layout.vocab, (b, s), generator=generator)
    mask = torch.ones(b, p + s, dtype=torch.long)
    positions = (torch.arange(p, p + s).expand(b, s),) if layout.positions else ()
    return (ids, mask, *positions, *layout.empty_past(b, p, generator))


def _trace(wrapper: FlatCache, layout: CacheLayout, opset: int, verbose: bool, report: Report
           ) -> torch.onnx.ONNXProgram:
    """torch.onnx.export (dynamo, optimized) of ``wrapper`` with the file's names and dynamic axes."""
    dims = {name: torch.export.Dim(name) for name in (BATCH, SEQUENCE, PAST, TOTAL)}
    tokens = {0: dims[BATCH], 1: dims[SEQUENCE]}
    past = {0: dims[BATCH], 2: dims[PAST]}
    rest = (*([tokens] if layout.positions else []), *[past] * (2 * layout.layers))  # FlatCache's *rest
    shapes = (tokens, {0: dims[BATCH], 1: dims[TOTAL]}, rest)
    start = time.perf_counter()
    try:
        with quiet(verbose), math_attention(), torch.no_grad():
            program = torch.onnx.export(
                wrapper, trace_example(layout), dynamo=True, opset_version=opset, optimize=True,
                dynamic_shapes=shapes, input_names=layout.input_names, output_names=layout.output_names,
                verbose=verbose, report=False, dump_exported_program=False,
            )
    except Exception as exc:
        raise ExportError(describe_export_failure(exc, wrapper.model, verbose=verbose)) from exc
    report.facts["export_seconds"] = round(time.perf_counter() - start, 3)
    expand_rotary_caches(program.model)
    mask_length = program.model.graph.inputs[1].shape[1]
    if not isinstance(mask_length, int) and str(mask_length) != TOTAL:
        program.rename_axes({str(mask_length): TOTAL})
    return program


# --------------------------------------------------------------------------- verification over decode steps


@dataclass
class _Prompt:
    """A batch of prompts: token ids and attention mask (0 on the left padding)."""

    ids: torch.Tensor
    mask: torch.Tensor


def prompts(layout: CacheLayout, batch: int, length: int = PROMPT_LENGTH, *, seed: int = 0) -> _Prompt:
    """``batch`` random prompts of ``length`` tokens; row ``i`` is left-padded by ``2 * i`` (what batched
    generation feeds: onnxruntime and torch must agree under a real mask too)."""
    ids = torch.randint(0, layout.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : min(2 * row, length - 1)] = 0
    return _Prompt(ids, mask)


def positions_for(mask: torch.Tensor, new: int) -> torch.Tensor:
    """The position ids of the last ``new`` tokens under ``mask``: generate()'s cumulative sum (1 on padding)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)[:, -new:]


def verify_with_past(
    model: nn.Module,
    path: str | Path,
    layout: CacheLayout,
    *,
    providers: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    decode_steps: int = DECODE_STEPS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> Report:
    """Prefill (past of length 0) and ``decode_steps`` greedy steps in torch and in onnxruntime, per batch size.

    Both run the same tokens (torch's greedy choice); onnxruntime is fed its own presents. Each step is a
    check of logits and presents, labelled "onnxruntime cpu vs torch (decode step 2, batch 2, past 8)";
    positions under padding are not compared (:func:`_unpadded`). Under the default tolerances a step that
    fails within the model's own rounding noise (torch's loop replayed in float64 on the same tokens) passes
    with a note, as :func:`~normsurgeon.onnx.verify.verify_onnx` judges.
    """
    report = Report("verify")
    chosen, skipped = runtime.resolve_providers(providers)
    report.notes.extend(skipped)
    sessions = {provider: runtime.session(path, provider) for provider in chosen}
    with eval_mode(model):
        loops = [TorchLoop(functools.partial(_torch_steps, model, layout, prompts(layout, batch), decode_steps))
                 for batch in batch_sizes]
        for provider, sess in sessions.items():
            for loop in loops:
                _check_decode_loop(loop, sess, layout, provider, atol, rtol, report)
    report.facts["providers"] = list(chosen)
    report.facts["batch_sizes_verified"] = sorted(batch_sizes)
    report.facts["decode_steps_verified"] = decode_steps
    return report


@dataclass
class TorchStep:
    """One step of torch's generation loop: its name, the feeds besides the past, torch's outputs by file name,
    the decoder's input ids (None for an encoder) and which file runs it (an index into the caller's sessions)."""

    where: str
    feeds: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    tokens: torch.Tensor | None
    session: int = 0


class TorchLoop:
    """torch's steps (``run(None)``), and the same loop in float64 when a check asks for the rounding noise.

    The float64 loop replays the float32 loop's tokens (``run(tokens)``: the decoder inputs after the first
    decoder step), so both see the same inputs wherever float64 would pick another token.
    """

    def __init__(self, run: Callable[[Sequence[torch.Tensor] | None], list[TorchStep]]) -> None:
        self.run = run
        self.steps = run(None)

    @functools.cached_property
    def exact(self) -> list[TorchStep] | None:
        tokens = [step.tokens for step in self.steps if step.tokens is not None][1:]
        return in_float64(lambda: self.run(tokens))

    def noise(self, index: int) -> float | None:
        """Step ``index``'s float32 rounding noise: its outputs against the float64 loop's."""
        exact = self.exact
        return None if exact is None else noise_between(self.steps[index].reference, exact[index].reference)

    def record(self, report: Report, index: int, produced: dict[str, torch.Tensor], provider: str,
               atol: float | None, rtol: float | None) -> None:
        """Step ``index``'s check of onnxruntime's outputs ``produced`` into ``report``; under the default
        tolerances a failure within the step's rounding noise passes, with a note (:func:`compare_named`)."""
        step = self.steps[index]
        label = f"onnxruntime {provider} vs torch ({step.where})"
        noise = functools.partial(self.noise, index) if atol is None and rtol is None else None
        check, note = compare_named(step.reference, produced, label, atol, rtol, noise=noise)
        report.checks.append(check)
        report.notes.extend([f"{label}: {note}"] if note else [])


def run_step(sess: object, feeds: dict[str, torch.Tensor], names: Sequence[str], where: str
             ) -> dict[str, torch.Tensor]:
    """onnxruntime's outputs for one step of a loop, by ``names``; its failure an ExportError naming the step."""
    try:
        return dict(zip(names, run_torch(sess, feeds)))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/... types
        raise ExportError(f"onnxruntime failed at {where} ({' '.join(str(exc).split())[:200]})") from exc


def _torch_steps(model: nn.Module, layout: CacheLayout, prompt: _Prompt, steps: int,
                 tokens: Sequence[torch.Tensor] | None = None) -> list[TorchStep]:
    """The prefill and ``steps`` decode steps, each on the token chosen greedily (or the given ``tokens``)."""
    from transformers import DynamicCache

    batch = prompt.ids.shape[0]
    ids, mask = prompt.ids, prompt.mask
    cache = DynamicCache(config=model.config)
    loop = []
    for step in range(steps + 1):
        positions = [positions_for(mask, ids.shape[1])] if layout.positions else []
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, **dict(zip(["position_ids"], positions)),
                        **{layout.cache_keyword: cache}, use_cache=True)
        cache = returned_cache(out)
        reference = _unpadded(dict(zip(layout.output_names, (out.logits, *flat_cache(cache)))), mask, ids.shape[1])
        feeds = dict(zip(layout.input_names, (ids, mask, *positions)))
        loop.append(TorchStep(_step_name(step, batch, mask, ids), feeds, reference, tokens=ids))
        if step < steps:
            ids = out.logits[:, -1].argmax(-1, keepdim=True) if tokens is None else tokens[step]
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
    return loop


def _check_decode_loop(loop: TorchLoop, sess: object, layout: CacheLayout, provider: str, atol: float | None,
                       rtol: float | None, report: Report) -> None:
    """onnxruntime over ``loop``'s steps, fed its own presents: each step's check (and note) into ``report``."""
    past = layout.empty_past(loop.steps[0].tokens.shape[0])
    for index, step in enumerate(loop.steps):
        feeds = {**step.feeds, **dict(zip(layout.input_names[len(step.feeds):], past))}
        produced = run_step(sess, feeds, layout.output_names, step.where)
        mask, new = step.feeds["attention_mask"], step.feeds["input_ids"].shape[1]
        loop.record(report, index, _unpadded(produced, mask, new), provider, atol, rtol)
        past = [produced[name] for name in layout.output_names[1:]]


def _unpadded(outputs: dict[str, torch.Tensor], mask: torch.Tensor, new: int) -> dict[str, torch.Tensor]:
    """``outputs`` with the positions under padding zeroed: logits of padded new tokens, presents of padded keys.

    No consumer reads them, and they differ: a padded query attends to nothing, which torch and
    onnxruntime resolve differently below opset 23 (measured 0.05-0.1 on tiny Llama and GPT-2 at opset 18).
    A NaN there would still show: onnxruntime is fed its presents unchanged, and masked keys times NaN
    poison the next step's logits.
    """
    keys = mask.bool()[:, None, :, None]
    queries = mask.bool()[:, -new:, None]
    return {name: torch.where(queries if name == "logits" else keys, value, torch.zeros((), dtype=value.dtype))
            for name, value in outputs.items()}


def _step_name(step: int, batch: int, mask: torch.Tensor, ids: torch.Tensor) -> str:
    past = mask.shape[1] - ids.shape[1]
    return f"prefill, batch {batch}, sequence {ids.shape[1]}" if step == 0 else \
        f"decode step {step}, batch {batch}, past {past}"


__all__ = ["CacheLayout", "FlatCache", "TorchLoop", "TorchStep", "export_with_past", "positions_for", "prompts",
           "run_step", "verify_with_past"]
