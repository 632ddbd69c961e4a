"""Turn ``results.json`` into markdown tables, a goals verdict and the latency-ratio plot.

``python -m benchmarks.report [--results benchmarks/results/results.json] [--readme benchmarks/README.md]``
re-renders without re-measuring. The README's text between the two markers below is replaced;
everything else in it is written by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from benchmarks.goals import EAGER_TARGET, ONNX_TARGET, export_overhead, fold_ratio, goals, same_program
from benchmarks.pass_cost import BASE_SIZE, PEERS

BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks.report -->"
END = "<!-- END GENERATED -->"
EAGER_COLUMNS = (("original", "original"), ("fx_fuse", "fx.fuse"), ("normsurgeon", "normsurgeon"),
                 ("limit_bias", "limit + biases"))
ONNX_COLUMNS = (
    ("torch_plain_noopt", "plain, ORT off"), ("torch_plain", "plain"), ("torch_default", "torch default"),
    ("onnxoptimizer", "onnxoptimizer"), ("onnxslim", "onnxslim"), ("ns_export", "ns export"),
    ("ns_optimize", "ns optimize"),
)
ONNX_REFERENCES = (("limit_bias", "limit + biases"), ("limit_again", "A/A (limit again)"))
PASS_METHODS = (("forward", "forward"), ("ns_trace", "ns trace"), ("ns_fold", "ns fold"),
                ("fx_fuse_copy", "fx.fuse (copy)"), ("fx_fuse_inplace", "fx.fuse (inplace)"))


# --------------------------------------------------------------------------- helpers


def _ratio(entry: dict | None, *, spread: bool = False) -> str:
    if not entry or "ratio" not in entry:
        status = (entry or {}).get("status", "n/a")
        return status if len(status) <= 24 else status[:22] + "…"
    text = f"{entry['ratio']:.3f}"
    if spread:
        text += f" ±{(entry['ratio_q3'] - entry['ratio_q1']) / 2:.3f}"
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _command(section: dict) -> str:
    return f"Produced by `{section['command']}` ({section['seconds']:.0f} s)."


# --------------------------------------------------------------------------- sections


def eager_section(section: dict) -> str:
    rows = []
    for row in section["rows"]:
        m = row["methods"]
        left = " / ".join(
            "–" if m[k]["norms_left"] is None else str(m[k]["norms_left"]) for k in ("original", "fx_fuse", "normsurgeon")
        )
        notes = [f"fx.fuse: {m['fx_fuse']['note']}" for _ in [0] if m["fx_fuse"].get("note")]
        if m["normsurgeon"].get("note"):
            notes.append(f"kept: {m['normsurgeon']['note']}")
        rows.append([
            row["model"], row["batch"], _ratio(m["original"]), _ratio(m["fx_fuse"]),
            _ratio(m["normsurgeon"], spread=True), _ratio(m["limit_bias"]), _ratio(m.get("limit_again")),
            left, "; ".join(notes),
        ])
    header = ["model", "batch", "original", "fx.fuse", "normsurgeon (±IQR/2)", "limit + biases", "A/A",
              "BNs left (orig / fx / ns)", "notes"]
    return "\n".join([
        "### 1. Eager PyTorch inference, latency as a ratio to the norm-free limit (lower is better; 1 = limit)",
        "",
        _command(section),
        "",
        _table(header, rows),
        "",
        ("*limit + biases*: the limit with a bias (1e-3) in each layer a BN was folded into that had none: "
        "the cheapest network a fold that leaves each shift in a layer's bias can produce (on a grouped "
        "ConvTranspose normsurgeon adds the shift after the conv instead, where torch's kernel is slow with a "
        "bias: convtranspose_decoder b8). *A/A*: a second copy of the limit, timed like the others: "
        "its distance from 1 is the resolution of these numbers. ±IQR/2: half the interquartile range of the "
        "per-round ratios (the noise of one round, not the error of the median)."),
    ])


def bias_section(section: dict) -> str:
    rows = [[r["layer"], f"{r['no_bias']['seconds'] * 1e6:.0f}", _ratio(r["bias"], spread=True),
             _ratio(r["no_bias_add"], spread=True)] for r in section["rows"]]
    return "\n".join([
        "#### What a bias costs in torch's CPU layers (why *limit + biases* > 1)",
        "",
        _command(section),
        "",
        _table(["layer, input", "no bias, µs", "with bias (ratio)", "no bias + separate add (ratio)"], rows),
    ])


def onnx_section(section: dict) -> str:
    ratio_rows, op_rows, overhead = [], [], []
    first_batch = section["rows"][0]["batch"] if section["rows"] else None
    for row in section["rows"]:
        v = row["variants"]
        ratio_rows.append([row["model"], row["batch"], *(
            _ratio(v.get(k), spread=k.startswith("ns_")) for k, _ in (*ONNX_COLUMNS, *ONNX_REFERENCES)
        )])
        if row["batch"] == section["rows"][0]["batch"]:
            limit_convs = v["limit"].get("ort_ops", {}).get("Conv")
            cells = []
            for key, _ in (*ONNX_COLUMNS[1:], ("limit", "limit")):
                ops = v.get(key, {})
                if "file_ops" not in ops:
                    cells.append("–")
                    continue
                extra = ops["ort_ops"]["Conv"] - limit_convs if limit_convs is not None else 0
                cells.append(
                    f"{ops['file_ops']['BatchNormalization']} → {ops['ort_ops']['BatchNormalization']}"
                    + (f" (+{extra} Conv)" if extra > 0 else "") + (" ≡" if same_program(v, key, "limit_bias") else "")
                )
            op_rows.append([row["model"], v["limit"]["ort_ops"]["Conv"], *cells])
        seconds = row.get("export_seconds", {})
        if row["batch"] == first_batch and {"ns_export", "torch_default"} <= set(seconds):
            overhead.append([
                row["model"], row["batch"], len(seconds["ns_export"]["wall"]),
                f"{statistics.median(seconds['torch_default']['wall']):.2f}",
                f"{statistics.median(seconds['ns_export']['wall']):.2f}",
                f"{export_overhead(row, 'wall'):+.2f}", f"{export_overhead(row, 'cpu'):+.2f}",
                f"{statistics.median(seconds['ns_optimize']['wall']):.2f}" if "ns_optimize" in seconds else "–",
            ])
    ratio_header = ["model", "batch", *(name for _, name in (*ONNX_COLUMNS, *ONNX_REFERENCES))]
    op_header = ["model", "Conv in limit", *(name for _, name in ONNX_COLUMNS[1:]), "limit"]
    return "\n".join([
        "### 2. onnxruntime CPU latency, as a ratio to the norm-free limit's export (lower is better)",
        "",
        _command(section),
        "",
        _table(ratio_header, ratio_rows),
        "",
        ("*plain*: `torch.onnx.export(dynamo=True, optimize=False)`; *torch default*: the same with its default "
        "onnxscript optimizer; *onnxoptimizer* (its fuse-and-elimination passes, which include "
        "`fuse_bn_into_conv`), *onnxslim* and *ns optimize* (`optimize_onnx`) are applied to the plain file; "
        "*ns export* is `export_onnx`; *limit + biases* and *A/A* as in section 1. All but the first run with "
        "`ORT_ENABLE_ALL`."),
        "",
        (f"BatchNormalization nodes in the file → in the graph onnxruntime runs (`optimized_model_filepath`, "
        f"`ORT_ENABLE_ALL`), batch {section['rows'][0]['batch']}; `+n Conv`: onnxruntime runs n more convs "
        "than the limit, i.e. it hid n BNs as (NCHWc depthwise) convs; ≡: onnxruntime runs the very same program "
        "as for *limit + biases* (ops, attributes, shapes and wiring; only the weight values differ):"),
        "",
        _table(op_header, op_rows),
        "",
 (
            "Export cost, median wall seconds of alternating runs: `torch.onnx.export(dynamo=True)` + save vs "
            "`export_onnx` (copy, fold, export, save, verify in onnxruntime), and `optimize_onnx` on the plain "
            "file (one run):"
        ),
        "",
        _table(["model", "batch", "runs", "torch export", "ns export", "ns − torch (wall)", "ns − torch (CPU)",
                "ns optimize"], overhead),
    ])


def _check_cell(check: dict | None) -> str:
    if not check:
        return "–"
    if check["passed"]:
        return f"passed ({check['max_abs_diff']:.1e})"
    return f"**failed**: {check['max_abs_diff']:.1e} > {check['atol']:g} + {check['rtol']:g}·max|out|"


def _size(row: dict) -> int:
    return row.get("input_size", BASE_SIZE)  # rows from before the size was recorded were all 32×32


def pass_section(section: dict) -> str:
    by_run: dict[tuple[int, int], dict[str, dict]] = {}
    for row in section["rows"]:
        by_run.setdefault((_size(row), row["depth"]), {})[row["method"]] = row
    time_rows, mem_rows = [], []
    for (size, depth), methods in sorted(by_run.items()):
        any_row = next(iter(methods.values()))
        weights = any_row["weight_bytes"]
        fold = methods.get("ns_fold", {}).get("seconds")
        time_rows.append([
            f"ResNet-{depth}", f"{size}×{size}", any_row["batchnorms"], _mb(weights),
            *(f"{methods[k]['seconds']:.3f}" if k in methods else "–" for k, _ in PASS_METHODS),
            " / ".join(f"{fold_ratio(methods['ns_fold'], methods[peer], peer):.2f}" for peer in PEERS)
            if fold and all(peer in methods for peer in PEERS) else "–",
            f"{1000 * fold / any_row['batchnorms']:.2f}" if fold else "–",
            _check_cell(methods.get("ns_fold", {}).get("check")),
        ])
        mem_rows.append([
            f"ResNet-{depth}", f"{size}×{size}", _mb(weights),
            *(
                f"{_mb(methods[k]['peak_extra_bytes'])} ({methods[k]['peak_extra_bytes'] / weights:.1%})"
                if k in methods and methods[k]["peak_extra_bytes"] is not None else "–"
                for k, _ in PASS_METHODS
            ),
            _beyond_forward(methods),
        ])
    width = section["rows"][0]["width"] if section["rows"] else "?"
    sizes = " and ".join(f"{s}×{s}" for s in sorted({size for size, _ in by_run}))
    runs = sorted({(_size(r), r["reps"]) for r in section["rows"] if "reps" in r})
    reps = ", ".join(f"{n} at {s}×{s}" for s, n in runs)
    return "\n".join([
        f"### 3. Cost of the passes, ResNet width {width}, one image ({sizes}) as the example input",
        "",
        _command(section),
        "",
        ("Median process CPU seconds per call on a fresh copy; the methods of one depth and input size run "
         "interleaved in one fresh process (shuffled rounds), and fold ÷ fx.fuse is the median of the per-round "
         f"ratios{f' (calls per method: {reps})' if reps else ''}:"),
        "",
        _table(["model", "input", "BNs", "weights MiB", *(name for _, name in PASS_METHODS),
                "fold ÷ fx.fuse (copy / inplace)", "fold ms per BN", "fold's own check"], time_rows),
        "",
        ("*fold's own check*: `fold_batchnorm` compares the folded model with the original (default fp32 "
        "tolerance atol + rtol·max|output|); the benchmark passes `raise_on_mismatch=False` so a failed check "
        "is recorded here instead of stopping the run."),
        "",
        ("Peak extra resident memory during the call, MiB (% of the model's weight bytes): "
        "`VmHWM` reset via `/proc/self/clear_refs` just before the call, minus `VmRSS` then "
        "(`tracemalloc` does not see torch's CPU tensors):"),
        "",
        _table(["model", "input", "weights MiB", *(name for _, name in PASS_METHODS), "ns fold − forward"],
               mem_rows),
        "",
        ("*ns fold − forward*: the fold's peak beyond what one plain forward pass of the model needs "
         "(the trace and the check each run the model once; inference needs that memory anyway)."),
    ])


def _beyond_forward(methods: dict[str, dict]) -> str:
    fold, forward = (methods.get(k, {}).get("peak_extra_bytes") for k in ("ns_fold", "forward"))
    if fold is None or forward is None:
        return "–"
    return f"{_mb(fold - forward)} ({(fold - forward) / next(iter(methods.values()))['weight_bytes']:.1%})"


def goals_section(results: dict) -> str:
    return "\n".join(["### Goals", "", _table(["goal", "verdict", "numbers"], [list(g) for g in goals(results)])])


def environment_section(results: dict) -> str:
    env = results["environment"]
    keys = ("torch", "onnxruntime", "onnx", "onnxscript", "onnx_ir", "transformers", "onnxoptimizer", "onnxslim",
            "python", "cpu", "cpu_count", "torch_num_threads", "torch_num_interop_threads", "ort_intra_op_threads",
            "ort_inter_op_threads")
    cells = ", ".join(f"{k} {env.get(k) if env.get(k) is not None else 'absent'}" for k in keys)
    return "\n".join([
        "### Environment",
        "",
        cells + ".",
        "",
        (f"Clock: {results.get('clock', 'cpu')} (process CPU time: waits for a core on the shared machine are "
        "left out). Every latency is the median over interleaved rounds of the per-round ratio to the baseline "
        "measured in the same round, in the same process."),
    ])


def render(results: dict) -> str:
    """The generated part of the README (markdown)."""
    parts = [environment_section(results), goals_section(results)]
    sections = results.get("sections", {})
    if "eager" in sections:
        parts.append(eager_section(sections["eager"]))
    if "bias_cost" in sections:
        parts.append(bias_section(sections["bias_cost"]))
    if "onnx" in sections:
        parts.append(onnx_section(sections["onnx"]))
    if "pass_cost" in sections:
        parts.append(pass_section(sections["pass_cost"]))
    if results.get("plot"):
        parts.append(f"![latency ratio to the norm-free limit]({results['plot']})")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plot


def plot(results: dict, path: Path) -> Path:
    """Bar chart of each method's latency ratio to the limit, eager and onnxruntime, per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = results.get("sections", {})
    panels: list[tuple[str, list[dict], tuple, Any]] = []
    if "eager" in sections:
        for batch in sorted({r["batch"] for r in sections["eager"]["rows"]}):
            rows = [r for r in sections["eager"]["rows"] if r["batch"] == batch]
            panels.append((f"eager PyTorch, batch {batch}", rows, EAGER_COLUMNS, lambda r: r["methods"]))
    if "onnx" in sections:
        for batch in sorted({r["batch"] for r in sections["onnx"]["rows"]}):
            rows = [r for r in sections["onnx"]["rows"] if r["batch"] == batch]
            panels.append((f"onnxruntime CPU, batch {batch}", rows, ONNX_COLUMNS, lambda r: r["variants"]))
    cols = 2 if len(panels) > 1 else 1
    nrows = max(1, math.ceil(len(panels) / cols))
    most = max((len(p[1]) for p in panels), default=1)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, (0.6 * most + 1.4) * nrows), squeeze=False)
    for ax, (title, rows, columns, get) in zip(axes.flat, panels):
        models = [r["model"] for r in rows]
        height = 0.8 / len(columns)
        for i, (key, label) in enumerate(columns):
            values = [get(r).get(key, {}).get("ratio", float("nan")) for r in rows]
            ys = [j + i * height for j in range(len(models))]
            # a bar is the excess over the limit: it starts at 1
            bars = ax.barh(ys, [v - 1 for v in values], left=1.0, height=height, label=label)
            for y, v in zip(ys, values):
                if math.isnan(v):
                    ax.text(1.0, y, " × fails", va="center", fontsize=7, color=bars.patches[0].get_facecolor())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(EAGER_TARGET if "eager" in title else ONNX_TARGET, color="grey", linestyle="--", linewidth=0.8)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(models))])
        ax.set_yticklabels(models, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("latency ÷ norm-free limit (1 = limit, dashed = goal; × = fails or wrong)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- files


def write(results: dict, out: Path, *, readme: Path | None = None) -> dict[str, Path]:
    """Write ``tables.md`` and ``latency_ratio.png`` into ``out``; update ``readme`` (and its PNG) if given."""
    out.mkdir(parents=True, exist_ok=True)
    png = plot(results, out / "latency_ratio.png")
    written = {"png": png}
    results = dict(results, plot="latency_ratio.png")
    tables = out / "tables.md"
    tables.write_text(render(results))
    written["tables"] = tables
    if readme is not None:
        readme_png = readme.parent / "latency_ratio.png"
        if readme_png.resolve() != png.resolve():
            shutil.copyfile(png, readme_png)
        update_readme(readme, render(results))
        written["readme"] = readme
    return written


def update_readme(readme: Path, generated: str) -> None:
    """Replace the text between the markers (append the block if the markers are missing)."""
    text = readme.read_text() if readme.exists() else ""
    block = f"{BEGIN}\n\n{generated}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description="Render benchmark results as markdown tables and a plot.")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/results.json"))
    parser.add_argument("--readme", type=Path, default=Path("benchmarks/README.md"))
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    for name, path in write(results, args.results.parent, readme=args.readme).items():
        print(f"wrote {name}: {path}")


if __name__ == "__main__":
    main()
