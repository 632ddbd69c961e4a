"""``export_seq2seq_with_past`` / ``normsurgeon export --with-past`` on encoder-decoders (normsurgeon.onnx.with_past_seq2seq).

Tiny random T5ForConditionalGeneration and WhisperForConditionalGeneration (tests/hf_models.py). Each folder must
hold optimum's three files with optimum's names and dynamic dims, pass its own report (the encoder, the first
decoder step and 3 decode steps at batch 1 and 2, each within float32's default tolerance against torch's cache
loop; measured max per step: T5 1.2e-6, Whisper 7e-7 on the encoder and 1e-7 on the decoder steps), and a plain
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

from normsurgeon.errors import ExportError, OutputError
from normsurgeon.onnx.with_past_seq2seq import FILES, Seq2SeqLayout, export_seq2seq_with_past, verify_seq2seq
from tests.hf_models import VOCAB, hf_model, pretrained_model

MODELS = ("t5", "whisper")
NEW_TOKENS = 5
CROSS = "encoder_sequence_length_out"  # optimum's name for the cross-attention keys' length


@pytest.fixture
def exported(seq2seq_exports):
    """Each model's with-past export folder (tests/onnx/conftest.py: made once per test process)."""
    return seq2seq_exports


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def signature(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    graph = onnx.load(path).graph
    return {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}


@pytest.mark.parametrize("name", MODELS)
def test_every_step_matches_torch_at_two_batch_sizes(name, exported):
    _, _, report = exported(name)

    assert report.passed, [(c.label, c.max_abs_diff) for c in report.checks if not c.passed]
    labels = [c.label for c in report.checks]
    for batch in (1, 2):
        sequence = 32 if name == "whisper" else 6 + batch  # Whisper's frames; T5's prompt grows with the batch
        assert f"onnxruntime cpu vs torch (encoder_model, batch {batch}, sequence {sequence})" in labels
        assert f"onnxruntime cpu vs torch (decoder_model, batch {batch}, sequence 1)" in labels
        for step in (1, 2, 3):
            assert f"onnxruntime cpu vs torch (decode step {step}, batch {batch}, past {step})" in labels
    assert len(labels) == 10
    assert all(c.atol == 1e-5 and c.rtol == 1e-4 for c in report.checks)  # float32's defaults
    first = next(c for c in report.checks if "decoder_model" in c.label)
    assert {o.name for o in first.outputs} == {"logits", *(f"present.{i}.{part}.{kv}" for i in (0, 1)
                                                          for part in ("decoder", "encoder") for kv in ("key", "value"))}
    assert {o.name for o in report.checks[-1].outputs} == {"logits", *(f"present.{i}.decoder.{kv}" for i in (0, 1)
                                                                       for kv in ("key", "value"))}


@pytest.mark.parametrize("name", MODELS)
def test_the_folder_has_optimums_files_names_and_dynamic_dims(name, exported):
    _, folder, _ = exported(name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left

    encoder_in, encoder_out = signature(folder / "encoder_model.onnx")
    if name == "t5":
        assert encoder_in == {"input_ids": ["batch_size", "encoder_sequence_length"],
                              "attention_mask": ["batch_size", "encoder_sequence_length"]}
        assert encoder_out == {"last_hidden_state": ["batch_size", "encoder_sequence_length", 32]}
    else:
        assert encoder_in == {"input_features": ["batch_size", 8, 32]}  # Whisper accepts 32 frames only
        assert encoder_out == {"last_hidden_state": ["batch_size", 16, 32]}
    mask = {} if name == "whisper" else {"encoder_attention_mask": ["batch_size", "encoder_sequence_length"]}
    self_past, cross = ["batch_size", 4, "past_decoder_sequence_length", 8], ["batch_size", 4, CROSS, 8]

    decoder_in, decoder_out = signature(folder / "decoder_model.onnx")
    assert decoder_in == {"input_ids": ["batch_size", "decoder_sequence_length"], **mask,
                          "encoder_hidden_states": ["batch_size", "encoder_sequence_length", 32]}
    assert list(decoder_out) == ["logits", *[f"present.{i}.{part}.{kv}" for i in (0, 1) for part in ("decoder", "encoder")
                                             for kv in ("key", "value")]]
    assert decoder_out["logits"] == ["batch_size", "decoder_sequence_length", VOCAB]
    assert decoder_out["present.1.decoder.value"] == ["batch_size", 4, "decoder_sequence_length", 8]
    assert decoder_out["present.1.encoder.key"] == cross

    past_in, past_out = signature(folder / "decoder_with_past_model.onnx")
    assert past_in == {"input_ids": ["batch_size", "decoder_sequence_length"], **mask,
                       **{f"past_key_values.{i}.{part}.{kv}": self_past if part == "decoder" else cross
                          for i in (0, 1) for part in ("decoder", "encoder") for kv in ("key", "value")}}
    assert list(past_out) == ["logits", *[f"present.{i}.decoder.{kv}" for i in (0, 1) for kv in ("key", "value")]]
    assert past_out["present.0.decoder.key"] == [
        "batch_size", 4, "past_decoder_sequence_length + decoder_sequence_length", 8]



def prompt(name: str, batch: int = 2) -> dict[str, torch.Tensor]:
    """What a user feeds the encoder: token ids with the second row right-padded by 2, or mel features."""
    generator = torch.Generator().manual_seed(3)
    if name == "whisper":
        return {"input_features": torch.randn(batch, 8, 32, generator=generator)}
    ids = torch.randint(2, VOCAB, (batch, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, 4:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def onnx_greedy(folder: Path, encoder_feeds: dict[str, np.ndarray], start: int, new_tokens: int, eos: int,
                pad: int) -> np.ndarray:
    """A generation loop as an onnxruntime user writes it: the encoder once, decoder_model on the start token,
    then decoder_with_past_model fed its presents (the encoder ones from the first step); a row that produced
    ``eos`` gets ``pad`` from then on, and the loop stops when every row has (as generate() does)."""
    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])

    encoder, first, later = session("encoder_model.onnx"), session("decoder_model.onnx"), \
        session("decoder_with_past_model.onnx")
    hidden = encoder.run(None, encoder_feeds)[0]
    masks = {"encoder_attention_mask": encoder_feeds["attention_mask"]} if "attention_mask" in encoder_feeds else {}
    batch = hidden.shape[0]
    ids = np.full((batch, 1), start, dtype=np.int64)
    step, feeds = first, {"input_ids": ids, **masks, "encoder_hidden_states": hidden}
    past: dict[str, np.ndarray] = {}
    tokens, finished = ids, np.zeros(batch, bool)
    for _ in range(new_tokens):
        outputs = dict(zip([o.name for o in step.get_outputs()], step.run(None, feeds)))
        past.update({n.replace("present", "past_key_values", 1): v for n, v in outputs.items() if n != "logits"})
        ids = np.where(finished, pad, outputs["logits"][:, -1].argmax(-1))[:, None]
        finished |= ids[:, 0] == eos
        tokens = np.concatenate([tokens, ids], axis=1)
        if finished.all():
            break
        step, feeds = later, {"input_ids": ids, **masks, **past}  # the encoder keys stay those of the first step
    return tokens


@pytest.mark.parametrize("name", MODELS)
def test_an_onnxruntime_greedy_loop_generates_what_generate_does(name, exported):
    model, folder, _ = exported(name)
    feeds = prompt(name)
    config = model.generation_config

    with torch.no_grad():
        expected = model.generate(**feeds, do_sample=False, max_new_tokens=NEW_TOKENS)
    produced = onnx_greedy(folder, {k: v.numpy() for k, v in feeds.items()}, model.config.decoder_start_token_id,
                           NEW_TOKENS, eos=config.eos_token_id, pad=config.pad_token_id)

    if name == "whisper":  # Whisper's generate() returns the new tokens without the start token
        produced = produced[:, 1:]
    assert produced.tolist() == expected.tolist()


def test_the_verification_fails_a_folder_of_another_model(exported):
    model, folder, _ = exported("t5")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decoder.block[1].layer[2].DenseReluDense.wo.weight.mul_(1.01)  # decoder layer 1's MLP only

    report = verify_seq2seq(other, folder, Seq2SeqLayout.of(other))

    assert not report.passed
    encoder = [c for c in report.checks if "encoder_model" in c.label]
    decoder = [c for c in report.checks if "encoder_model" not in c.label]
    assert len(encoder) == 2 and all(c.passed for c in encoder)  # the encoder is unchanged
    assert len(decoder) == 8 and not any(c.passed for c in decoder)
    assert {o.name for o in decoder[-1].outputs if not o.passed} == {"logits"}  # layer 1's presents come before


def test_a_decoder_sequence_of_several_tokens_runs_in_both_decoders(exported):
    """The decoder sequence is dynamic (optimum fixes it to 1 with past): a 3-token step matches torch too."""
    from transformers import DynamicCache, EncoderDecoderCache

    model, folder, _ = exported("whisper")
    features = prompt("whisper", batch=2)
    ids = torch.tensor([[0, 5, 9], [0, 7, 3]])
    with torch.no_grad():
        hidden = model.get_encoder()(**features).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        first = model(decoder_input_ids=ids, encoder_outputs=(hidden,), cache=cache, use_cache=True)
        second = model(decoder_input_ids=ids[:, :2] + 1, encoder_outputs=(hidden,), cache=first.cache, use_cache=True)
    decoder = ort.InferenceSession(str(folder / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    later = ort.InferenceSession(str(folder / "decoder_with_past_model.onnx"), providers=["CPUExecutionProvider"])
    outputs = decoder.run(None, {"input_ids": ids.numpy(), "encoder_hidden_states": hidden.numpy()})
    past = {o.name.replace("present", "past_key_values", 1): v for o, v in zip(decoder.get_outputs(), outputs)
            if o.name != "logits"}
    logits = later.run(["logits"], {"input_ids": (ids[:, :2] + 1).numpy(), **past})[0]

    np.testing.assert_allclose(outputs[0], first.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits, second.logits.numpy(), atol=1e-5)


def test_an_existing_folder_is_refused_without_force_and_replaced_with_it(exported, tmp_path):
    model, _, _ = exported("whisper")
    folder = tmp_path / "whisper-onnx"
    folder.mkdir()
    (folder / "encoder_model.onnx").write_bytes(b"old")

    with pytest.raises(OutputError, match="exists; pass --force"):
        export_seq2seq_with_past(model, folder)
    report = export_seq2seq_with_past(model, folder, force=True, decode_steps=1)

    assert report.passed and sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["whisper-onnx"]  # the old folder and the staging one are gone


def test_a_folder_that_is_not_an_export_is_not_replaced_even_with_force(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")

    with pytest.raises(OutputError, match="not an encoder-decoder ONNX export folder"):
        export_seq2seq_with_past(pretrained_model("t5"), folder, force=True)
    assert (folder / "notes.txt").read_text() == "keep"


def test_an_encoder_decoder_without_a_language_head_is_refused(tmp_path):
    with pytest.raises(ExportError, match="returns no logits and EncoderDecoderCache"):
        export_seq2seq_with_past(hf_model("t5"), tmp_path / "t5-onnx")  # T5Model: no lm_head
    assert list(tmp_path.iterdir()) == []


def test_bart_exports_and_passes_too(tmp_path):
    """Nothing in the export is T5's or Whisper's own: BART's decoder (learned positions, no relative bias) passes."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    report = export_seq2seq_with_past(tf.BartForConditionalGeneration(config).eval(), tmp_path / "bart-onnx",
                                      decode_steps=1)

    assert report.passed and len(report.checks) == 6


def test_a_bfloat16_whisper_passes_within_its_dtypes_tolerance(tmp_path):
    """Measured: 0.031 on the encoder, 0.002 on the decoder steps (bfloat16's tolerance: 1e-2 + 1e-2 * scale)."""
    model = pretrained_model("whisper").to(torch.bfloat16)

    report = export_seq2seq_with_past(model, tmp_path / "whisper-onnx", decode_steps=1)

    assert report.passed and len(report.checks) == 6
    assert all(c.atol == 1e-2 for c in report.checks)
    assert any("no bfloat16 kernel" in note for note in report.notes)


def test_an_audio_encoder_decoder_other_than_whisper_is_refused(tmp_path):
    tf = pytest.importorskip("transformers")
    config = tf.Speech2TextConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, input_feat_per_channel=8, conv_channels=16)
    with pytest.raises(ExportError, match="covers Whisper's encoder"):
        export_seq2seq_with_past(tf.Speech2TextForConditionalGeneration(config).eval(), tmp_path / "s2t-onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_an_encoder_decoder_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"\*ForConditionalGeneration"):
        export_seq2seq_with_past(nn.Linear(2, 2), tmp_path / "linear-onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_cli_exports_a_save_pretrained_encoder_decoder_to_a_folder(tmp_path, cli):
    folder = tmp_path / "t5"
    pretrained_model("t5").save_pretrained(folder)

    result = cli("export", folder, "--with-past")

    assert result.returncode == 0, result.stderr
    assert "decode step 3, batch 2, past 3" in result.stdout
    assert sorted(p.name for p in (tmp_path / "t5-onnx").iterdir()) == sorted(FILES)
    again = cli("export", folder, "--with-past")
    assert again.returncode != 0 and "t5-onnx exists; pass --force" in again.stderr


def test_the_cli_refuses_an_existing_folder_before_exporting(tmp_path, cli):
    folder = tmp_path / "whisper"
    pretrained_model("whisper").save_pretrained(folder)
    (tmp_path / "out").mkdir()

    result = cli("export", folder, "--with-past", "-o", tmp_path / "out")

    assert result.returncode == 8 and "out exists; pass --force to replace it" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []
