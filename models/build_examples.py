"""Write pickled example models (``torch.save(model)``) built from the registry.

    python -m models.build_examples [--out models/examples] [--names resnet18 mlp ...]

Run from the repository root: the pickles name their classes as ``models.resnet.ResNet``
etc., so they load wherever the repository root is on ``sys.path``. Models with
parametrizations (``hifigan``) cannot be pickled: ``torch.save`` raises for them, and
``hifigan_legacy`` is the picklable variant. Each file is written to a temporary file in
the target folder and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from models import REGISTRY, build

DEFAULT_OUT = Path(__file__).resolve().parent / "examples"
DEFAULT_NAMES = ("resnet18", "mobilenetv2", "mlp")


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_examples(out: Path, names: Sequence[str] = DEFAULT_NAMES) -> list[Path]:
    """Build each named model and pickle it to ``out/<name>.pt``; return the paths written."""
    paths = []
    for name in names:
        model = build(name)
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            raise ValueError(f"{name!r} has parametrizations, which torch cannot pickle")
        path = out / f"{name}.pt"
        save_atomic(model, path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m models.build_examples", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--names", nargs="+", default=list(DEFAULT_NAMES), choices=sorted(REGISTRY),
        metavar="NAME", help=f"models to write (default: {' '.join(DEFAULT_NAMES)})",
    )
    args = parser.parse_args(argv)
    try:
        paths = write_examples(args.out, args.names)
    except ValueError as exc:
        parser.error(str(exc))
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
