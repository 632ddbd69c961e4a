"""The export workers of benchmarks/transformer_onnx.py, each run in a fresh process (issue 18).

Run as a script, ``python benchmarks/transformer_onnx_export.py JOB`` (JOB: JSON with ``variant``, ``folder``,
``out``, ``stats``), so that the python of optimum's own virtual environment (benchmarks/optimum_env.sh), where
normsurgeon is not installed, can run the ``optimum`` worker. Only the standard library is imported at the top.

Every worker writes to the ``stats`` file the wall-clock moment its model was loaded, the RSS then, and the peak
RSS after it: the kernel's high-water mark is reset (``5`` written to /proc/self/clear_refs) right after the
load, so peak minus loaded RSS is what the export needs beyond the loaded model, however small the model. The
hook sits where each tool has loaded the model and not yet started exporting: normsurgeon's ``load_model`` in its
CLI, optimum's ``onnx_export_from_model`` in ``main_export``.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

OPTIMUM_TASKS = {"bert": "feature-extraction"}  # every other model here is a decoder: "text-generation" (no past)


def status_bytes(field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status, in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")
    return int(match.group(1)) * 1024


def mark_loaded(stats: dict[str, Any]) -> None:
    """Record the loaded model's moment and RSS, and restart the peak-RSS count from here."""
    stats["loaded_at"] = time.time()
    stats["loaded_rss_bytes"] = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")


def after(function: Callable[..., Any], hook: Callable[[], None], *, before: bool = False) -> Callable[..., Any]:
    """``function`` with ``hook`` run right after it returns (or right before it is called)."""

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            hook()
        result = function(*args, **kwargs)
        if not before:
            hook()
        return result

    return wrapped


def model_type(folder: str) -> str:
    return json.loads((Path(folder) / "config.json").read_text())["model_type"]


def load(folder: str):
    """The saved model as the benchmark built it: AutoModel for BERT, AutoModelForCausalLM for the decoders."""
    import normsurgeon  # noqa: F401  (before transformers: it declares torchvision operators the CPU torch lacks)
    import transformers

    auto = transformers.AutoModel if model_type(folder) == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder).eval()


def ns_export(job: dict[str, Any], stats: dict[str, Any]) -> None:
    """``normsurgeon export DIR --dynamic`` through its CLI, the peak count restarted once the model is loaded."""
    import normsurgeon.commands.common as common
    from normsurgeon.cli import main

    common.load_model = after(common.load_model, lambda: mark_loaded(stats))
    main(["export", job["folder"], "--dynamic", "-o", job["out"], "--force"], prog_name="normsurgeon")


def torch18_export(job: dict[str, Any], stats: dict[str, Any]) -> None:
    """The stand-in for optimum: torch's dynamo exporter at optimum's opset (18), batch and sequence dynamic."""
    import torch

    from normsurgeon.onnx.export import quiet

    model = load(job["folder"])
    mark_loaded(stats)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    with quiet(), torch.no_grad():
        torch.onnx.export(model, (ids,), dynamo=True, opset_version=18, dynamic_shapes=dims).save(job["out"])


def optimum_export(job: dict[str, Any], stats: dict[str, Any]) -> None:
    """optimum's ``main_export`` as ``optimum-cli export onnx --task ...`` calls it (validation included)."""
    import optimum.exporters.onnx.__main__ as optimum_main

    optimum_main.onnx_export_from_model = after(optimum_main.onnx_export_from_model, lambda: mark_loaded(stats),
                                                before=True)
    task = OPTIMUM_TASKS.get(model_type(job["folder"]), "text-generation")
    optimum_main.main_export(job["folder"], job["out"], task=task)


WORKERS = {"ns": ns_export, "torch18": torch18_export, "optimum": optimum_export}


def main() -> None:
    job = json.loads(sys.argv[1])
    stats: dict[str, Any] = {}
    try:
        WORKERS[job["variant"]](job, stats)
    finally:
        if "loaded_rss_bytes" in stats:
            stats["peak_after_load_bytes"] = status_bytes("VmHWM")
        Path(job["stats"]).write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
