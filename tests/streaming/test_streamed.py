"""Streamed surgery on sharded save_pretrained folders (issue 17): one block in memory at a time, each block
checked on carried activations, a folder that from_pretrained loads and that matches the in-memory result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from normsurgeon.errors import VerificationError
from normsurgeon.inputs import ExampleInputs
from normsurgeon.io.huggingface import load_pretrained_dir
from normsurgeon.io.safetensors_shards import INDEX, ShardedCheckpoint
from normsurgeon.passes.fold_batchnorm import fold_passes, run_fold
from normsurgeon.passes.fold_norm_affine import FoldNormAffines
from normsurgeon.pipeline import Sequential
from normsurgeon.report import Report
from normsurgeon.streaming import StreamedSurgery, stream_surgery
from tests.helpers import sha256
from tests.hf_models import VOCAB, causal_lm

FOLDABLE = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "opt")
TOLERANCE = 1e-5  # fp32 logits of hidden-32 models: the in-memory fold differs by ~2e-7


def phi(tie: bool = False) -> nn.Module:
    """A tiny Phi (LayerNorm, parallel attention + MLP, lm_head with a bias), norm affines randomized."""
    from models.calibrate import randomize_affine

    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=tie)
    return randomize_affine(tf.PhiForCausalLM(config), torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory):
    """``get(name)``: the model's sharded save_pretrained folder (several shards) and the model, built on first use."""
    built: dict[str, tuple[Path, nn.Module]] = {}

    def get(name: str) -> tuple[Path, nn.Module]:
        if name not in built:
            model = phi() if name == "phi" else causal_lm(name)
            folder = tmp_path_factory.mktemp("streamed") / name
            model.save_pretrained(folder, max_shard_size="20KB")
            built[name] = folder, model
        return built[name]

    return get


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def fold_affine(model: nn.Module, inputs) -> Report:
    """What ``fold --affine --stream`` does: no shift folded into a linear its class builds without a bias."""
    return run_fold(Sequential(fold_passes(), FoldNormAffines(add_biases=False)), model, inputs)


@pytest.mark.parametrize("name", FOLDABLE)
def test_fold_affine_streamed_loads_and_matches_the_in_memory_fold(name: str, folders, tmp_path: Path, cli) -> None:
    folder, model = folders(name)
    before = {p.name: sha256(p) for p in folder.iterdir()}
    result = cli("fold", folder, "--affine", "--stream", "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    rows = payload["check"]["outputs"]
    assert [r["name"] for r in rows][1:-1] == [f"{_stack(model)}.{i}" for i in range(model.config.num_hidden_layers)]
    assert payload["facts"]["blocks streamed"] == str(model.config.num_hidden_layers)

    streamed = load_pretrained_dir(tmp_path / "out")
    in_memory = fold_affine(load_pretrained_dir(folder), ExampleInputs((tokens(0),))).model
    ids = tokens()
    assert torch.allclose(logits(streamed, ids), logits(model, ids), atol=TOLERANCE, rtol=0)
    mine, theirs = streamed.state_dict(), in_memory.state_dict()
    assert set(theirs) <= set(mine)
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-6, rtol=1e-6) for k in theirs)
    for key in set(mine) - set(theirs):  # a norm left without parameters: written as its class builds it, neutral
        assert torch.equal(mine[key], torch.ones_like(mine[key]) if key.endswith("weight") else torch.zeros_like(mine[key]))
    assert _weight_map(tmp_path / "out") == _weight_map(folder)  # the same sharding
    assert {p.name: sha256(p) for p in folder.iterdir()} == before  # the input is never changed


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_a_final_layernorm_shift_is_kept_where_lm_head_has_no_bias(name: str, folders, tmp_path: Path, cli) -> None:
    folder, model = folders(name)
    result = cli("fold", folder, "--affine", "--stream", "-o", tmp_path / "out", "--json")
    skipped = {s["module"]: s["reason"] for s in json.loads(result.stdout)["skipped"]}
    final = next(path for path, m in model.named_modules() if path.endswith(("ln_f", "final_layer_norm"))
                 and "layers" not in path)
    assert "its shift would give lm_head a bias, which its class builds without" in skipped[final]


