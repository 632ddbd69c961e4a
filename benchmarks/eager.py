"""Eager PyTorch inference latency: original vs torch.fx fuse vs normsurgeon fold vs the limit.

For each model and batch size, four networks are timed interleaved in one process (see
:mod:`benchmarks.timing`) and reported as a ratio to the norm-free limit (the network with
every BN normsurgeon folded replaced by ``nn.Identity``):

* ``original`` — the trained model as the user has it;
* ``fx_fuse`` — ``torch.fx.experimental.optimization.fuse(model)``; when it cannot trace the
  model, or its result differs from the original, that is recorded instead of a time;
* ``normsurgeon`` — ``fold_batchnorm(model, inputs)`` on a copy;
* ``limit_bias`` — the limit plus a bias in every layer normsurgeon folded into that had
  none: the cheapest network a fold can produce that leaves each BN's shift as a bias;
* ``limit_again`` — a second copy of the limit: an A/A control, whose distance from 1 is the
  resolution of the measurement;
* ``limit`` — the norm-free limit, the baseline (ratio 1).
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch.fx.experimental.optimization import fuse as fx_fuse

from benchmarks.subjects import (
    Subject,
    called_batchnorms,
    count_batchnorms,
    max_rel_diff,
    norm_free_limit,
    with_biases,
)
from benchmarks.timing import interleaved
from normsurgeon import fold_batchnorm

METHODS = ("original", "fx_fuse", "normsurgeon", "limit_bias", "limit_again", "limit")
WRONG_OUTPUT = 1e-3  # relative max difference above which a fused model counts as wrong


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''}".rstrip(": ")


def prepare_variants(subject: Subject) -> dict[str, Any]:
    """Build the original, its fx-fused and normsurgeon-folded copies and its limit, with notes."""
    original = subject.build().eval()
    fold_inputs = subject.inputs(2)
    folded = copy.deepcopy(original)
    report = fold_batchnorm(folded, fold_inputs)
    folded_paths = [change.module for change in report.changed("folded")]
    limit = norm_free_limit(original, folded_paths)
    check_inputs = subject.inputs(3)
    with torch.no_grad():
        reference = original(*check_inputs)
    variants: dict[str, Any] = {
        "original": {"model": original, "norms_left": count_batchnorms(original), "status": "ok"},
        "normsurgeon": {
            "model": folded,
            "norms_left": count_batchnorms(folded),
            "status": "ok",
            "note": "; ".join(f"{s.module}: {s.reason.name}" for s in report.skipped),
        },
        "limit": {"model": limit, "norms_left": count_batchnorms(limit), "status": "ok"},
        "limit_again": {"model": copy.deepcopy(limit), "norms_left": count_batchnorms(limit), "status": "ok"},
        "limit_bias": {
            "model": with_biases(limit, [c.into for c in report.changed("folded") if c.into]),
            "norms_left": count_batchnorms(limit),
            "status": "ok",
        },
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = fx_fuse(original)
    except Exception as exc:  # noqa: BLE001 - whatever fx.fuse raises is what users meet: record it
        variants["fx_fuse"] = {"model": None, "norms_left": None, "status": "fails", "note": _first_line(exc)}
    else:
        with torch.no_grad():
            diff = max_rel_diff(reference, fused(*check_inputs))
        wrong = not diff <= WRONG_OUTPUT
        variants["fx_fuse"] = {
            "model": fused,
            "norms_left": called_batchnorms(fused),
            "status": "wrong output" if wrong else "ok",
            "max_rel_diff": diff,
            "note": f"max rel diff {diff:.2g} vs original" if wrong else "",
        }
    with torch.no_grad():
        variants["normsurgeon"]["max_rel_diff"] = max_rel_diff(reference, folded(*check_inputs))
    variants["bn_total"] = count_batchnorms(original)
    return variants


def run_eager(subjects: list[Subject], *, batches: tuple[int, ...], rounds: int, min_block_s: float) -> list[dict]:
    """One row per (model, batch): each method's ratio to the limit and the norms it left."""
    logging.getLogger("torch.fx").setLevel(logging.ERROR)
    rows = []
    for subject in subjects:
        variants = prepare_variants(subject)
        for batch in batches:
            inputs = subject.inputs(batch)
            candidates = {}
            for name in METHODS:
                model = variants[name]["model"]
                if model is not None and variants[name]["status"] == "ok":
                    candidates[name] = (lambda m=model, x=inputs: m(*x))
            with torch.inference_mode():
                timings = interleaved(candidates, baseline="limit", rounds=rounds, min_block_s=min_block_s)
            methods = {}
            for name in METHODS:
                info = variants[name]
                methods[name] = {
                    "norms_left": info["norms_left"],
                    "status": info["status"],
                    "note": info.get("note", ""),
                    "max_rel_diff": info.get("max_rel_diff"),
                    **(timings[name].to_dict() if name in timings else {}),
                }
            rows.append({
                "model": subject.name, "source": subject.source, "batch": batch,
                "bn_total": variants["bn_total"], "methods": methods,
            })
            print(f"  eager {subject.name} b{batch}: " + ", ".join(
                f"{n} {m['ratio']:.3f}" if "ratio" in m else f"{n} {m['status']}" for n, m in methods.items()
            ), flush=True)
    return rows
