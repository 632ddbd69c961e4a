"""Run every benchmark and write the results, tables, plot and README section: one command.

    python -m benchmarks.run                 # full run (~22 min on 2 cores), updates benchmarks/README.md
    python -m benchmarks.run --quick         # smoke: one small model, few repetitions, seconds
    python -m benchmarks.run --only onnx     # re-measure one section, keep the others' results
    python -m benchmarks.run --only pass_cost --input-size 32   # the pass cost at 32x32 only

Results go to ``--out`` (default ``benchmarks/results``): ``results.json`` (every number,
the environment, the command that produced each section), ``tables.md`` and
``latency_ratio.png``. A full run also rewrites the generated part of ``benchmarks/README.md``
and ``benchmarks/latency_ratio.png`` (``--readme PATH`` / ``--readme none`` to change that).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks import report
from benchmarks.timing import environment, pin_threads

SECTIONS = ("eager", "bias_cost", "onnx", "pass_cost")
DEFAULT_OUT = Path("benchmarks/results")
DEFAULT_README = Path("benchmarks/README.md")


@dataclass(frozen=True)
class Config:
    """How much of each benchmark to run."""

    batches: tuple[int, ...]
    eager_rounds: int
    onnx_rounds: int
    min_block_s: float
    depths: tuple[int, ...]
    width: int
    pass_reps: int
    input_sizes: tuple[int, ...]  # the pass cost's example image sizes (one image each)
    export_reps: int
    transformers: bool


FULL = Config(batches=(1, 8), eager_rounds=101, onnx_rounds=61, min_block_s=0.005,
              depths=(18, 50, 101, 152), width=32, pass_reps=15, input_sizes=(32, 224), export_reps=3,
              transformers=True)
QUICK = Config(batches=(1,), eager_rounds=5, onnx_rounds=5, min_block_s=0.001,
               depths=(18,), width=4, pass_reps=1, input_sizes=(32,), export_reps=1, transformers=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small model, few repetitions (the smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results.json, tables.md, the plot")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1)")
    parser.add_argument("--input-size", type=_sizes, default=None, metavar="S[,S...]",
                        help="pass_cost: example image sizes, one S×S image each (default 32,224; --quick: 32)")
    parser.add_argument("--readme", default=None,
                        help=f"README to update ('none' for none; default {DEFAULT_README} unless --quick)")
    return parser.parse_args(argv)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes separated by commas, e.g. 32,224; got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    config = QUICK if args.quick else FULL
    if args.input_size:
        config = replace(config, input_sizes=args.input_size)
    readme = None if args.readme == "none" else Path(args.readme) if args.readme else (None if args.quick else DEFAULT_README)
    pin_threads(args.threads)

    results_path = args.out / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() and args.only else {}
    sections = dict(previous.get("sections", {}))
    wanted = args.only or list(SECTIONS)

    from benchmarks.subjects import subjects

    chosen = subjects(quick=args.quick, include_transformers=config.transformers)
    for name in wanted:
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        rows = _run_section(name, chosen, config, args)
        sections[name] = {
            "command": command.strip(), "config": asdict(config), "seconds": time.perf_counter() - start,
            "rows": rows, "quick": args.quick, "environment": environment(args.threads),
        }
    # with --only, the sections kept were measured where the previous run was; each section has its own
    results = {"environment": previous.get("environment") or environment(args.threads), "clock": "cpu",
               "sections": sections}
    args.out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1, default=str))
    written = report.write(results, args.out, readme=readme)
    for label, path in {"results": results_path, **written}.items():
        print(f"wrote {label}: {path}")
    for goal, verdict, numbers in report.goals(results):
        print(f"  {verdict:>18}  {goal}: {numbers}")
    return results


def _run_section(name: str, chosen, config: Config, args: argparse.Namespace) -> list[dict]:
    if name == "eager":
        from benchmarks.eager import run_eager

        return run_eager(chosen, batches=config.batches, rounds=config.eager_rounds, min_block_s=config.min_block_s)
    if name == "bias_cost":
        from benchmarks.bias_cost import run_bias_cost

        return run_bias_cost(rounds=config.eager_rounds, min_block_s=config.min_block_s, quick=args.quick)
    if name == "onnx":
        from benchmarks.onnx_runtime import run_onnx

        return run_onnx(chosen, batches=config.batches, rounds=config.onnx_rounds, min_block_s=config.min_block_s,
                        threads=args.threads, warm_up=not args.quick, export_reps=config.export_reps)
    from benchmarks.pass_cost import run_pass_cost

    return run_pass_cost(depths=config.depths, width=config.width, reps=config.pass_reps, threads=args.threads,
                         input_sizes=config.input_sizes, one_process=args.quick)


if __name__ == "__main__":
    main()
