"""Example inputs for tracing and checking: ``--input-shape``, ``--inputs FILE``, or inference.

``--input-shape 1,3,224,224`` makes a random float tensor; ``1,16:int64`` makes integer ids
(below the smallest ``nn.Embedding`` size in the model, so token ids are valid). ``--inputs``
loads a saved tensor, tuple/list of tensors (positional) or dict (keyword arguments). With
neither, inputs are inferred only when the first layer makes them unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..inputs import ExampleInputs, InputsLike, PlainInputs, forward_parameters
from ..walk import check_nesting

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "bool": torch.bool, "uint8": torch.uint8,
}
_INFERRED_IMAGE_SIZE = 224


@dataclass(frozen=True)
class InputSpec:
    """One example input: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


def parse_input_shape(spec: str) -> InputSpec:
    """Parse ``1,3,224,224`` (or ``1x3x224x224``) or ``1,16:int64``; every dim must be given."""
    shape_text, _, dtype_text = spec.partition(":")
    try:  # an empty dim ('1,,3', '1,x', a trailing comma) is an error, not silently dropped
        shape = tuple(int(d) for d in shape_text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(
            f"bad --input-shape {spec!r}: every dim must be a positive integer; give the full shape, e.g. "
            "1,3,224,224, or 1,16:int64 for integer ids"
        )
    dtype_name = dtype_text.strip().lower() or "float32"
    if dtype_name not in _DTYPES:
        raise UsageError(f"bad dtype {dtype_name!r} in --input-shape {spec!r}; use one of {', '.join(sorted(_DTYPES))}")
    return InputSpec(shape, _DTYPES[dtype_name])


def make_inputs(specs: Sequence[InputSpec], model: nn.Module | None = None, *, seed: int = 0) -> tuple:
    """Random tensors for the given specs; integer inputs stay below the model's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    high = _smallest_vocabulary(model) if model is not None else 2
    tensors = []
    for spec in specs:
        if spec.dtype.is_floating_point:
            tensors.append(torch.randn(spec.shape, generator=generator).to(spec.dtype))
        elif spec.dtype == torch.bool:
            tensors.append(torch.randint(0, 2, spec.shape, generator=generator).bool())
        else:
            tensors.append(torch.randint(0, high, spec.shape, generator=generator, dtype=spec.dtype))
    return tuple(tensors)


def _smallest_vocabulary(model: nn.Module) -> int:
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return min(sizes) if sizes else 2


def to_model_dtype_and_device(inputs: InputsLike, model: nn.Module) -> PlainInputs:
    """A tuple or dict of inputs on the model's device, floats in its floating dtype (for data batches)."""
    return ExampleInputs.of(inputs).like(model).plain()


def infer_inputs(model: nn.Module) -> ExampleInputs:
    """Inputs from the model's own config (transformers, timm), or from a first layer that leaves no
    doubt; a UsageError asking for them otherwise."""
    from_config = inputs_from_config(model)
    if from_config is not None:
        return from_config
    first = next((m for m in model.modules() if next(m.children(), None) is None and any(True for _ in m.parameters(recurse=False))), None)
    if isinstance(first, nn.Conv2d) and not isinstance(first, nn.LazyConv2d):
        shape = (1, first.in_channels, _INFERRED_IMAGE_SIZE, _INFERRED_IMAGE_SIZE)
    elif isinstance(first, nn.Linear) and not isinstance(first, nn.LazyLinear):
        shape = (1, first.in_features)
    else:
        kind = type(first).__name__ if first is not None else "no layer with parameters"
        raise UsageError(
            f"cannot infer example inputs (the first layer is {kind}); "
            "pass --input-shape 1,3,224,224 (repeatable, ':int64' for ids) or --inputs FILE.pt"
        )
    spec = InputSpec(shape)
    text = ",".join(map(str, shape))
    return ExampleInputs.of(make_inputs([spec]), f"assumed one random input of shape {text} from the first layer "
                            f"{type(first).__name__}; pass --input-shape to choose").like(model)


def resolve_inputs(
    model: nn.Module,
    *,
    input_shapes: Sequence[str] = (),
    inputs_file: str | Path | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
) -> ExampleInputs:
    """Example inputs from the CLI options (exactly one source), or inferred."""
    if input_shapes and inputs_file:
        raise UsageError("give either --input-shape or --inputs, not both")
    if inputs_file:
        from .loading import load_tensors

        loaded = load_tensors(inputs_file, trust_pickle=trust_pickle)
        # A cycle or absurd depth is refused in one line; a DAG is fine: every later walk visits it once.
        check_nesting(loaded, str(inputs_file))
        if isinstance(loaded, torch.Tensor):
            loaded = (loaded,)
        if not isinstance(loaded, (tuple, list, dict)):
            raise UsageError(f"{inputs_file}: expected a tensor, a tuple/list or a dict of tensors, got {type(loaded).__name__}")
        return ExampleInputs.of(loaded, f"inputs from {inputs_file}").like(model)
    if input_shapes:
        specs = [parse_input_shape(s) for s in input_shapes]
        described = "; ".join(",".join(map(str, s.shape)) + f":{str(s.dtype).removeprefix('torch.')}" for s in specs)
        return ExampleInputs.of(make_inputs(specs, model, seed=seed), f"random inputs {described}").like(model)
    return infer_inputs(model)


_TEXT_LENGTH = 16
_DECODER_LENGTH = 8


def inputs_from_config(model: nn.Module) -> ExampleInputs | None:
    """What a transformers model (``config`` + ``main_input_name``) or a timm model (``pretrained_cfg``) takes.

    Token ids for text (and decoder ids for an encoder-decoder), pixel values at the config's image
    size, raw audio or mel features for speech; one sample, random values, in the model's dtype.
    """
    config, main = getattr(model, "config", None), getattr(model, "main_input_name", None)
    if config is not None and isinstance(main, str):
        built = _transformers_inputs(model, config, main)
        if built is not None:
            args, what = built
            return ExampleInputs.of(args, f"inferred from the model's config: {what}; pass --input-shape or --inputs "
                                    "to choose").like(model)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(d, int) and d > 0 for d in size):
        shape = (1, *size)
        return ExampleInputs.of(make_inputs([InputSpec(shape)]), f"inferred from timm's pretrained_cfg: one image of "
                                f"shape {','.join(map(str, shape))}; pass --input-shape to choose").like(model)
    return None


