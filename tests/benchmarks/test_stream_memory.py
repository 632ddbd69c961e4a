"""The streamed-surgery benchmark measures a tiny checkpoint end to end: sizes from the headers, a passing stream
with its peak RSS, cp's wall, and nothing left behind. No timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import stream_memory

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 128, "tie_word_embeddings": False, "max_position_embeddings": 64}


@pytest.mark.slow
def test_measure_depth_on_a_tiny_sharded_llama(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = tmp_path / "llama-3"
    stream_memory.build_checkpoint(folder, 3, TINY, shard="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 1

    row = stream_memory.measure_depth(folder, tmp_path, overhead=0)

    # a block: q/k/v/o 4*32*32, gate/up/down 3*32*64, two norms of 32; ends: embedding and head 128*32, final norm 32
    assert row["layers"] == 3 and row["largest_block_bytes"] == 4 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32)
    assert row["ends_bytes"] == 4 * (2 * 128 * 32 + 32)
    assert row["rc"] == 0 and row["passed"], row.get("stderr_tail")
    # the address space is sampled every 20 ms (a lower bound under load), the RSS peak is the kernel's own
    assert row["peak_rss_bytes"] > 0 and row["peak_vm_bytes"] > 0 and row["wall_s"] > 0 and row["cp_wall_s"] > 0
    assert row["rss_less_fixed_over_block_and_ends"] == row["rss_over_block_and_ends"]
    assert {path.name for path in tmp_path.iterdir()} == {"llama-3"}  # the copy and the output are removed