def test_the_final_norm_folds_into_lm_head_in_the_streamed_folder(folders, tmp_path: Path, cli) -> None:
    folder, model = folders("llama")
    result = cli("fold", folder, "--affine", "--stream", "-o", tmp_path / "out", "--json")
    changes = json.loads(result.stdout)["changes"]
    assert {"module": "model.norm", "into": "lm_head"}.items() <= next(
        c for c in changes if c["module"] == "model.norm").items()
    streamed = load_pretrained_dir(tmp_path / "out")
    assert torch.equal(streamed.model.norm.weight, torch.ones_like(streamed.model.norm.weight))
    assert not torch.equal(streamed.lm_head.weight, model.lm_head.weight)
    assert len([c for c in changes if c["module"].endswith("input_layernorm")]) == 3 * model.config.num_hidden_layers


def test_convert_to_rmsnorm_streamed_centres_the_stream_and_matches(folders, tmp_path: Path, cli) -> None:
    folder, model = folders("phi")
    result = cli("convert", folder, "--to", "rmsnorm", "--stream", "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert "(centred)" in payload["check"]["label"]
    converted = [c for c in payload["changes"] if c["action"] == "converted"]
    assert len(converted) == model.config.num_hidden_layers + 1  # every block's norm and the final one
    streamed = load_pretrained_dir(tmp_path / "out")
    ids = tokens()
    assert torch.allclose(logits(streamed, ids), logits(model, ids), atol=TOLERANCE, rtol=0)
    hidden = streamed.model.embed_tokens(ids)
    assert hidden.mean(-1).abs().max() < 1e-6  # the embeddings are centred
    for layer in streamed.model.layers:  # written as LayerNorm with weight 1 and bias 0: RMSNorm on a centred stream
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
        assert torch.equal(layer.input_layernorm.bias, torch.zeros_like(layer.input_layernorm.bias))


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_convert_streamed_refuses_a_head_bias_the_class_cannot_hold(name: str, folders, tmp_path: Path, cli) -> None:
    folder, _ = folders(name)
    result = cli("convert", folder, "--to", "rmsnorm", "--untie", "--stream", "-o", tmp_path / "out")
    assert result.returncode != 0
    assert "has no place for lm_head.bias" in result.stderr and "drop --stream" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_wrong_block_edit_fails_at_that_block_and_nothing_is_written(folders, tmp_path: Path) -> None:
    folder, model = folders("llama")
    calls = []

    def corrupt_block_one(skeleton: nn.Module, inputs) -> Report:
        report = fold_affine(skeleton, inputs)
        calls.append(1)
        if len(calls) == 3:  # the ends, block 0, then block 1
            skeleton.model.layers[0].mlp.down_proj.weight.data.mul_(1.01)
        return report

    job = StreamedSurgery("fold", corrupt_block_one, subject="the folded model")
    with pytest.raises(VerificationError) as caught:
        stream_surgery(folder, tmp_path / "out", job, lambda m: ExampleInputs((tokens(0),)))
    rows = {row.name: row.passed for row in caught.value.report.check.outputs}
    assert rows == {"embeddings (input of block 0)": True, "model.layers.0": True, "model.layers.1": False}
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_no_read_holds_more_than_the_ends_and_one_block(folders, tmp_path: Path, monkeypatch) -> None:
    folder, model = folders("qwen2")
    checkpoint = ShardedCheckpoint(folder)
    ends = sum(e.nbytes for n, e in checkpoint.entries.items() if not n.startswith("model.layers."))
    block = max(sum(e.nbytes for n, e in checkpoint.entries.items() if n.startswith(f"model.layers.{i}."))
                for i in range(model.config.num_hidden_layers))
    total = sum(e.nbytes for e in checkpoint.entries.values())
    read = ShardedCheckpoint.read
    sizes = []

    def spy(self, names):
        tensors = read(self, names)
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return tensors

    monkeypatch.setattr(ShardedCheckpoint, "read", spy)
    job = StreamedSurgery("fold", fold_affine)
    stream_surgery(folder, tmp_path / "out", job, lambda m: ExampleInputs((tokens(0),)))
    assert max(sizes) <= ends + block < total


def test_a_bf16_checkpoint_streams_in_bf16(tmp_path: Path, cli) -> None:
    model = causal_lm("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    result = cli("fold", tmp_path / "bf16", "--affine", "--stream", "--json")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "bf16.folded"
    assert {e.dtype for e in ShardedCheckpoint(out).entries.values()} == {torch.bfloat16}
    ids = tokens()
    got, want = logits(load_pretrained_dir(out), ids).float(), logits(model, ids).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()  # bf16 rounding of the folded weights


@pytest.mark.parametrize("args, message", [
    (("--approximate",), "drop --approximate or --stream"),
    (("--weights", "w.safetensors"), "drop --weights or drop --stream"),
])
def test_stream_refusals_name_the_fix(args, message: str, folders, cli) -> None:
    folder, _ = folders("phi")
    command = ("convert", folder, "--to", "rmsnorm") if "--approximate" in args else ("fold", folder, "--affine")
    result = cli(*command, "--stream", *args)
    assert result.returncode != 0 and message in result.stderr


def test_stream_refuses_a_model_file(tmp_path: Path, cli) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)
    result = cli("fold", path, "--stream")
    assert result.returncode != 0 and "--stream works on a save_pretrained folder with safetensors" in result.stderr


def _stack(model: nn.Module) -> str:
    return next(path for path, m in model.named_modules() if isinstance(m, nn.ModuleList)
                and len(m) == model.config.num_hidden_layers)


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def test_full_check_loads_both_folders_whole_and_compares(folders, tmp_path: Path, cli) -> None:
    folder, _ = folders("llama")
    result = cli("fold", folder, "--affine", "--stream", "--full-check", "-o", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    whole = json.loads(result.stdout)["checks"][-1]
    assert whole["label"].startswith("whole model") and whole["passed"] and whole["max_abs_diff"] < TOLERANCE
    alone = cli("fold", folder, "--affine", "--full-check", "-o", tmp_path / "other")
    assert alone.returncode != 0 and "--full-check checks a --stream run" in alone.stderr


def test_weightnorm_remove_streamed_refuses_a_class_that_builds_weight_norm(tmp_path: Path, cli) -> None:
    tf = pytest.importorskip("transformers")
    config = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                               num_conv_pos_embedding_groups=4, vocab_size=32)
    tf.Wav2Vec2Model(config).save_pretrained(tmp_path / "w2v")
    result = cli("weightnorm", "remove", tmp_path / "w2v", "--stream")
    assert result.returncode != 0
    assert ("Wav2Vec2Model builds encoder.pos_conv_embed.conv with a parametrization (weight norm) itself"
            in result.stderr)
    assert not (tmp_path / "w2v.plain").exists()


def test_a_tied_head_stays_tied_and_the_final_norm_is_left_with_the_reason(tmp_path: Path, cli) -> None:
    causal_lm("llama", tie=True).save_pretrained(tmp_path / "tied", max_shard_size="20KB")
    result = cli("fold", tmp_path / "tied", "--affine", "--stream", "--full-check", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    skipped = {s["module"]: s["reason"] for s in payload["skipped"]}
    assert "lm_head shares its weight with model.embed_tokens" in skipped["model.norm"]
    assert "lm_head.weight" not in _weight_map(tmp_path / "tied.folded")  # written as save_pretrained writes a tie
    assert payload["checks"][-1]["passed"]  # from_pretrained of both folders, whole
