"""Streamed surgery on a save_pretrained folder: peak RSS and wall time against depth (issue 17).

``normsurgeon fold DIR --affine --stream -o OUT --json`` edits a sharded safetensors folder one
decoder block at a time. Its goals: peak RSS at most 1.5 x (largest decoder block + embedding,
final norm and head) plus a fixed overhead, whatever the depth; wall time at most 2 x reading and
writing the checkpoint once (``cp -r``); and it runs under a memory limit smaller than the checkpoint.

Checkpoints: ``transformers`` LlamaForCausalLM of one width (:data:`WIDTH`: hidden 2048,
intermediate 5632, 16 heads, vocab 32000, untied head, float32) at :data:`DEPTHS` layers, random
weights (``torch.manual_seed(0)``, N(0, 0.02), norm scales U(0.5, 1.5) so folding them changes
every linear), written by ``save_pretrained(max_shard_size="500MB")`` in a process of their own and
cached under ``--cache`` (``/tmp/ns_stream_bench``; 0.9 to 3.8 GB each, 8.3 GB in all).

For each checkpoint, every command in a fresh process, one torch thread, each read once first so
both run with the checkpoint in the page cache (dropping the cache needs a privilege this
benchmark does not take), and ``sync`` (untimed) after each writer:

* ``cp -r DIR COPY`` -- its wall time: reading and writing the checkpoint once;
* the stream -- its wall time and peak RSS (``ru_maxrss`` of that child, from ``os.wait4``; it counts
  the shards' pages while they are mapped to be read);
* sizes from the safetensors headers: the largest block and the ends (everything outside the
  block stack: embedding, final norm, head).

The fixed overhead is the peak RSS of a process that imports normsurgeon, torch and transformers'
Llama and does nothing. On the deepest checkpoint the stream also runs under ``prlimit --data``
(RLIMIT_DATA: the private writable memory the process may map — its tensors, heap and allocator
reservations; the read-only mapped shards are not counted, their pages are the page cache's) at
:data:`LIMITS`, all below the checkpoint's size. (An address-space limit, ``--as``, also counts the
shards mapped for reading and torch's and glibc's reservations: ~3.5 GB here whatever the depth.) On ``--logits-depth`` the written folder
and the original are loaded whole by ``from_pretrained`` and their logits compared on 16 tokens::

    python -m benchmarks.stream_memory                 # ~9 min on 2 cores (building the checkpoints: ~2 min)
    python -m benchmarks.stream_memory --depths 2 4 --no-limit --logits-depth 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
RESULTS = _ROOT / "benchmarks" / "results" / "stream_memory.json"
CACHE = Path("/tmp/ns_stream_bench")
WIDTH = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
         "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 64}
DEPTHS = (2, 4, 8, 16)
SHARD = "500MB"
LIMITS = (int(1.5 * 2**30), 2 << 30)  # RLIMIT_DATA limits tried on the deepest checkpoint (bytes)
IDLE = "import normsurgeon, torch, transformers; from transformers import LlamaForCausalLM"
COLUMNS = ("layers", "checkpoint (GB)", "largest block (MB)", "ends (MB)", "peak RSS (MB)", "RSS / (block + ends)",
           "(RSS - fixed) / (block + ends)", "peak address space (MB)", "stream wall (s)", "cp wall (s)", "wall / cp",
           "stream + sync (s)", "cp + sync (s)", "(wall + sync) / (cp + sync)", "passed")


# --------------------------------------------------------------------------- in a worker


def build_checkpoint(folder: Path, layers: int, width: dict | None = None, shard: str = SHARD) -> None:
    """A random-weight LlamaForCausalLM of ``layers`` layers saved to ``folder`` by save_pretrained (sharded)."""
    import torch

    import normsurgeon  # noqa: F401  (before transformers)
    import transformers
    from transformers.initialization import no_init_weights

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(width or WIDTH), num_hidden_layers=layers)
    with no_init_weights():
        model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.02)
    staging = folder.with_name(folder.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size=shard, safe_serialization=True)
    staging.rename(folder)


def logits_difference(original: Path, written: Path, tokens: int = 16) -> float:
    """The largest absolute difference of the two folders' logits (from_pretrained, float32) on ``tokens`` ids."""
    import torch

    import normsurgeon  # noqa: F401  (before transformers)
    import transformers

    torch.set_num_threads(1)
    ids = torch.randint(0, WIDTH["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(1))
    logits = []
    for folder in (original, written):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
        del model
    return (logits[0] - logits[1]).abs().max().item()


# --------------------------------------------------------------------------- in the parent


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": str(_ROOT), "TRANSFORMERS_VERBOSITY": "error"}


def timed(command: list[str]) -> dict:
    """Run ``command`` in a child process: its exit status, wall seconds, peak RSS and peak address space (bytes,
    ``VmPeak`` as last read every 20 ms), stdout and stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=_ROOT, env=_env(), stdout=out, stderr=err, text=True)
        vm_peak = 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # reaped here, with that child's own rusage
            if pid:
                break
            vm_peak = max(vm_peak, _vm_peak(child.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"rc": child.returncode, "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024,
                "peak_vm_bytes": vm_peak, "stdout": out.read(), "stderr": err.read()}


def _vm_peak(pid: int) -> int:
    """``VmPeak`` of a running process in bytes (0 once it is gone or a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmPeak:")), 0)


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.stream_memory", *args]


def ensure_checkpoint(cache: Path, layers: int) -> Path:
    """The cached checkpoint of ``layers`` layers, built in a process of its own when missing."""
    folder = cache / f"llama-{layers}"
    if not folder.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        done = timed(_worker("--build", str(folder), str(layers)))
        if done["rc"]:
            raise RuntimeError(f"building {folder} failed: {done['stderr'][-2000:]}")
    return folder


def sizes(folder: Path) -> dict[str, int]:
    """The checkpoint's bytes, its largest block's and its ends' (tensors outside the block stack), from the headers."""
    import normsurgeon  # noqa: F401  (before transformers)
    from normsurgeon.streaming.skeleton import blueprint

    plan = blueprint(folder)
    entries = plan.checkpoint.entries
    blocks = [sum(entries[name].nbytes for name in plan.block_names(index)) for index in range(plan.count)]
    return {"checkpoint_bytes": sum(entry.nbytes for entry in entries.values()), "largest_block_bytes": max(blocks),
            "ends_bytes": sum(entries[name].nbytes for name in plan.end_names), "layers": plan.count}


def _read_once(folder: Path) -> None:
    """Every file of ``folder`` read once, so the run that follows finds it in the page cache."""
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def _sync() -> float:
    """Seconds ``sync`` takes: writing back what the command before left in the page cache."""
    start = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def stream_command(folder: Path, output: Path, limit: int | None = None) -> list[str]:
    """``normsurgeon fold FOLDER --affine --stream -o OUTPUT --json`` (under ``prlimit --data=LIMIT`` when given:
    the process's private writable memory, what its tensors and heap take; mapped shards are not counted)."""
    command = [sys.executable, "-m", "normsurgeon", "fold", str(folder), "--affine", "--stream", "-o", str(output),
               "--json"]
    return ["prlimit", f"--data={limit}", *command] if limit else command


def run_stream(folder: Path, output: Path, limit: int | None = None) -> dict:
    """One streamed fold of ``folder`` (warm), its output removed afterwards: wall, peak RSS, passed, and the
    report's last lines when it failed."""
    shutil.rmtree(output, ignore_errors=True)
    _read_once(folder)
    done = timed(stream_command(folder, output, limit))
    report = _report(done["stdout"])
    row = {"rc": done["rc"], "wall_s": round(done["wall_s"], 2), "sync_s": round(_sync(), 2),
           "peak_rss_bytes": done["peak_rss_bytes"], "peak_vm_bytes": done["peak_vm_bytes"],
           "passed": done["rc"] == 0 and bool(report.get("passed"))}
    if report:
        row["report"] = {key: report[key] for key in ("checks", "facts") if key in report}
    if done["rc"]:
        row["stderr_tail"] = done["stderr"][-600:]
    return row


def _report(stdout: str) -> dict:
    try:
        return json.loads(stdout)
    except ValueError:
        return {}


def run_cp(folder: Path, copy: Path) -> tuple[float, float]:
    """Wall seconds of ``cp -r FOLDER COPY`` (warm; the copy removed afterwards) and of the ``sync`` after it."""
    shutil.rmtree(copy, ignore_errors=True)
    _read_once(folder)
    done = timed(["cp", "-r", str(folder), str(copy)])
    synced = _sync()
    shutil.rmtree(copy, ignore_errors=True)
    if done["rc"]:
        raise RuntimeError(f"cp failed: {done['stderr']}")
    return done["wall_s"], synced


def fixed_overhead() -> dict:
    """Peak RSS, peak address space (bytes) and wall seconds of a process that imports normsurgeon, torch and
    transformers' Llama and does nothing."""
    done = timed([sys.executable, "-c", IDLE])
    if done["rc"]:
        raise RuntimeError(done["stderr"][-2000:])
    return {"peak_rss_bytes": done["peak_rss_bytes"], "peak_vm_bytes": done["peak_vm_bytes"],
            "wall_s": round(done["wall_s"], 2)}


def measure_depth(folder: Path, scratch: Path, overhead: int, reps: int = 1) -> dict:
    """One table row: sizes, the stream's peak RSS and wall, cp's wall (medians of ``reps``, interleaved), the
    ratios."""
    row: dict = sizes(folder)
    copies, streams = [], []
    for _ in range(reps):
        copies.append(run_cp(folder, scratch / "copy"))
        streams.append(run_stream(folder, scratch / "out"))
        shutil.rmtree(scratch / "out", ignore_errors=True)
    row.update(streams[0])
    for key in ("wall_s", "sync_s", "peak_rss_bytes", "peak_vm_bytes"):
        row[key] = statistics.median(s[key] for s in streams)
    row["passed"] = all(s["passed"] for s in streams)
    row["wall_s_all"] = [s["wall_s"] for s in streams]
    row["cp_wall_s_all"] = [round(wall, 2) for wall, _ in copies]
    row["cp_wall_s"] = round(statistics.median(wall for wall, _ in copies), 2)
    row["cp_sync_s"] = round(statistics.median(synced for _, synced in copies), 2)
    row["wall_with_sync_over_cp_with_sync"] = round((row["wall_s"] + row["sync_s"]) / (row["cp_wall_s"]
                                                                                      + row["cp_sync_s"]), 2)
    ends = row["largest_block_bytes"] + row["ends_bytes"]
    row["rss_over_block_and_ends"] = round(row["peak_rss_bytes"] / ends, 2)
    row["rss_less_fixed_over_block_and_ends"] = round((row["peak_rss_bytes"] - overhead) / ends, 2)
    row["wall_over_cp"] = round(row["wall_s"] / row["cp_wall_s"], 2)
    return row


def under_limits(folder: Path, scratch: Path, limits: tuple[int, ...]) -> list[dict]:
    """The stream of ``folder`` under each RLIMIT_DATA limit: did it pass, its wall and peak RSS."""
    rows = []
    for limit in limits:
        row = {"limit_bytes": limit, **run_stream(folder, scratch / "out", limit)}
        shutil.rmtree(scratch / "out", ignore_errors=True)
        rows.append(row)
        print(f"  under prlimit --data={limit / 2**30:.1f}G: rc={row['rc']} passed={row['passed']} "
              f"wall {row['wall_s']} s, peak RSS {row['peak_rss_bytes'] / 1e6:.0f} MB", flush=True)
    return rows


def check_logits(folder: Path, scratch: Path) -> dict:
    """Stream ``folder``, then load the original and the result whole and compare their logits (another process)."""
    output = scratch / "out"
    streamed = run_stream(folder, output)
    if not streamed["passed"]:
        return {"layers": folder.name, "passed": False, **streamed}
    done = timed(_worker("--logits", str(folder), str(output)))
    shutil.rmtree(output, ignore_errors=True)
    if done["rc"]:
        raise RuntimeError(f"logits check failed: {done['stderr'][-2000:]}")
    return {"folder": folder.name, "logits_max_abs_diff": float(done["stdout"].split()[-1]),
            "peak_rss_bytes_loading_both": done["peak_rss_bytes"]}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (sizes in decimal GB / MB)."""
    from benchmarks.reparam_timm import table as markdown

    shown = [{"layers": r["layers"], "checkpoint (GB)": f"{r['checkpoint_bytes'] / 1e9:.2f}",
              "largest block (MB)": f"{r['largest_block_bytes'] / 1e6:.0f}", "ends (MB)": f"{r['ends_bytes'] / 1e6:.0f}",
              "peak RSS (MB)": f"{r['peak_rss_bytes'] / 1e6:.0f}", "RSS / (block + ends)": r["rss_over_block_and_ends"],
              "(RSS - fixed) / (block + ends)": r["rss_less_fixed_over_block_and_ends"],
              "peak address space (MB)": f"{r['peak_vm_bytes'] / 1e6:.0f}", "stream wall (s)": r["wall_s"],
              "cp wall (s)": r["cp_wall_s"], "wall / cp": r["wall_over_cp"],
              "stream + sync (s)": f"{r['wall_s'] + r['sync_s']:.2f}", "cp + sync (s)": f"{r['cp_wall_s'] + r['cp_sync_s']:.2f}",
              "(wall + sync) / (cp + sync)": r["wall_with_sync_over_cp_with_sync"], "passed": r["passed"]} for r in rows]
    return markdown(shown, COLUMNS)


def _commit() -> str:
    """This checkout's commit, and whether the streamed path's files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "normsurgeon/streaming", "normsurgeon/io"], cwd=_ROOT,
                           capture_output=True, text=True).stdout
    return head.strip() + (" (normsurgeon/streaming or io modified)" if dirty.strip() else "")


def run(depths: tuple[int, ...], *, cache: Path, limits: tuple[int, ...], logits_depth: int | None,
        keep: bool, reps: int = 1) -> dict:
    """Every measurement; the results as one JSON-able dict."""
    folders = {layers: ensure_checkpoint(cache, layers) for layers in depths}
    scratch = cache / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    idle = fixed_overhead()
    print(f"fixed overhead (idle process: {IDLE}): {idle}", flush=True)
    rows = []
    for layers, folder in folders.items():
        rows.append(measure_depth(folder, scratch, idle["peak_rss_bytes"], reps))
        print(f"{layers} layers: {json.dumps({k: v for k, v in rows[-1].items() if k != 'report'})}", flush=True)
    results = {"normsurgeon": _commit(), "width": WIDTH, "shard": SHARD, "threads": 1, "reps": reps,
               "fixed_overhead_bytes": idle["peak_rss_bytes"], "idle": {"process": IDLE, **idle},
               "rows": rows, "table": table(rows)}
    if limits:
        results["limited"] = {"layers": max(depths), **sizes(folders[max(depths)]),
                              "runs": under_limits(folders[max(depths)], scratch, limits)}
    if logits_depth is not None:
        results["logits"] = check_logits(ensure_checkpoint(cache, logits_depth), scratch)
        print(f"logits: {results['logits']}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    if not keep:
        shutil.rmtree(cache, ignore_errors=True)
    print(results["table"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", nargs="+", type=int, default=list(DEPTHS))
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the checkpoints are built and kept")
    parser.add_argument("--limits", nargs="*", type=float, default=[limit / 2**30 for limit in LIMITS],
                        help="RLIMIT_DATA limits (GiB) for the deepest checkpoint's stream")
    parser.add_argument("--no-limit", action="store_true", help="skip the runs under a limit")
    parser.add_argument("--logits-depth", type=int, default=4, help="the depth whose output is loaded whole and "
                        "compared with the original (needs both models in memory)")
    parser.add_argument("--reps", type=int, default=3, help="cp and stream runs per depth (medians shown)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints under --cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--logits", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_checkpoint(Path(args.build[0]), int(args.build[1]))
        return
    if args.logits:
        print(logits_difference(*args.logits))
        return
    limits = () if args.no_limit else tuple(int(gib * 2**30) for gib in args.limits)
    results = run(tuple(args.depths), cache=args.cache, limits=limits, logits_depth=args.logits_depth, keep=args.keep,
                  reps=args.reps)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