def _transformers_inputs(model: nn.Module, config: object, main: str) -> tuple[dict, str] | None:
    generator = torch.Generator().manual_seed(0)
    vocabulary = _smallest_vocabulary(model)

    def ids(length: int) -> torch.Tensor:
        return torch.randint(0, vocabulary, (1, length), generator=generator)

    if main == "input_ids":
        args = {"input_ids": ids(_TEXT_LENGTH)}
        what = f"token ids 1x{_TEXT_LENGTH}"
    elif main == "pixel_values":
        side = getattr(config, "image_size", _INFERRED_IMAGE_SIZE)
        height, width = (side, side) if isinstance(side, int) else tuple(side)[:2]
        channels = getattr(config, "num_channels", 3)
        args = {"pixel_values": torch.randn(1, channels, height, width, generator=generator)}
        what = f"pixel values 1x{channels}x{height}x{width}"
    elif main == "input_values":
        shape, what = _audio_shape(config)
        args = {"input_values": torch.randn(shape, generator=generator)}
    elif main == "input_features":
        bins, frames = getattr(config, "num_mel_bins", 80), 2 * getattr(config, "max_source_positions", 1500)
        args = {"input_features": torch.randn(1, bins, frames, generator=generator)}
        what = f"mel features 1x{bins}x{frames}"
    else:
        return None
    if getattr(config, "is_encoder_decoder", False):
        args["decoder_input_ids"] = ids(_DECODER_LENGTH)
        what += f" and decoder ids 1x{_DECODER_LENGTH}"
    if "use_cache" in forward_parameters(model):  # the no-cache forward: a KV cache is no tensor (and no ONNX output)
        args["use_cache"] = False
        what += ", use_cache=False"
    return args, what


_SAMPLING_RATE = 16000


def _audio_shape(config: object) -> tuple[tuple[int, ...], str]:
    """One second of raw audio at the config's sampling rate: (batch, length), or (batch, channels, length) for
    codecs whose config states ``audio_channels`` (EnCodec, Mimi)."""
    rate = getattr(config, "sampling_rate", None)
    rate = rate if isinstance(rate, int) and rate > 0 else _SAMPLING_RATE
    channels = getattr(config, "audio_channels", None)
    if isinstance(channels, int) and channels > 0:
        return (1, channels, rate), f"one second of {rate} Hz audio, {channels} channel(s), 1x{channels}x{rate}"
    return (1, rate), f"one second of {rate} Hz audio, 1x{rate}"
