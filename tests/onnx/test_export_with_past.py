"""``export_with_past`` / ``normsurgeon export --with-past``: KV-cache ONNX of causal LMs (normsurgeon.onnx.with_past).

Tiny random Llama, Qwen2 and GPT-2 (tests/hf_models.py ``causal_lm``). Each file must have optimum's
text-generation-with-past names and dynamic dims, pass its own report (a prefill and 3 decode steps at batch
1 and 2, each within float32's default tolerance against torch's cache loop; measured <= 1.2e-7), and a plain
onnxruntime greedy loop written here must generate the tokens ``model.generate(do_sample=False)`` does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from normsurgeon.errors import ExportError
from normsurgeon.onnx.with_past import CacheLayout, export_with_past, verify_with_past
from tests.hf_models import VOCAB, causal_lm, pretrained_model

MODELS = ("llama", "qwen2", "gpt2")
NEW_TOKENS = 5
PAD = 0


@pytest.fixture
def exported(with_past_exports):
    """Each model's with-past export (tests/onnx/conftest.py: made once per test process)."""
    return with_past_exports


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", MODELS)
def test_every_prefill_and_decode_step_matches_torch_at_two_batch_sizes(name, exported):
    _, _, report = exported(name)

    assert report.passed, [(c.label, c.max_abs_diff) for c in report.checks if not c.passed]
    labels = [c.label for c in report.checks]
    for batch in (1, 2):
        assert f"onnxruntime cpu vs torch (prefill, batch {batch}, sequence 7)" in labels
        for step in (1, 2, 3):
            assert f"onnxruntime cpu vs torch (decode step {step}, batch {batch}, past {6 + step})" in labels
    assert all(c.atol == 1e-5 and c.rtol == 1e-4 for c in report.checks)  # float32's defaults
    assert {o.name for o in report.checks[-1].outputs} == {"logits", "present.0.key", "present.0.value",
                                                          "present.1.key", "present.1.value"}


@pytest.mark.parametrize("name", MODELS)
def test_the_file_has_optimums_names_and_dynamic_dims(name, exported):
    model, path, _ = exported(name)
    graph = onnx.load(path).graph
    heads = 4 if name == "gpt2" else 2  # GPT-2 has no grouped-query attention

    inputs = {v.name: dims(v) for v in graph.input}
    past = ["batch", heads, "past_sequence", 8]
    assert inputs == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "total_sequence"],
                      "position_ids": ["batch", "sequence"],
                      **{f"past_key_values.{i}.{kv}": past for i in (0, 1) for kv in ("key", "value")}}
    outputs = {v.name: dims(v) for v in graph.output}
    assert list(outputs) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert outputs["logits"] == ["batch", "sequence", VOCAB]
    assert outputs["present.1.value"] == ["batch", heads, "past_sequence + sequence", 8]


def test_the_verification_fails_a_file_of_another_model(exported):
    model, path, _ = exported("llama")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # layer 1 only: the presents of layer 0 still match

    report = verify_with_past(other, path, CacheLayout.of(other))

    assert not report.passed and all(not c.passed for c in report.checks)
    assert {o.name for o in report.checks[-1].outputs if not o.passed} == {"logits"}


def test_an_opset_18_file_passes_under_left_padding(tmp_path):
    """Below opset 23 a padded query's row differs from torch's (attention over no key); unread, not compared."""
    report = export_with_past(causal_lm("llama"), tmp_path / "llama18.onnx", opset=18)

    assert report.passed and report.facts["opset"] == 18
    assert len(report.checks) == 8


def onnx_greedy(path: Path, ids: np.ndarray, mask: np.ndarray, new_tokens: int, eos: int, pad: int) -> np.ndarray:
    """A generation loop as an onnxruntime user writes it: an empty past, then each step's presents fed back;
    a row that produced ``eos`` gets ``pad`` from then on (as generate() does)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    batch = ids.shape[0]
    feeds = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    tokens, step_ids, finished = ids, ids, np.zeros(batch, bool)
    for _ in range(new_tokens):
        positions = np.where(mask == 0, 1, mask.cumsum(-1) - 1)[:, -step_ids.shape[1]:]
        feeds.update(input_ids=step_ids, attention_mask=mask, position_ids=positions)
        logits, *presents = sess.run(None, feeds)
        feeds.update({i.name: p for i, p in zip(past_inputs, presents)})
        step_ids = np.where(finished, pad, logits[:, -1].argmax(-1))[:, None]
        finished |= step_ids[:, 0] == eos
        tokens = np.concatenate([tokens, step_ids], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)
    return tokens


@pytest.mark.parametrize("name", MODELS)
def test_an_onnxruntime_greedy_loop_generates_what_generate_does(name, exported):
    model, path, _ = exported(name)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second prompt is two tokens shorter, left-padded
    ids[1, :2] = PAD
    eos = model.generation_config.eos_token_id

    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                                  pad_token_id=PAD)
    produced = onnx_greedy(path, ids.numpy(), mask.numpy(), NEW_TOKENS, eos=eos, pad=PAD)

    assert produced.tolist() == expected.tolist()


def test_a_model_without_a_cache_is_refused(tmp_path):
    with pytest.raises(ExportError, match="causal LM"):
        export_with_past(nn.Linear(2, 2), tmp_path / "linear.onnx")


def test_an_encoder_decoder_is_pointed_to_the_folder_export_before_any_export(tmp_path):
    with pytest.raises(ExportError, match="export_seq2seq_with_past"):
        export_with_past(pretrained_model("t5"), tmp_path / "t5.onnx")
    assert not any(tmp_path.iterdir())


def test_the_cache_layout_is_read_from_the_model():
    layout = CacheLayout.of(causal_lm("llama"))

    assert (layout.layers, layout.kv_heads, layout.head_dim, layout.vocab) == (2, 2, 8, VOCAB)
    assert layout.cache_keyword in ("cache", "past_key_values") and layout.positions


@pytest.mark.slow
def test_the_cli_exports_a_save_pretrained_directory_with_past(tmp_path, cli):
    folder = tmp_path / "llama"
    pretrained_model("llama").save_pretrained(folder)

    result = cli("export", folder, "--with-past")

    assert result.returncode == 0, result.stderr
    assert "decode step 3, batch 2, past 9" in result.stdout
    names = [i.name for i in onnx.load(tmp_path / "llama.onnx").graph.input]
    assert names[-1] == "past_key_values.1.value"


def test_the_cli_refuses_with_past_with_dynamic_axes(tmp_path, cli):
    result = cli("export", tmp_path / "missing", "--with-past", "--dynamic")

    assert result.returncode != 0 and "--with-past sets its own inputs" in result.stderr
