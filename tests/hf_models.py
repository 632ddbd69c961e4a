"""Small randomly initialised transformers models built offline from configs, shared by the tests."""

from __future__ import annotations

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


def hf_inputs(name: str, seed: int = 0, batch: int = 2) -> tuple | dict:
    generator = torch.Generator().manual_seed(seed)
    if name == "convnext":
        return (torch.randn(batch, 3, 32, 32, generator=generator),)
    ids = torch.randint(0, VOCAB, (batch, 8), generator=generator)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return (ids,)
