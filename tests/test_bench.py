"""Benchmarks run end to end on tiny models; their speed figures are reported, never asserted."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from kedit.engine.bench import random_model, steering_throughput
from kedit.tui.cli import main

SHAPE = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 12,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 128}


def test_steering_throughput_times_both_kinds_and_leaves_the_model_unsteered() -> None:
    model = random_model(SHAPE)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        before = model(ids).logits
    result = steering_throughput(model, "tiny", n_vectors=3, new_tokens=4, prompt_tokens=5, repeats=1)
    assert result.layers == 12 and result.plain_tps > 0 and result.steered_tps > 0
    assert abs(result.ratio - result.steered_tps / result.plain_tps) < 1e-12
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert not model._forward_pre_hooks and not any(layer._forward_hooks for layer in model.model.layers)


def test_bench_cli_reports_json_and_refuses_an_unknown_shape(fact_world_dir) -> None:
    import json

    result = CliRunner().invoke(main, ["bench", "steering", "--tokens", "4", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows[0]["label"] == "fact-world" and rows[0]["layers"] == 6 and rows[0]["ratio"] > 0
    result = CliRunner().invoke(main, ["bench", "steering", "--random", "gpt-9"])
    assert result.exit_code == 1 and "no shape gpt-9" in result.output


def test_bench_tui_measures_echo_while_a_reply_streams(fact_world_dir) -> None:
    """The reply is forced to its full length (min_new_tokens), and keys were echoed both idle
    and while it streamed; the latencies themselves are reported, not asserted."""
    import json

    result = CliRunner().invoke(main, ["bench", "tui", "--tokens", "60", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["tokens"] == 60
    assert figures["idle"]["samples"] > 0 and figures["generating"]["samples"] > 0
    assert figures["generating"]["echo_median_ms"] > 0
