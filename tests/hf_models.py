"""Small randomly initialised transformers models built offline from configs, shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from models.calibrate import randomize_affine

VOCAB = 64


def hf_model(name: str) -> nn.Module:
    """A small randomly initialised transformers model (no download), norm affines randomized, eval mode."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = {"vocab_size": VOCAB}
    if name == "llama":
        model = tf.LlamaModel(tf.LlamaConfig(**text, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    elif name in ("t5", "t5-encoder"):
        config = tf.T5Config(**text, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
        model = tf.T5Model(config) if name == "t5" else tf.T5EncoderModel(config)
    elif name == "convnext":
        model = tf.ConvNextModel(tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    elif name == "bert":
        model = tf.BertModel(tf.BertConfig(**text, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)
    elif name == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(**text, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    else:
        raise KeyError(name)
    return randomize_affine(model, torch.Generator().manual_seed(0)).eval()


TEXT = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64}
# What users save with save_pretrained: the generative heads (exported no-cache), vision backbones.
PRETRAINED = ("bert", "vit", "resnet", "mobilenetv2", "llama", "qwen2", "gpt2", "t5", "whisper")
TEXT_MODELS = ("bert", "llama", "qwen2", "gpt2", "t5", "whisper")


def pretrained_model(name: str) -> nn.Module:
    """A tiny randomly initialised model of a class users save_pretrained (hidden 32, 2 layers), norm affines
    randomized and BatchNorms given calibrated-looking statistics, eval mode. Names: :data:`PRETRAINED`."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4} if name == "t5" else {}
    builders = {
        "bert": lambda: tf.BertModel(tf.BertConfig(**TEXT)),
        "vit": lambda: tf.ViTModel(tf.ViTConfig(**{k: v for k, v in TEXT.items() if k not in ("vocab_size",
                                                   "max_position_embeddings")}, image_size=32, patch_size=8)),
        "resnet": lambda: tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
        "mobilenetv2": lambda: tf.MobileNetV2Model(tf.MobileNetV2Config(image_size=32, depth_multiplier=0.25)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, num_key_value_heads=2)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**TEXT, num_key_value_heads=2)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                        n_positions=64, bos_token_id=0, eos_token_id=0)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, **small, decoder_start_token_id=0)),
        "whisper": lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
            max_target_positions=32, decoder_start_token_id=0, pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    }
    model = randomize_affine(builders[name](), torch.Generator().manual_seed(0))
    if name in ("resnet", "mobilenetv2"):
        from tests.helpers import give_realistic_stats

        give_realistic_stats(model, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def encodec_model() -> nn.Module:
    """A tiny randomly initialised EncodecModel (8 kHz mono, hop 16, 2 codebooks of 16), eval mode: a codec whose
    forward takes ``input_values`` of shape (batch, channels, length)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.EncodecConfig(target_bandwidths=[4.0], sampling_rate=8000, audio_channels=1, num_filters=4,
                              hidden_size=16, upsampling_ratios=[4, 4], codebook_size=16, codebook_dim=16,
                              num_lstm_layers=1, num_residual_layers=1, kernel_size=3, last_kernel_size=3,
                              residual_kernel_size=3)
    return tf.EncodecModel(config).eval()


# Causal LMs whose final norm feeds lm_head (through transformers' token slice, GPT-2's view), and which
# tie lm_head to the input embedding by default: gemma, gpt2 and opt.
CAUSAL_LMS = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "opt")
TIED_BY_DEFAULT = ("gemma", "gpt2", "opt")


def causal_lm(name: str, *, tie: bool = False) -> nn.Module:
    """A tiny randomly initialised ``*ForCausalLM`` (hidden 32, 2 layers), norm affines randomized, eval mode;
    ``tie``: lm_head shares the input embedding's weight. Names: :data:`CAUSAL_LMS`."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tied, heads = {"tie_word_embeddings": tie}, {"num_key_value_heads": 2}
    ids = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    builders = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, **heads, **tied)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**TEXT, **heads, **tied)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**TEXT, **heads, **tied)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**TEXT, **heads, **tied, **ids, head_dim=8)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**TEXT, **heads, **tied, **ids)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                        n_positions=64, **ids, **tied)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                      num_attention_heads=4, max_position_embeddings=64,
                                                      word_embed_proj_dim=32, **ids, **tied)),
    }
    return randomize_affine(builders[name](), torch.Generator().manual_seed(0)).eval()


def pretrained_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, nn.Module]]:
    """``get(name)``: a :func:`pretrained_model` and its save_pretrained directory, each built on first use
    (for a module-scoped fixture: a module only pays for the architectures it tests)."""
    built: dict[str, tuple[Path, nn.Module]] = {}

    def get(name: str) -> tuple[Path, nn.Module]:
        if name not in built:
            model = pretrained_model(name)
            folder = tmp_path_factory.mktemp("pretrained") / name
            model.save_pretrained(folder)
            built[name] = folder, model
        return built[name]

    return get


def hf_inputs(name: str, seed: int = 0, batch: int = 2) -> tuple | dict:
    generator = torch.Generator().manual_seed(seed)
    if name == "convnext":
        return (torch.randn(batch, 3, 32, 32, generator=generator),)
    ids = torch.randint(0, VOCAB, (batch, 8), generator=generator)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return (ids,)


# Pre-norm transformers with LayerNorms, for LayerNorm -> RMSNorm by centring the residual stream (with causal_lm's
# gpt2 and opt, which tie lm_head to the input embedding): Phi's parallel attention + MLP and rotary embedding,
# ViT's class token and position embeddings, DINOv2's layer scales, Whisper's encoder (a GELU starts its stream)
# and decoder (tied proj_out), Swin's windows, drop-path and patch merging (its first stream starts at a LayerNorm).
PRENORM_MODELS = ("phi", "vit", "dinov2", "whisper", "swin")


def prenorm_model(name: str) -> nn.Module:
    """A tiny randomly initialised pre-norm transformer (hidden 32, 2 layers; Swin 16 then 32, one block a stage),
    norm affines and layer scales randomized, eval mode. Names: :data:`PRENORM_MODELS`."""
    tf = pytest.importorskip("transformers")
    if name in ("vit", "whisper"):
        return pretrained_model(name)
    torch.manual_seed(0)
    image = {"image_size": 32, "num_attention_heads": 4}
    builders = {
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**TEXT)),
        "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, mlp_ratio=2, patch_size=8,
                                                         **image)),
        "swin": lambda: tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                   num_heads=[2, 2], window_size=4)),
    }
    generator = torch.Generator().manual_seed(0)
    model = randomize_affine(builders[name](), generator)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("LayerScale"):
                module.lambda1.copy_(torch.rand(module.lambda1.shape, generator=generator) + 0.5)
    return model.eval()


def prenorm_inputs(name: str, seed: int = 0, batch: int = 2) -> tuple | dict:
    """Example inputs for :func:`prenorm_model` and :func:`causal_lm` (token ids, images, or Whisper's features)."""
    generator = torch.Generator().manual_seed(seed)
    if name in ("vit", "dinov2", "swin"):
        return (torch.randn(batch, 3, 32, 32, generator=generator),)
    if name == "whisper":
        return {"input_features": torch.randn(batch, 8, 32, generator=generator),
                "decoder_input_ids": torch.randint(0, VOCAB, (batch, 5), generator=generator)}
    return hf_inputs(name, seed, batch)
