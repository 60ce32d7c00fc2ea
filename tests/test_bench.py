"""Benchmarks run end to end on tiny models; their speed figures are reported, never asserted."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from kedit.engine.bench import random_model, steering_throughput
from kedit.engine.errors import KeditError
from kedit.tui.cli import main

SHAPE = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "max_position_embeddings": 128,
}


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


# -- training only the layers above the edit ----------------------------------------------


def test_replay_below_gives_bit_identical_values_and_puts_the_blocks_back(session, monkeypatch) -> None:
    """ROME's value, GRACE's value and a WISE edit's side memory come out torch.equal whether
    the blocks below the edit layer run on every pass or are replayed from the first."""
    from contextlib import nullcontext

    import kedit.engine.methods.wise.train as wise
    from kedit.engine.methods import EditRequest
    from kedit.engine.methods.grace.params import GraceParams
    from kedit.engine.methods.grace.value import train_value
    from kedit.engine.methods.replay import replay_below
    from kedit.engine.methods.rome.hparams import RomeParams
    from kedit.engine.methods.rome.key import compute_key
    from kedit.engine.methods.rome.update import update_direction
    from kedit.engine.methods.rome.value import compute_value
    from kedit.engine.methods.wise.params import WiseParams
    from kedit.engine.methods.wise.train import train_edit

    h = session.handle
    blocks = list(h.adapter.layers())
    fact = session.fact_world().facts[3]
    layer = 3
    module = h.adapter.mlp_out(layer)
    key, v = compute_key(h.model, h.tokenizer, module, fact.prompt(0), fact.subject, ["{}"])
    direction = update_direction(key, key)
    hp = RomeParams(v_steps=6, nll_stop=0.0)
    full = compute_value(h.model, h.tokenizer, module, fact.prompt(0), fact.subject, " Paris", ["{}"], v, direction, hp)
    upper = compute_value(
        h.model,
        h.tokenizer,
        module,
        fact.prompt(0),
        fact.subject,
        " Paris",
        ["{}"],
        v,
        direction,
        hp,
        adapter=h.adapter,
        layer=layer,
    )
    assert full.steps == upper.steps == 6 and torch.equal(full.delta, upper.delta)
    # with chat rows: a second batch of rows, each batch replayed from its own first pass
    chat = ["Q: tell me about it\nA: ", "Q: and then?\nA: "]
    args = (h.model, h.tokenizer, module, fact.prompt(0), fact.subject, " Paris", ["{}"], v, direction, hp)
    two = compute_value(*args, chat=chat)
    two_upper = compute_value(*args, adapter=h.adapter, layer=layer, chat=chat)
    assert torch.equal(two.delta, two_upper.delta) and not torch.equal(two.delta, full.delta)

    gp = GraceParams(n_iter=6, nll_stop=0.0)
    init = torch.zeros(h.adapter.hidden_size)
    a = train_value(h.model, h.tokenizer, module, fact.prompt(0), " Paris", init, gp)
    b = train_value(h.model, h.tokenizer, module, fact.prompt(0), " Paris", init, gp, adapter=h.adapter, layer=layer)
    assert a[3] == b[3] == 6 and torch.equal(a[0], b[0])

    request = EditRequest(fact.prompt(0), fact.subject, " Paris")
    wp = WiseParams(n_iter=6, nll_stop=0.0, margin_stop=0.0)
    had_memory = dict(h.model.__dict__.get("_kedit_wise", {}))
    patch, info = train_edit(h, request, wp, layer, "x", ["The", "It is"])
    assert info.value_steps == 6
    with monkeypatch.context() as m:  # the same edit with every block run on every pass
        m.setattr(wise, "replay_below", lambda adapter, layer: nullcontext())
        again, _ = train_edit(h, request, wp, layer, "y", ["The", "It is"])
    h.model.__dict__["_kedit_wise"] = had_memory  # the unapplied edits opened a side memory
    assert torch.equal(patch.values, again.values)

    assert list(h.adapter.layers()) == blocks
    with replay_below(h.adapter, layer):
        h.model(torch.tensor([[1, 5, 6]]))
        with pytest.raises(RuntimeError, match="same input"):
            h.model(torch.tensor([[1, 5]]))
    assert list(h.adapter.layers()) == blocks


# -- the whole bench ------------------------------------------------------------------------


def test_run_bench_measures_every_part_and_leaves_the_model_as_it_was(session) -> None:
    from kedit.engine.bench import BenchPlan, report_text, run_bench

    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        before = session.model(ids).logits
    plan = BenchPlan(
        edit_repeats=1, vectors=(1, 3), active=(2, 3), new_tokens=4, prompt_tokens=6, repeats=1, stats_samples=40
    )
    report = run_bench(session, plan)
    rome = report["edits"]["rome"]
    assert rome["stats_tokens"] > 0 and rome["stats_s"] > 0 and "sampled" in rome["stats_source"]
    for step in ("key", "value", "update", "compute", "probe", "edit", "rollback"):
        assert rome[step] > 0, step
    assert rome["edit"] >= rome["compute"] >= rome["value"]
    for method in ("grace", "wise"):
        assert report["edits"][method]["compute"] > 0 and report["edits"][method]["rollback"] > 0
    labels = [c["label"] for c in report["generation"]["conditions"]]
    assert labels == ["1 vector", "3 vectors", "rome × 2", "rome × 3", "grace × 2", "grace × 3", "wise × 2", "wise × 3"]
    for c in report["generation"]["conditions"]:
        assert c["ratio"] > 0 and c["first_token_ratio"] > 0
    mem = report["memory"]
    assert mem["kind"] == "peak RSS" and mem["generation_peak_bytes"] > 0
    # WISE's three edits hold their masked changes: more than the side memory's float32 D alone
    d = session.handle.adapter.hidden_size * session.handle.adapter.mlp_hidden_size * 4
    assert mem["added_by_active_edits_bytes"]["wise × 3"] > d
    assert mem["added_by_active_edits_bytes"]["rome × 3"] > 0
    assert "rome × 3" in report_text(report) and "key statistics" in report_text(report)
    # nothing the bench made is left: no edits, no vectors, no hooks, the same logits
    assert not session.edits and not session.steering.slots
    assert not any(m._forward_hooks for m in session.model.modules())
    with torch.no_grad():
        assert torch.equal(session.model(ids).logits, before)


def test_bench_json_on_the_fact_world_with_real_active_edits(fact_world_dir) -> None:
    """The CI smoke run: `kedit bench --json` works end to end (its speed is not judged)."""
    import json

    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--json",
            "--methods",
            "rome,grace",
            "--edit-repeats",
            "1",
            "--vectors",
            "1",
            "--active",
            "2",
            "--fill",
            "real",
            "--tokens",
            "4",
            "--prompt-tokens",
            "6",
            "--repeats",
            "1",
            "--stats-samples",
            "40",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["plan"]["fill"] == "real" and set(report["edits"]) == {"rome", "grace"}
    assert [c["label"] for c in report["generation"]["conditions"]] == ["1 vector", "rome × 2", "grace × 2"]
    assert report["generation"]["plain"]["tokens_per_s"] > 0
    bad = CliRunner().invoke(main, ["bench", "--methods", "memitt"])
    assert bad.exit_code == 1 and "unknown method memitt" in bad.output and "Traceback" not in bad.output


def test_a_random_shape_gets_a_word_tokenizer_and_benches(tmp_path) -> None:
    from kedit.engine.bench import BenchPlan, run_bench, shape_handle
    from kedit.engine.config import Config
    from kedit.engine.session import Session

    config = Config.load().with_overrides({"shapes.tiny-llama": {**SHAPE, "vocab_size": 300}})
    s = Session(shape_handle(config, "tiny-llama", n_layers=4), config)
    assert s.handle.adapter.n_layers == 4 and s.handle.source.kind == "shape"
    assert s.model.config.vocab_size == 300 and len(s.tokenizer) == 300
    ids = s.tokenizer("Ada Novak attended t250")["input_ids"]
    assert ids[0] == 1 and 3 not in ids and s.tokenizer.decode(ids[1:]) == "Ada Novak attended t250"
    report = run_bench(
        s,
        BenchPlan(
            methods=("rome",),
            edit_repeats=1,
            vectors=(),
            active=(2,),
            new_tokens=3,
            prompt_tokens=4,
            repeats=1,
            stats_samples=8,
        ),
    )
    assert report["edits"]["rome"]["value"] > 0 and report["model"].startswith("random tiny-llama")
    with pytest.raises(KeditError, match="no shape gpt-9"):
        shape_handle(config, "gpt-9")


def test_rome_value_with_kept_prefixes_matches_whole_rows() -> None:
    """ROME's value run on the rows' tokens from each cut (the tokens before it kept as the
    attention cache) reaches the δ of whole rows: the update reaches the kept tokens by at most
    ``prefix_reach`` of δ, and every cut is where that share is first exceeded or the row's
    first read."""
    from tiny_models import build_tiny, char_tokenizer, full_pass_io

    from kedit.engine.arch import ArchAdapter
    from kedit.engine.methods.reads import Reads
    from kedit.engine.methods.rome.hparams import RomeParams
    from kedit.engine.methods.rome.key import compute_key
    from kedit.engine.methods.rome.update import update_direction
    from kedit.engine.methods.rome.value import compute_value, prefix_cuts

    model, tok = build_tiny("llama"), char_tokenizer()
    adapter = ArchAdapter.for_model(model)
    layer = 1
    module = adapter.mlp_out(layer)
    prompt, subject, contexts = "So Ann Lee went to", "Ann Lee", ["{}", "Well, yes. {}", "No! {}"]
    key, v = compute_key(model, tok, module, prompt, subject, contexts)
    direction = update_direction(key, key)

    rows = [tok(c.format(prompt))["input_ids"] for c in contexts]
    reads = Reads()
    for r, row in enumerate(rows):
        reads.at(r, len(row) - 1)
    reach = 0.3
    cut = prefix_cuts(model, tok, module, rows, [[0, 1, 2]], reads, direction, reach)
    for r, row in enumerate(rows):
        seen = full_pass_io(model, module, input_ids=torch.tensor([row]))
        share = (seen["input"][0].float() @ direction).abs()
        assert 0 < cut[r] <= len(row) - 1 and bool((share[: cut[r]] <= reach).all())
        assert cut[r] == len(row) - 1 or float(share[cut[r]]) > reach

    chat = ["Q: tell me of Ann Lee\nA: "]
    args = (model, tok, module, prompt, subject, " Yale", contexts, v, direction)
    whole = compute_value(
        *args,
        RomeParams(v_steps=12, nll_stop=0.0, v_weight_decay=0.0, clamp_norm_factor=100.0, prefix_reach=0.0),
        chat=chat,
    )
    kept = compute_value(
        *args,
        RomeParams(v_steps=12, nll_stop=0.0, v_weight_decay=0.0, clamp_norm_factor=100.0, prefix_reach=reach),
        adapter=adapter,
        layer=layer,
        chat=chat,
    )
    cos = torch.nn.functional.cosine_similarity(whole.delta, kept.delta, dim=0)
    print(f"\nkept prefixes vs whole rows: cos(δ) {float(cos):.4f}, NLL {whole.nll_after:.3f} / {kept.nll_after:.3f}")
    assert kept.nll_before == pytest.approx(whole.nll_before, rel=1e-4)  # δ = 0: the same computation
    assert float(cos) > 0.95 and kept.nll_after == pytest.approx(whole.nll_after, rel=0.2)
    assert kept.nll_after < kept.nll_before - 0.1  # and it moved (a random tiny model learns slowly)
