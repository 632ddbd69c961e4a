"""Bad input for every command: one ``error:`` line, the documented exit code, nothing lost.

Each case runs the CLI as a user would and asserts that

* stderr is exactly one line, ``error: <problem>; <fix>``, naming the case's problem and fix;
* the exit code is the one docs/errors.md documents for that problem;
* every file in the working directory is byte-for-byte unchanged (sha256), and no file was
  added: no output, no temp file, no dot-file;
* a malicious pickle did not run (its ``os.system("touch MARKER")`` left no marker).

Speed: ~130 cases would cost ~2.5 s each as fresh ``python -m normsurgeon`` processes (torch's
import). Instead one helper process imports normsurgeon once and forks a child per case; the
child sets its cwd, points fd 1/2 at files and runs ``normsurgeon.cli.main(args)``, so each case
still is its own process with its own exit code and real stdout/stderr, as a user's run is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from normsurgeon.cli import main
from normsurgeon.errors import EXIT_CODES
from normsurgeon.report import SkipReason
from tests.helpers import REPO, give_realistic_stats, sha256

if not hasattr(os, "fork"):
    pytest.skip("the case runner forks (POSIX only)", allow_module_level=True)

DOCS = REPO / "docs" / "errors.md"
SHAPE = "1,3,32,32"

# --------------------------------------------------------------------------- the case runner

_RUNNER = r'''
import json, os, signal, sys, time, traceback
import normsurgeon.cli
import normsurgeon.onnx.export, normsurgeon.onnx.optimize, normsurgeon.onnx.verify  # the slow imports, once
for line in sys.stdin:
    case = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the case: a process of its own, stdout/stderr to files, cwd the case's folder
        code = 1
        try:
            os.chdir(case["cwd"])
            for fd, name in ((1, case["stdout"]), (2, case["stderr"])):
                target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(target, fd)
                os.close(target)
            normsurgeon.cli.main(case["args"], prog_name="normsurgeon")
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    start, status = time.monotonic(), None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() - start > case["timeout"]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.002)
    print(json.dumps({"returncode": status}), flush=True)
'''


class CaseRunner:
    """One long-lived process that forks a child per CLI run (see the module docstring)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0
        env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
        self.process = subprocess.Popen([sys.executable, "-c", _RUNNER], cwd=REPO, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        request = {"args": args, "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError(f"the case runner died (exit {self.process.wait()})")
        return subprocess.CompletedProcess(["normsurgeon", *args], json.loads(reply)["returncode"],
                                           out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaseRunner]:
    case_runner = CaseRunner(tmp_path_factory.mktemp("logs"))
    yield case_runner
    case_runner.close()


# --------------------------------------------------------------------------- the files


class Evil:
    """Unpickling this runs ``os.system("touch MARKER")``: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


MARKER = "PWNED"  # the evil pickles touch this file in the case's folder


def conv_model(seed: int = 0) -> nn.Sequential:
    """A small 3-channel image model with trained-looking BatchNorm statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return give_realistic_stats(model, torch.randn(4, 3, 32, 32))


def conv_model_onnx(model: nn.Sequential) -> onnx.ModelProto:
    """The same model as an ONNX graph (built by hand: no exporter run needed)."""
    conv, bn, _, _, _, linear = model
    weights = {
        "W": conv.weight, "B": conv.bias, "scale": bn.weight, "shift": bn.bias,
        "mean": bn.running_mean, "var": bn.running_var, "G": linear.weight, "C": linear.bias,
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], epsilon=bn.eps),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "G", "C"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(t.detach().numpy().astype(np.float32), name) for name, t in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every input the cases use, made once; each case works on its own copy."""
    folder = tmp_path_factory.mktemp("inputs")
    model = conv_model()
    torch.save(model, folder / "model.pt")
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save(conv_model().train(), folder / "train.pt")
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), folder / "program.pt2")
    with warnings.catch_warnings():  # the old hook API is deprecated, and still what old checkpoints hold
        warnings.simplefilter("ignore", FutureWarning)
        weight_normed = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    torch.save(weight_normed, folder / "wn.pt")  # the old hook API pickles (parametrizations do not)
    onnx.save(conv_model_onnx(model), folder / "net.onnx")
    onnx.save(conv_model_onnx(conv_model(seed=1)), folder / "other.onnx")  # another model's weights
    torch.save(torch.randn(8, 3, 32, 32), folder / "calib.pt")
    torch.save(torch.randn(8, 5, 32, 32), folder / "calib5.pt")
    full = (folder / "model.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(full[: len(full) // 2])
    full_onnx = (folder / "net.onnx").read_bytes()
    (folder / "truncated.onnx").write_bytes(full_onnx[: len(full_onnx) // 2])
    (folder / "empty.pt").write_bytes(b"")
    (folder / "notes.txt").write_text("these are my notes, not a model\n")
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4)
    torch.save([1, 2, 3], folder / "list.pt")
    (folder / "adir").mkdir()
    (folder / "file.txt").write_text("a file, not a folder\n")
    (folder / "out.pt").write_bytes(b"an output from an earlier run")
    return folder


def copy_inputs(source: Path, target: Path) -> None:
    for path in source.iterdir():
        if path.is_dir():
            (target / path.name).mkdir()
        else:
            (target / path.name).write_bytes(path.read_bytes())
    with open(target / "evil.pt", "wb") as f:  # names this case's own marker
        pickle.dump(Evil(str(target / MARKER)), f)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``, dot-files included, with the sha256 of each file."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else sha256(p)) for p in sorted(folder.rglob("*"))}


# --------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Problem:
    """What went wrong, and what the one error line must say about it."""

    code: int
    problem: str  # a substring of the message that names the problem
    fix: str  # a substring that names the fix
    missing_fix: str | None = None  # why the message names no fix yet: only that part xfails (strictly)


# The documented messages (docs/errors.md), by problem.
MISSING = Problem(3, "no such file", "check the path")
EMPTY = Problem(3, "file is empty", "expected a pickled nn.Module")
TRUNCATED = Problem(3, "truncated or corrupt zip archive", "re-save or re-download")
TEXT = Problem(3, "it looks like text", "expected a pickled nn.Module")
JPEG = Problem(3, "not a torch.save or torch.export file", "expected a pickled nn.Module")
ONNX_AS_MODEL = Problem(3, "an ONNX file where a PyTorch model was expected", "'normsurgeon optimize' takes .onnx files")
LIST = Problem(3, "holds a list of 3 items, not a model", "expected a pickled nn.Module")
EVIL = Problem(4, "refusing to unpickle: it references os.system", "--trust-pickle if you trust this file")
STATE_DICT = Problem(2, "holds a state_dict (weights without the architecture)", "pass --factory")
FOLDER = Problem(3, "is a directory, not a file", "pass the .pt or .pt2 file itself")
WRONG_SHAPE = Problem(5, "model failed on the example inputs (RuntimeError: Given groups=1",
                      "check --input-shape/--inputs")
WRONG_DTYPE = Problem(5, "model failed on the example inputs (RuntimeError: ", "check --input-shape/--inputs")
TRAINING = Problem(5, "was saved in training mode", "pass --eval")
NO_DIR = Problem(8, "directory nodir does not exist", "create it or choose another path with -o")
IS_DIR = Problem(8, "cannot write adir: it is a directory", "pass a file path with -o")
UNDER_FILE = Problem(8, "file.txt is not a directory", "choose another path with -o")
EXISTS = Problem(8, "out.pt exists", "pass --force to overwrite")
IS_INPUT = Problem(8, "it is the input file", "choose another output path with -o")
EXPORTED = Problem(2, "needs nn.Module layers, which a .pt2 ExportedProgram does not have",
                   "pass the nn.Module it was exported from (or its state_dict with --factory)")
ONNX_MISSING = Problem(3, "no such file", "check the path")
ONNX_FOLDER = Problem(3, "is a directory, not an .onnx file", "pass the .onnx file itself")
ONNX_UNREADABLE = Problem(3, "not a readable ONNX model", "re-export")
ORT_UNREADABLE = Problem(3, "onnxruntime cannot load it", "re-export")


@dataclasses.dataclass(frozen=True)
class Command:
    """How a user calls one command, with its MODEL (and example input shape) filled in."""

    name: str
    model: str  # a MODEL that works
    writes: str | None  # the output suffix (None: writes nothing)
    shape: bool = True  # takes --input-shape

    def args(self, model: str | None = None, *, shape: str | None = SHAPE, extra: tuple[str, ...] = ()) -> list[str]:
        model = model or self.model
        args = {
            "inspect": ["inspect", model],
            "fold": ["fold", model],
            "convert": ["convert", model, "--to", "frozen-batchnorm"],
            "export": ["export", model],
            "verify": ["verify", model, "net.onnx"],
            "optimize": ["optimize", model],
            "weightnorm apply": ["weightnorm", "apply", model],
            "weightnorm remove": ["weightnorm", "remove", model],
            "recalibrate": ["recalibrate", model, "--data", "calib.pt"],
        }[self.name]
        if self.shape and shape:
            args += ["--input-shape", shape]
        return [*args, *extra]


COMMANDS = {
    c.name: c
    for c in (
        Command("inspect", "model.pt", None),
        Command("fold", "model.pt", ".pt"),
        Command("convert", "model.pt", ".pt"),
        Command("export", "model.pt", ".onnx"),
        Command("verify", "model.pt", None),
        Command("optimize", "net.onnx", ".onnx", shape=False),
        Command("weightnorm apply", "model.pt", ".pt"),
        Command("weightnorm remove", "wn.pt", ".pt", shape=False),
        Command("recalibrate", "model.pt", ".pt", shape=False),
    )
}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    args: list[str]
    expect: Problem


def _cases() -> Iterator[object]:  # a Case, or a pytest.param of one
    bad_models = {
        "missing": ("missing.pt", MISSING), "empty": ("empty.pt", EMPTY), "truncated": ("truncated.pt", TRUNCATED),
        "text": ("notes.txt", TEXT), "jpeg": ("photo.jpg", JPEG), "pickled-list": ("list.pt", LIST),
        "malicious-pickle": ("evil.pt", EVIL), "state-dict-without-factory": ("weights.pt", STATE_DICT),
        "folder": ("adir", FOLDER), "onnx-file": ("net.onnx", ONNX_AS_MODEL),
    }
    for command in COMMANDS.values():
        name = command.name.replace(" ", "-")
        if command.name == "optimize":
            onnx_models = {
                "missing": ("missing.onnx", ONNX_MISSING), "empty": ("empty.pt", ONNX_UNREADABLE),
                "truncated": ("truncated.onnx", ONNX_UNREADABLE), "text": ("notes.txt", ONNX_UNREADABLE),
                "jpeg": ("photo.jpg", ONNX_UNREADABLE), "torch-pickle": ("model.pt", ONNX_UNREADABLE),
                "malicious-pickle": ("evil.pt", ONNX_UNREADABLE), "folder": ("adir", ONNX_FOLDER),
            }
            for case, (model, expect) in onnx_models.items():
                yield Case(f"{name}-{case}", command.args(model), expect)
        else:
            for case, (model, expect) in bad_models.items():
                if command.name == "weightnorm remove" and case == "state-dict-without-factory":
                    # a bare state_dict is remove's own input form; one without weight norm has nothing to remove
                    expect = Problem(5, "has no weight-normed layer", "use the file as it is")
                yield Case(f"{name}-{case}", command.args(model), expect)
        if command.name == "verify":  # the second file, MODEL.onnx
            for case, (onnx_file, expect) in {
                "onnx-missing": ("missing.onnx", Problem(3, "no such file", "check the path of the .onnx model")),
                "onnx-truncated": ("truncated.onnx", ORT_UNREADABLE), "onnx-text": ("notes.txt", ORT_UNREADABLE),
                "onnx-is-a-pickle": ("model.pt", ORT_UNREADABLE),
            }.items():
                yield Case(f"{name}-{case}", ["verify", "model.pt", onnx_file, "--input-shape", SHAPE], expect)

        # wrong input shapes and dtypes
        if command.shape:
            yield Case(f"{name}-wrong-channels", command.args(shape="1,5,32,32"), WRONG_SHAPE)
            dtype = WRONG_DTYPE
            if command.name == "verify":  # onnxruntime's feed is checked first
                dtype = Problem(2, "is int64 but the ONNX model expects tensor(float)", "pass inputs of that dtype")
            yield Case(f"{name}-int64-input", command.args(shape=f"{SHAPE}:int64"), dtype)
    yield Case("fold-bad-input-shape", COMMANDS["fold"].args(shape="1,x"),
               Problem(2, "bad --input-shape '1,x': every dim must be a positive integer", "give the full shape"))
    yield Case("fold-malicious-inputs-file", ["fold", "model.pt", "--inputs", "evil.pt"],
               Problem(4, "refusing to unpickle: it references os.system", "--trust-pickle if you trust this file"))
    yield Case("fold-model-as-inputs-file", ["fold", "model.pt", "--inputs", "model.pt"],
               Problem(3, "holds a model (", "expected a tensor, or a tuple/list/dict of tensors"))
    yield Case("weightnorm-remove-wrong-channels", ["weightnorm", "remove", "wn.pt", "--input-shape", "1,5,32,32"],
               WRONG_SHAPE)
    yield Case("optimize-wrong-channels", ["optimize", "net.onnx", "--input-shape", "1,5,32,32"],
               Problem(2, "1,5,32,32", "--input-shape"))
    yield Case("optimize-int64-input", ["optimize", "net.onnx", "--input-shape", f"{SHAPE}:int64"],
               Problem(2, "optimize takes the dtype from the model", "give the shape only"))
    yield Case("recalibrate-data-wrong-channels", ["recalibrate", "model.pt", "--data", "calib5.pt"],
               Problem(2, "the calibration data does not fit the model", "pass data shaped for the model"))
    yield Case("recalibrate-data-missing", ["recalibrate", "model.pt", "--data", "missing.pt"],
               Problem(3, "no such file or folder", "check the --data path"))
    yield Case("recalibrate-data-text", ["recalibrate", "model.pt", "--data", "notes.txt"],
               Problem(3, "it looks like text", "expected a tensor"))
    yield Case("recalibrate-data-pickled-list", ["recalibrate", "model.pt", "--data", "list.pt"],
               Problem(3, "holds a list of 3 items and no tensor", "expected a tensor"))
    yield Case("recalibrate-data-malicious-pickle", ["recalibrate", "model.pt", "--data", "evil.pt"], EVIL)

    # a model in training mode, where the command cares (export and verify use eval mode and say so;
    # inspect reports it as a hazard; recalibrate and weightnorm do not depend on it)
    for name in ("fold", "convert"):
        yield Case(f"{name}-training-mode", COMMANDS[name].args("train.pt"), TRAINING)

    # a .pt2 where a command edits or reads nn.Module layers: one wording for every command (fold and
    # export work on a .pt2; fold --affine does not)
    for name in ("inspect", "convert", "weightnorm apply", "weightnorm remove", "recalibrate"):
        yield Case(f"{name.replace(' ', '-')}-exported-program", COMMANDS[name].args("program.pt2"), EXPORTED)
    yield Case("fold-affine-exported-program", COMMANDS["fold"].args("program.pt2", extra=("--affine",)), EXPORTED)

    # an output that cannot be written
    for command in COMMANDS.values():
        if command.writes is None:
            continue
        name, suffix = command.name.replace(" ", "-"), command.writes
        for case, (output, expect) in {
            "output-dir-missing": (f"nodir/out{suffix}", NO_DIR),
            "output-is-a-dir": ("adir", IS_DIR),
            "output-under-a-file": (f"file.txt/out{suffix}", UNDER_FILE),
            "output-exists": ("out.pt", EXISTS),
            "output-is-the-input": (command.model, IS_INPUT),
        }.items():
            yield Case(f"{name}-{case}", command.args(extra=("-o", output)), expect)

    # a failed check in a printed report: the report on stdout, one error line on stderr
    yield Case("verify-another-models-onnx", ["verify", "model.pt", "other.onnx", "--input-shape", SHAPE],
               Problem(6, "check 'onnxruntime cpu vs torch (batch 1)' failed on output 'output' (max|diff|",
                       "loosen --atol/--rtol only if the difference is expected"))
    yield Case("verify-batch-the-onnx-does-not-take",
               ["verify", "model.pt", "net.onnx", "--input-shape", "2,3,32,32"],
               Problem(2, "input 'x' is (2, 3, 32, 32) but the ONNX model's static shape is (1, 3, 32, 32)",
                       "or export with --dynamic-batch for any batch size"))

    # click's own usage errors follow the same one-line convention
    yield Case("convert-missing-to", ["convert", "model.pt"],
               Problem(2, "missing option '--to'", "see 'normsurgeon convert --help'"))
    yield Case("verify-unknown-provider", ["verify", "model.pt", "net.onnx", "--provider", "tpu"],
               Problem(2, "'tpu' is not one of 'cpu', 'cuda', 'all'", "see 'normsurgeon verify --help'"))
    yield Case("fold-negative-atol", ["fold", "model.pt", "--atol", "-1"],
               Problem(2, "invalid value for '--atol'", "see 'normsurgeon fold --help'"))


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, runner: CaseRunner, files: Path, tmp_path: Path) -> None:
    copy_inputs(files, tmp_path)
    before = snapshot(tmp_path)

    result = runner.run(case.args, tmp_path)

    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"exit {result.returncode}:\n{result.stderr}"
    message = lines[0]
    assert result.returncode == case.expect.code, message
    assert case.expect.problem in message
    assert not (tmp_path / MARKER).exists(), "the malicious pickle ran"
    assert snapshot(tmp_path) == before, "a file was changed, or an output or temp file was left behind"
    fix = message.partition("; ")[2]  # 'error: <problem>; <fix>'
    if case.expect.missing_fix:
        if case.expect.fix in fix:
            pytest.fail(f"the message names its fix now; drop missing_fix from this case: {message}")
        pytest.xfail(case.expect.missing_fix)
    assert case.expect.fix in fix, f"the fix is not named after the problem: {message}"


def test_every_command_has_bad_input_cases() -> None:
    ids = {c.id for c in CASES}
    for name in COMMANDS:
        prefix = name.replace(" ", "-")
        assert {f"{prefix}-missing", f"{prefix}-malicious-pickle", f"{prefix}-truncated"} <= ids, name


# --------------------------------------------------------------------------- docs/errors.md


def documented_exit_codes() -> dict[int, str]:
    """The exit-code table of docs/errors.md: code -> class name ('—' for none)."""
    codes = {}
    for line in DOCS.read_text().splitlines():
        match = re.fullmatch(r"\|\s*(\d+)\s*\|\s*`?([\w—-]+)`?\s*\|.*\|", line.strip())
        if match:
            codes[int(match.group(1))] = match.group(2)
    return codes


def test_docs_list_every_error_class_with_its_exit_code() -> None:
    documented = documented_exit_codes()
    for name, code in EXIT_CODES.items():
        assert documented.get(code) == name, f"docs/errors.md: exit {code} should be {name}, is {documented.get(code)}"
    assert documented.get(0) == "—" and documented.get(130) == "—"


def test_docs_list_every_exit_code_a_bad_input_gives() -> None:
    documented = documented_exit_codes()
    codes = {(c if isinstance(c, Case) else c.values[0]).expect.code for c in CASES}
    assert codes <= set(documented), codes - set(documented)


def test_docs_explain_every_skip_reason() -> None:
    text = DOCS.read_text()
    assert [r.name for r in SkipReason if f"| `{r.name}` |" not in text] == []


# --------------------------------------------------------------------------- examples in help texts


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def _examples(text: str) -> list[list[str]]:
    """The command lines in a help text or README: 'normsurgeon ...', comments dropped."""
    lines = []
    for line in text.splitlines():
        line = line.split("&&")[-1].split("  #")[0].strip()
        if line.startswith("normsurgeon "):
            lines.append(shlex.split(line)[1:])
    return lines


def _parse(args: list[str]) -> None:
    """Parse a command line as the CLI would (option names, required options, choices), without running it."""
    command, words = main, list(args)
    while isinstance(command, click.Group):
        assert words and words[0] in command.commands, f"no command {words[:1]} in: normsurgeon {' '.join(args)}"
        command, words = command.commands[words[0]], words[1:]
    command.make_context(command.name, words)


def test_examples_in_help_texts_and_readme_parse() -> None:
    examples = _examples((REPO / "README.md").read_text())
    for path, command in _commands(main):
        with click.Context(command, info_name=" ".join(("normsurgeon", *path))) as ctx:
            examples += _examples(command.get_help(ctx))
    assert len(examples) >= 15
    for args in examples:
        _parse(args)
