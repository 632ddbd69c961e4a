"""The command line end to end, as a user runs it.

In this process (the ``cli`` fixture, tests/conftest.py), apart from one ``fold`` in a subprocess
(``run_cli``: the console entry point, ``python -m normsurgeon``) and the Ctrl-C tests, which need
a fresh interpreter (torch not imported yet).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch

import models
from tests.helpers import REPO, run_cli, sha256

EXAMPLE = REPO / "models" / "examples" / "resnet18.pt"


def test_fold_bundled_example_writes_a_checked_model(tmp_path):
    out = tmp_path / "folded.pt"
    before = sha256(EXAMPLE)
    result = run_cli("fold", EXAMPLE, "--input-shape", "2,3,32,32", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["folded"]) == 20 and report["skipped"] == []
    assert {"norm", "into"} <= set(report["folded"][0])
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] < 1e-4
    assert sha256(EXAMPLE) == before
    folded = torch.load(out, weights_only=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = models.example_inputs("resnet18", 3)[0]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), models.build("resnet18")(x), rtol=1e-4, atol=1e-4)


def test_fold_human_report_names_pairs_and_the_check(tmp_path, cli):
    result = cli("fold", EXAMPLE, "--input-shape", "1,3,32,32", "-o", tmp_path / "f.pt")
    assert result.returncode == 0, result.stderr
    assert "layers.0.bn1" in result.stdout and "into its producer" in result.stdout
    assert "check: folded vs original" in result.stdout and "pass" in result.stdout


def test_fold_default_output_beside_input_and_no_overwrite_without_force(tmp_path, cli):
    source = tmp_path / "net.pt"
    source.write_bytes(EXAMPLE.read_bytes())
    assert cli("fold", source, "--input-shape", "1,3,32,32").returncode == 0
    target = tmp_path / "net.folded.pt"
    assert target.exists()
    first = sha256(target)
    again = cli("fold", source, "--input-shape", "1,3,32,32")
    assert again.returncode == 8 and "exists; pass --force" in again.stderr
    assert sha256(target) == first
    assert cli("fold", source, "--input-shape", "1,3,32,32", "--force").returncode == 0


def test_fold_refuses_to_overwrite_its_input(tmp_path, cli):
    source = tmp_path / "net.pt"
    source.write_bytes(EXAMPLE.read_bytes())
    before = sha256(source)
    result = cli("fold", source, "--input-shape", "1,3,32,32", "-o", source, "--force")
    assert result.returncode == 8 and "input" in result.stderr
    assert sha256(source) == before


def test_fold_infers_image_input_and_says_so(tmp_path, cli):
    result = cli("fold", EXAMPLE, "-o", tmp_path / "f.pt", "--json")
    assert result.returncode == 0, result.stderr
    notes = " ".join(json.loads(result.stdout)["notes"])
    assert "assumed one random input of shape 1,3,224,224" in notes


def test_fold_without_inputs_where_ambiguous_asks_for_them(tmp_path, cli):
    path = tmp_path / "lm.pt"
    torch.save(models.build("prenorm_transformer"), path)
    result = cli("fold", path, "-o", tmp_path / "out.pt")
    assert result.returncode == 2
    assert "cannot infer example inputs" in result.stderr and "--input-shape" in result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_fold_token_model_with_integer_input_shape(tmp_path, cli):
    path = tmp_path / "lm.pt"
    torch.save(models.build("prenorm_transformer"), path)
    result = cli("fold", path, "--input-shape", "2,8:int64", "-o", tmp_path / "out.pt", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["folded"] == []


def test_fold_with_inputs_file(tmp_path, cli):
    inputs = tmp_path / "inputs.pt"
    torch.save(models.example_inputs("resnet18", 2), inputs)
    result = cli("fold", EXAMPLE, "--inputs", inputs, "-o", tmp_path / "f.pt", "--json")
    assert result.returncode == 0, result.stderr
    assert "inputs from" in " ".join(json.loads(result.stdout)["notes"])


def test_fold_model_saved_in_training_mode(tmp_path, cli):
    path = tmp_path / "train.pt"
    torch.save(models.build("mlp").train(), path)
    refused = cli("fold", path, "-o", tmp_path / "out.pt")
    assert refused.returncode == 5 and "--eval" in refused.stderr
    accepted = cli("fold", path, "--eval", "-o", tmp_path / "out.pt")
    assert accepted.returncode == 0, accepted.stderr


def test_fold_state_dict_with_factory_outputs_a_module(tmp_path, cli):
    (tmp_path / "arch.py").write_text(
        "import models\n\ndef make():\n    return models.build('mlp')\n"
    )
    state = tmp_path / "weights.pth"
    torch.save(models.build("mlp").state_dict(), state)
    result = cli("fold", state, "--factory", "arch:make", "--import-path", tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "weights.folded.pth"
    assert isinstance(torch.load(out, weights_only=False), torch.nn.Module)
    missing = cli("fold", state, "-o", tmp_path / "x.pt")
    assert missing.returncode == 2 and "--factory" in missing.stderr


def test_fold_exported_program_in_its_graph(tmp_path, cli):
    path = tmp_path / "m.pt2"
    model = models.build("convtranspose_decoder")
    inputs = models.example_inputs("convtranspose_decoder", 2)
    torch.export.save(torch.export.export(model, inputs), path)
    result = cli("fold", path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["folded"]) == 3 and report["check"]["passed"]
    folded = torch.export.load(tmp_path / "m.folded.pt2")
    targets = [str(n.target) for n in folded.graph.nodes]
    assert not any("batch_norm" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(folded.module()(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_missing_model_file_is_a_load_error(tmp_path, cli):
    result = cli("fold", tmp_path / "nope.pt")
    assert result.returncode == 3 and "nope.pt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_side_effect(tmp_path, cli):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(marker)}, path)
    result = cli("fold", path)
    assert result.returncode == 4
    assert "system" in result.stderr and "--trust-pickle" in result.stderr
    assert not marker.exists()


def test_help_lists_commands_and_fold_options(cli):
    top = cli("--help")
    assert top.returncode == 0 and "fold" in top.stdout
    fold_help = cli("fold", "--help")
    for option in ("--input-shape", "--inputs", "--factory", "--trust-pickle", "--force", "--json", "--eval"):
        assert option in fold_help.stdout


def test_fold_help_says_what_a_folded_batchnorm_becomes(cli):
    """Not only nn.Identity: a BatchNorm+act becomes its act, after baking and merging branches."""
    text = " ".join(cli("fold", "--help").stdout.split())
    for said in ("weight-standardized convs (timm StdConv2d) are baked into plain convs",
                 "merged into one conv unless --no-reparameterize", "A folded BatchNorm becomes nn.Identity",
                 "BatchNorm with its activation inside (timm BatchNormAct2d) becomes that activation"):
        assert said in text, said


def test_the_python_verbs_the_readme_names_are_exported() -> None:
    import normsurgeon

    readme = " ".join((REPO / "README.md").read_text().split())
    sentence = readme[readme.index("Python has the same verbs"):readme.index("Each returns a `Report`")]
    verbs = re.findall(r"`(\w+)`", sentence)
    assert {"bake_weight_standardization", "reparameterize", "fold", "export_onnx"} <= set(verbs)
    for verb in verbs:
        assert verb in normsurgeon.__all__ and callable(getattr(normsurgeon, verb)), verb


def test_reparameterize_and_bake_from_the_package_keep_the_outputs() -> None:
    """The two steps fold runs first, called from ``normsurgeon``: one conv per summed pair, plain convs."""
    import normsurgeon

    class Summed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    x = torch.randn(2, 3, 8, 8)
    merged = normsurgeon.reparameterize(torch.nn.Sequential(Summed(), torch.nn.ReLU()).eval(), (x,))
    assert merged.check.passed and len(merged.changed("reparameterized")) == 1
    assert type(merged.model[0]) is torch.nn.Conv2d
    timm = pytest.importorskip("timm")
    baked = normsurgeon.bake_weight_standardization(torch.nn.Sequential(timm.layers.StdConv2d(3, 4, 3)).eval(), (x,))
    assert baked.check.passed and type(baked.model[0]) is torch.nn.Conv2d


def test_fold_affine_leaves_parameter_free_norms(tmp_path, cli):
    path = tmp_path / "llama.pt"
    torch.save(models.build("llama"), path)
    result = cli("fold", path, "--affine", "--input-shape", "2,8:int64", "-o", tmp_path / "out.pt", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    affine = [c for c in report["changes"] if c["action"] == "folded-affine"]
    assert {c["into"] for c in affine} >= {"layers.0.self_attn.q_proj", "layers.0.mlp.gate_proj"}
    assert [c["label"] for c in report["checks"]] == ["folded vs original", "norm affines folded vs before"]
    folded = torch.load(tmp_path / "out.pt", weights_only=False)
    ids = torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(folded(ids), models.build("llama")(ids), rtol=1e-4, atol=1e-5)


# A KeyboardInterrupt raised exactly when torch is imported, as a Ctrl-C in the first second of a
# command raises it. (A real SIGINT lands at a random point: inside torch's C++ initialisation it
# is sometimes swallowed or aborts in pybind11, outcomes normsurgeon cannot change; see docs/errors.md.)
_INTERRUPT_AT_TORCH_IMPORT = """
import sys
class InterruptAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, InterruptAtTorch())
"""


def _run_interrupted(program: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _INTERRUPT_AT_TORCH_IMPORT + program],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)


def test_ctrl_c_while_torch_is_still_importing_is_one_line_and_exit_130():
    """The first second or two of every command is importing torch; a Ctrl-C there is not a crash."""
    for argv0 in ("normsurgeon", "-m"):  # the console script; python -m normsurgeon
        done = _run_interrupted(f"sys.argv = [{argv0!r}, '--help']\nfrom normsurgeon.cli import main\nmain()\n")
        assert done.returncode == 130, done.stderr
        assert done.stderr == "interrupted: nothing was read or written\n" and done.stdout == ""


def test_importing_normsurgeon_in_a_program_keeps_its_own_ctrl_c():
    done = _run_interrupted("try:\n    import normsurgeon\nexcept KeyboardInterrupt:\n    print('the program saw it')\n")
    assert done.returncode == 0 and done.stdout == "the program saw it\n", done.stderr


def test_ctrl_c_while_the_commands_import_their_libraries_is_one_line_and_exit_130():
    """After torch, the commands import onnx, onnxruntime and rich: a Ctrl-C there is not a crash either."""
    program = _INTERRUPT_AT_TORCH_IMPORT.replace('name == "torch"', 'name == "normsurgeon.commands"')
    done = subprocess.run([sys.executable, "-c", program + "sys.argv = ['normsurgeon', '--help']\n"
                           "from normsurgeon.cli import main\nmain()\n"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted: nothing was read or written\n" and done.stdout == ""


def test_ctrl_c_that_an_import_turned_into_an_import_error_is_still_an_interrupt(capsys):
    """onnxruntime's C extension reports a Ctrl-C during its initialisation as ImportError."""
    import signal

    from normsurgeon.cli import main

    @main.command("fails-to-import")
    @click.option("--ctrl-c", is_flag=True)
    def fails_to_import(ctrl_c: bool) -> None:
        if ctrl_c:
            try:  # what the extension's init does with the KeyboardInterrupt a Ctrl-C raises
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            except KeyboardInterrupt:
                pass
        raise ImportError("initialization failed")

    try:
        with pytest.raises(SystemExit) as exit_info:
            main.main(["fails-to-import", "--ctrl-c"])
        assert exit_info.value.code == 130 and capsys.readouterr().err.startswith("interrupted:")
        with pytest.raises(ImportError):  # with no Ctrl-C it stays what it is, with its traceback
            main.main(["fails-to-import"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the watcher put Python's back
    finally:
        main.commands.pop("fails-to-import")
