"""Hugging Face ``save_pretrained`` directories and safetensors files, opened without running their code.

A ``save_pretrained`` directory holds ``config.json`` and weights (``model.safetensors``, sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``). The model is rebuilt by transformers
from the local config, offline, from the class named in ``config.architectures``, which must be
one of transformers' own classes: a config that asks for custom code (``auto_map``) is refused,
since normsurgeon never runs a repository's code. safetensors holds tensors only; a
``pytorch_model.bin`` is checked by the same tensor-only scan as an inputs file before
transformers reads it weights-only.

A lone ``.safetensors`` file with ``--config`` (a folder holding config.json, or the file itself)
is built the same way from that config, then loaded strictly: every key the model has, none it
has not, every shape the same (a weight transformers ties to another, such as a tied lm_head,
may be absent, as save_pretrained leaves it).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normsurgeon.errors import LoadError, UnsafePickleError, UsageError

from .pickle_safety import check_pickle, one_line
from .safetensors_shards import MAX_HEADER_BYTES

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_MAX_CONFIG_BYTES = 16 * 1024 * 1024


def pretrained_dir_of(path: Path) -> Path | None:
    """The save_pretrained directory ``path`` is or lies in (its config.json or a weights file), else None."""
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name != CONFIG and path.name not in WEIGHT_FILES and not _is_shard(path):
        return None
    if (folder / CONFIG).is_file() and any((folder / name).is_file() for name in WEIGHT_FILES):
        return folder
    return None


def _is_shard(path: Path) -> bool:
    return path.name.startswith(("model-", "pytorch_model-")) and path.suffix in (".safetensors", ".bin")


def is_safetensors(path: Path) -> bool:
    """True when ``path`` starts like a safetensors file: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state_dict (tensors only: nothing in it can run)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{path}: not a readable safetensors file ({one_line(exc, 120)}); re-save it") from exc


def load_pretrained_dir(folder: Path) -> nn.Module:
    """Build the model of a save_pretrained directory with transformers, offline, in eval mode."""
    transformers = import_transformers(folder)
    config = read_config(folder / CONFIG)
    model_class = model_class_of(transformers, config, folder)
    _check_pickled_weights(folder)
    with offline(), quiet_transformers():
        try:
            model = model_class.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # transformers explains missing or mismatched weights in its message
            raise LoadError(f"{folder}: transformers could not load it ({type(exc).__name__}: "
                            f"{one_line(exc, 160)}); check config.json and the weight files") from exc
    return model.eval()


def config_file(config: Path) -> Path:
    """The config.json that ``--config`` names: the file itself, or config.json in the folder given."""
    path = config / CONFIG if config.is_dir() else config
    if not path.is_file():
        raise UsageError(f"--config {config}: no {CONFIG} there; pass the save_pretrained folder that holds it, "
                         f"or the {CONFIG} file itself")
    return path


def model_for_safetensors(path: Path, config: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The transformers model that ``config`` (a config.json) describes, built offline in the floating dtype of
    the safetensors file ``path`` (weights not yet loaded), and the file's state_dict with the keys the model
    ties to one the file holds filled in: what :func:`normsurgeon.io.loading.load_strict` then loads."""
    transformers = import_transformers(path)
    model_class = model_class_of(transformers, read_config(config), config)
    state_dict = load_safetensors(path)
    with offline(), quiet_transformers():
        try:
            built = transformers.AutoConfig.from_pretrained(str(config), local_files_only=True, trust_remote_code=False)
            model = model_class.from_config(built) if model_class is transformers.AutoModel \
                else model_class._from_config(built)
        except Exception as exc:  # a config transformers cannot build a model from
            raise LoadError(f"{config}: transformers could not build {model_class.__name__} from it "
                            f"({type(exc).__name__}: {one_line(exc, 160)}); check the config") from exc
    _to_file_dtype(model, state_dict)
    return model, _with_tied(model, state_dict)


def _with_tied(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` plus the keys the model ties to one it holds (the same tensor), which save_pretrained omits."""
    mine = model.state_dict()
    by_storage = {(t.data_ptr(), t.shape): key for key, t in mine.items() if key in state_dict and t.numel()}
    tied = {key: state_dict[by_storage[(t.data_ptr(), t.shape)]] for key, t in mine.items()
            if key not in state_dict and t.numel() and (t.data_ptr(), t.shape) in by_storage}
    return {**state_dict, **tied}


def _to_file_dtype(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """The file's floating dtype when all its floating tensors share one (as from_pretrained's dtype="auto")."""
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())


def import_transformers(path: Path) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise LoadError(f"{path}: a Hugging Face model needs transformers; pip install transformers") from exc
    return transformers


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; one that asks for custom code (auto_map) is refused."""
    folder = path.parent
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise LoadError(f"{path}: {path.stat().st_size} bytes is not a model config; check the directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path}: not valid JSON ({one_line(exc, 80)}); re-save the model with save_pretrained") from exc
    if not isinstance(config, dict):
        raise LoadError(f"{path}: holds {type(config).__name__}, not a config object; re-save with save_pretrained")
    if config.get("auto_map"):
        raise UnsafePickleError(
            f"{folder}: config.json asks for custom code (auto_map: {one_line(config['auto_map'], 80)}); "
            "normsurgeon never runs a repository's code. Load the model in Python and torch.save it, "
            "or pass its weights with --factory module:callable"
        )
    return config


def model_class_of(transformers: Any, config: dict[str, Any], where: Path) -> Any:
    """The transformers class named by ``architectures`` (or AutoModel for the config's model type)."""
    names = config.get("architectures") or []
    for name in names:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if names:
        raise LoadError(f"{where}: config.json names architectures {names}, which transformers "
                        f"{transformers.__version__} does not have; upgrade transformers or fix 'architectures'")
    return transformers.AutoModel


def _check_pickled_weights(folder: Path) -> None:
    """pytorch_model.bin files are pickles: the same tensor-only verdict as an inputs file, before transformers."""
    for path in sorted(folder.glob("pytorch_model*.bin")):
        check_pickle(path, allow_classes=False)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load tables from transformers on stderr: the report says what was loaded."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No network while transformers reads the directory (it would otherwise look up remote files)."""
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
