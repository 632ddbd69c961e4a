"""Mutated torch.save files (hypothesis): each either loads as a model built from the original's classes,
or is refused with a one-line LoadError; never another exception, never a hang, never code of its choosing."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from normsurgeon.errors import LoadError
from normsurgeon.io.loading import load_model

from .conftest import TIME_LIMIT_S, mutate

MODEL = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
CLASSES = {type(m) for m in MODEL.modules()}

mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.floats(0, 1, exclude_max=True),
                     st.integers(0, 255))


class Originals(dict):
    """The valid files, by format (a short repr: hypothesis prints its arguments on failure)."""

    def __repr__(self) -> str:
        return f"Originals({', '.join(self)})"


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Originals:
    folder = tmp_path_factory.mktemp("originals")
    files = Originals()
    for name, zip_format in (("zip", True), ("legacy", False)):
        torch.save(MODEL, folder / name, _use_new_zipfile_serialization=zip_format)
        files[name] = (folder / name).read_bytes()
    return files


def rewrite_data_pkl(original: bytes, edits: list, path: Path) -> None:
    path.write_bytes(original)
    with zipfile.ZipFile(path) as zin:
        members = [(info, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w") as zout:
        for info, data in members:
            zout.writestr(info, mutate(data, edits) if info.filename.endswith("data.pkl") else data)


def check_outcome(path: Path) -> None:
    start = time.perf_counter()
    try:
        loaded = load_model(path).model
    except LoadError as error:
        assert "\n" not in str(error)
    else:
        assert {type(m) for m in loaded.modules()} <= CLASSES
    assert time.perf_counter() - start < TIME_LIMIT_S


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_zip_pickles_load_or_are_refused(edits: list, originals: dict[str, bytes], tmp_path: Path) -> None:
    path = tmp_path / "mutated.pt"
    rewrite_data_pkl(originals["zip"], edits, path)
    check_outcome(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_legacy_files_load_or_are_refused(edits: list, originals: dict[str, bytes], tmp_path: Path) -> None:
    path = tmp_path / "mutated.pt"
    path.write_bytes(mutate(originals["legacy"], edits))
    check_outcome(path)
