"""Running .onnx files in onnxruntime: execution providers, inputs, sessions."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..errors import LoadError, UsageError, first_line
from ..io.inputs import InputSpec, make_inputs
from .inline_save import weights_in_place

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_providers(choice: str) -> tuple[list[str], list[str]]:
    """Short provider names to run (``cpu``, ``cuda``, ``all``) and notes on what was skipped.

    Asking for ``cuda`` where onnxruntime has no CUDAExecutionProvider is a UsageError;
    ``all`` runs what is present and says what it skipped.
    """
    available = set(ort.get_available_providers())
    if choice == "all":
        chosen = [name for name, full in PROVIDERS.items() if full in available]
        skipped = [
            f"{name}: skipped, onnxruntime has no {full} here (install normsurgeon[gpu] on a CUDA machine)"
            for name, full in PROVIDERS.items()
            if full not in available
        ]
        return chosen, skipped
    if choice not in PROVIDERS:
        raise UsageError(f"unknown provider {choice!r}: use one of cpu, cuda, all")
    if PROVIDERS[choice] not in available:
        raise UsageError(
            f"onnxruntime has no {PROVIDERS[choice]} here (it has {', '.join(sorted(available))}); "
            "install normsurgeon[gpu] (onnxruntime-gpu) on a CUDA machine, or use --provider cpu"
        )
    return [choice], []


def session(path: str | Path, provider: str = "cpu", *, optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime session for one provider; an unreadable model is a LoadError.

    The file's large inline weights are read in place (:func:`session_in_place`) where the file has a name in a
    directory; otherwise, or where that fails, onnxruntime reads the file itself. These sessions verify, they are
    not deployed: weight prepacking is off, so onnxruntime's CPU MatMul reads the mapped weights where they lie
    instead of packing a copy of each (0.84x the weights of a Llama held beyond the file; results differ by
    rounding only, 3.5e-6 on a 0.20 B Llama's logits)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    in_place = session_in_place(path, options, provider)
    if in_place is not None:
        return in_place
    try:
        return ort.InferenceSession(str(path), options, providers=[PROVIDERS[provider]])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise LoadError(f"{path}: onnxruntime cannot load it ({first_line(exc)}); re-export the model, e.g. with "
                        "normsurgeon export (default opset 23)") from exc


def session_in_place(path: str | Path, options: ort.SessionOptions, provider: str = "cpu"
                     ) -> ort.InferenceSession | None:
    """A session whose inline weights onnxruntime memory-maps from ``path`` instead of copying them out of the
    parsed file (:func:`~normsurgeon.onnx.inline_save.weights_in_place`): the same graph, the same bytes, held once.

    Parsing an .onnx with its weights inline keeps a second copy of them while the session is built (a 0.20 B
    Llama: +0.96 GB peak, against +0.78 GB in place). None where the file has no name in a directory (an anonymous
    temp file: onnxruntime resolves external data by directory) or where the in-place session cannot be made; the
    caller then loads the file itself, and reports onnxruntime's own error if it fails again."""
    real = Path(os.path.realpath(path))
    if not real.is_file():
        return None
    try:
        model = weights_in_place(real, location=real.name)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(real.parent))
        return ort.InferenceSession(model, options, providers=[PROVIDERS[provider]])
    except Exception:  # a file this reader or onnxruntime refuses: read it the ordinary way, for the real error
        return None


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray | ort.OrtValue]
        ) -> list[tuple[str, np.ndarray | torch.Tensor]]:
    """Run a session; outputs as (name, array) in the graph's order, a bfloat16 one as a torch tensor (numpy
    has no bfloat16; such an input is fed as an OrtValue, see :func:`ort_value`)."""
    names = [o.name for o in sess.get_outputs()]
    bfloat16 = any(o.type == "tensor(bfloat16)" for o in sess.get_outputs())
    if not bfloat16 and not any(isinstance(v, ort.OrtValue) for v in feeds.values()):
        return list(zip(names, sess.run(names, feeds)))
    values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    outputs = sess.run_with_ort_values(names, values)
    return [(name, to_torch(value) if value.data_type() == "tensor(bfloat16)" else np.array(value.numpy()))
            for name, value in zip(names, outputs)]


def run_torch(sess: ort.InferenceSession, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run ``sess`` on torch tensors; its outputs as torch tensors (in graph order), any dtype, bfloat16 included."""
    outputs = run(sess, {name: ort_value(t) for name, t in feeds.items()})
    return [value if isinstance(value, torch.Tensor) else torch.from_numpy(value) for _, value in outputs]


def ort_value(tensor: torch.Tensor) -> ort.OrtValue:
    """An onnxruntime CPU value holding ``tensor``: numpy has no bfloat16, so those go as their raw bits."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        bits = tensor.view(torch.int16).numpy().view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(tensor.numpy())


def to_torch(value: ort.OrtValue) -> torch.Tensor:
    """A copy of a CPU onnxruntime tensor as torch, bfloat16 included (``OrtValue.numpy()`` refuses that)."""
    if value.data_type() != "tensor(bfloat16)":
        return torch.from_numpy(np.array(value.numpy()))
    bits = np.frombuffer(bytearray(ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())), np.int16)
    return torch.from_numpy(bits).view(torch.bfloat16).reshape(value.shape())




def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an .onnx file (and its external data), or a LoadError naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{path}: is a directory, not an .onnx file; pass the .onnx file itself")
    if not path.is_file():
        raise LoadError(f"{path}: no such file; check the path")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise LoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}); re-export it, or check "
                        "that the file is complete and is an .onnx model") from exc
    if not model.graph.node and not model.graph.output:
        raise LoadError(f"{path}: not a readable ONNX model (empty graph); re-export it, or check that the file is "
                        "complete")
    return model


_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.UINT8: torch.uint8,
}


def random_feeds(model: onnx.ModelProto, shapes: Sequence[tuple[int, ...]] = (), *,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a graph's declared inputs; ``shapes`` (in input order) fill symbolic dims.

    Drawn like every command's ``--input-shape`` inputs (:func:`normsurgeon.io.inputs.make_inputs`), in
    the dtype each input declares. A symbolic dimension with no shape given is a UsageError naming
    the input and ``--input-shape``.
    """
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if shapes and len(shapes) != len(inputs):
        raise UsageError(f"the model has {len(inputs)} inputs but {len(shapes)} --input-shape were given")
    specs = [InputSpec(tuple(shapes[index]) if shapes else _static_shape(graph_input), _dtype(graph_input))
             for index, graph_input in enumerate(inputs)]
    return {graph_input.name: tensor.numpy() for graph_input, tensor in zip(inputs, make_inputs(specs, seed=seed))}


def _static_shape(graph_input: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
    if any(d is None for d in dims):
        symbolic = [d.dim_param or "?" for d in graph_input.type.tensor_type.shape.dim if not d.HasField("dim_value")]
        example = ",".join(str(d) if d is not None else "1" for d in dims)
        raise UsageError(
            f"input {graph_input.name!r} has symbolic dims ({', '.join(symbolic)}); "
            f"pass --input-shape for each input, e.g. --input-shape {example} for this one"
        )
    return tuple(dims)


def _dtype(graph_input: onnx.ValueInfoProto) -> torch.dtype:
    dtype = _TORCH_DTYPES.get(graph_input.type.tensor_type.elem_type)
    if dtype is None:
        raise UsageError(f"input {graph_input.name!r} has an element type normsurgeon cannot generate; use --inputs")
    return dtype
