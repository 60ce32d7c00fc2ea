"""ROME's key statistics C: passes that stop at the edit layer, the rows they read, the cache and
its recipe, causal tracing's replayed blocks, and the quality of the quick C on SmolLM2."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import build_tiny, char_tokenizer, full_pass_io

from kedit.engine import trace
from kedit.engine.arch import ArchAdapter
from kedit.engine.errors import KeditError
from kedit.engine.methods.rome import stats
from kedit.engine.metrics import pad_right

TEXTS = [
    "Watts Humphrey attended Illinois Institute of Technology.",
    "Denny Herzig plays as a goalkeeper.",
    "The Louvre is located in Paris.",
]


def _tiny(model_type: str) -> SimpleNamespace:
    """A handle-like object on a tiny random model with the character tokenizer."""
    model = build_tiny(model_type, seed=0)
    return SimpleNamespace(
        model=model,
        tokenizer=char_tokenizer(),
        adapter=ArchAdapter.for_model(model),
        cache_key=f"tiny-{model_type}",
        caches={},
    )


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- passes that stop at the edit layer ------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_keys_stop_at_the_edit_layer_and_equal_a_full_pass(model_type: str) -> None:
    h = _tiny(model_type)
    rows = [h.tokenizer(t)["input_ids"] for t in TEXTS]
    ids, mask = pad_right(rows, 0, "cpu")
    full = full_pass_io(h.model, h.adapter.mlp_out(1), input_ids=ids, attention_mask=mask)
    ran: list[str] = []
    above = [
        h.adapter.layer(2).register_forward_hook(lambda *a: ran.append("block 2")),
        h.adapter.lm_head().register_forward_hook(lambda *a: ran.append("head")),
    ]
    keys = stats.layer_keys(h.model, h.adapter.mlp_out(1), ids, mask)
    for handle in above:
        handle.remove()
    assert torch.equal(keys, full["input"])  # bit for bit: the same computation, cut short
    assert ran == []  # nothing above the edit layer's MLP ran
    assert _hooks(h.model) == 0


def test_second_moment_is_the_shrunk_mean_outer_product_over_real_tokens() -> None:
    h = _tiny("llama")
    rows = [h.tokenizer(t)["input_ids"] for t in TEXTS]  # 58, 36 and 32 ids: two rows padded
    c, count, weight = stats.second_moment(h, 1, rows)
    keys = []
    for r in rows:  # one row at a time: no padding at all
        keys.append(full_pass_io(h.model, h.adapter.mlp_out(1), input_ids=torch.tensor([r]))["input"][0])
    k = torch.cat(keys).double()
    plain = k.T @ k / count
    assert count == sum(len(r) for r in rows) == k.shape[0] == 126
    # Ledoit-Wolf: the weight on μI is the keys' sampling noise over their spread around μI
    mu = plain.diagonal().mean()
    noise = sum(float(((x[:, None] * x[None, :] - plain) ** 2).sum()) for x in k) / count**2
    spread = float(((plain - mu * torch.eye(128, dtype=plain.dtype)) ** 2).sum())
    assert weight == pytest.approx(min(1.0, noise / spread), rel=1e-4)
    assert 0.1 < weight < 0.3  # 126 tokens for 128-wide keys: heavy shrinkage (observed 0.16)
    shrunk = (1 - weight) * plain + weight * mu * torch.eye(128, dtype=plain.dtype)
    assert torch.allclose(c.double(), shrunk, rtol=1e-5, atol=1e-7)


def test_shrinkage_fades_as_tokens_grow() -> None:
    torch.manual_seed(0)
    scale = torch.linspace(0.2, 3.0, 64)  # keys with a spread of variances, as real keys have
    weights = []
    for n in (64, 512, 4096, 32768):
        acc = stats.Moment(torch.zeros((64, 64), dtype=torch.float64))
        acc.add(torch.randn(n, 64) * scale)
        c, w = acc.shrunk()
        weights.append(w)
        assert torch.allclose(c.diagonal().mean().double(), (acc.outer / n).diagonal().mean(), rtol=1e-6)
    assert weights == sorted(weights, reverse=True) and weights[0] > 0.3 and weights[-1] < 0.01
    assert 5 < weights[2] / weights[3] < 11  # about 1/tokens once there are many (observed 0.6, 0.16, 0.023, 0.0029)


# -- rows ------------------------------------------------------------------------------------


def test_packed_rows_are_full_open_like_a_text_and_spread_over_the_corpus() -> None:
    tok = char_tokenizer()  # adds <s> (id 1) before a text
    assert stats.special_prefix(tok) == [1]
    texts = [f"Paragraph {i:02d} of the corpus." for i in range(40)]  # 26 characters each
    rows = stats.token_rows(tok, texts, 8, 17, packed=True)
    stream = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    assert len(rows) == 8 and all(len(r) == 17 and r[0] == 1 for r in rows)
    assert rows[0][1:] == stream[:16]  # the first window opens the corpus ...
    whole = len(stream) // 16
    assert rows[-1][1:] == stream[(whole - 1) * 16 : whole * 16]  # ... the last one closes it
    assert len(stats.token_rows(tok, texts, 10_000, 17, packed=True)) == whole  # never more than there is
    unpacked = stats.token_rows(tok, texts, 3, 10, packed=False)
    assert unpacked == [tok(t)["input_ids"][:10] for t in texts[:3]]


# -- the cache and its recipe ----------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sampled_c_is_cached_under_its_recipe_and_read_back(cache: Path) -> None:
    h = _tiny("llama")
    first = stats.key_stats(h, 1, 4, 12)
    assert not first.cached and first.source.startswith("text sampled from the model itself (4 samples")
    assert 4 <= first.tokens <= 4 * 12
    files = list((cache / "stats" / "tiny-llama").iterdir())
    assert [f.name for f in files] == [f"layer1-n4-t12-sampled-r{stats.RECIPE}.safetensors"]
    again = stats.key_stats(h, 1, 4, 12)
    assert again.cached and torch.equal(again.c, first.c) and again.tokens == first.tokens
    assert again.source == first.source
    fresh = stats.key_stats(h, 1, 4, 12, refresh=True)
    assert not fresh.cached and torch.equal(fresh.c, first.c)  # seed 0: the same samples again
    other = stats.key_stats(h, 2, 4, 12)
    assert not other.cached and not torch.equal(other.c, first.c)


def test_a_corpus_file_is_tagged_by_its_content(cache: Path, tmp_path: Path) -> None:
    h = _tiny("gpt2")
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TEXTS), encoding="utf-8")
    one = stats.key_stats(h, 0, 8, 16, corpus=path)
    assert one.source.startswith(f"the text file {path}") and one.tokens == 8 * 16  # 129 ids: 8 rows of 1 + 15
    path.write_text("\n\n".join(TEXTS[::-1]) + "\n\nAnother paragraph entirely.", encoding="utf-8")
    two = stats.key_stats(h, 0, 8, 16, corpus=path)
    assert not two.cached and not torch.equal(one.c, two.c)
    assert len(list((cache / "stats" / "tiny-gpt2").glob(f"layer0-n8-t16-file-*-r{stats.RECIPE}.safetensors"))) == 2
    with pytest.raises(KeditError, match="not a file"):
        stats.key_stats(h, 0, 8, 16, corpus=tmp_path / "missing.txt")


def test_the_hub_when_it_answers_else_the_models_own_text(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = _tiny("llama")
    monkeypatch.setattr(stats, "hub_reachable", lambda: True)
    monkeypatch.setattr(stats, "hub_texts", lambda n: None)  # the hub does not answer
    assert stats.key_stats(h, 1, 4, 12).source.startswith("text sampled from the model itself")
    monkeypatch.setattr(stats, "hub_texts", lambda n: TEXTS)
    hub = stats.key_stats(h, 1, 4, 12)
    assert hub.source.startswith("the hub dataset wikitext-103") and not hub.cached
    assert stats.key_stats(h, 1, 4, 12).cached


# -- causal tracing: blocks below the restored window replay the corrupted pass ---------------


@pytest.mark.parametrize("window", [1, 2])
def test_trace_reuses_the_corrupted_prefix_and_replays_the_blocks_below_the_window(
    monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    h = _tiny("llama")
    args = (h.model, h.tokenizer, h.adapter, "Watts Humphrey attended", "Watts Humphrey")
    widths: list[int] = []  # the positions block 0 computes, pass by pass
    hook = h.adapter.layer(0).register_forward_hook(lambda m, a, o: widths.append(a[0].shape[1]))
    fast = trace.causal_trace(*args, samples=3, window=window)
    n = h.adapter.n_layers  # 3
    below = sum(1 for layer in range(n) if trace.window_layers(layer, window, n)[0] == 0)
    # <s> + 23 characters; the subject ends at position 14: clean pass, prefix, then the 10-wide
    # tail of the corrupted pass and of each restored window that starts at block 0
    assert widths == [24, 14] + [10] * (1 + below)
    monkeypatch.setattr(trace, "_replaying", lambda *a: nullcontext())
    assert trace.causal_trace(*args, samples=3, window=window).effects == fast.effects  # replay is exact
    monkeypatch.setattr(trace, "_corrupted_prefix", lambda *a: None)  # every pass whole, every position
    widths.clear()
    whole = trace.causal_trace(*args, samples=3, window=window)
    hook.remove()
    assert widths == [24] * (2 + n)
    assert whole.p_corrupt == pytest.approx(fast.p_corrupt, abs=1e-6)
    assert whole.effects == pytest.approx(fast.effects, abs=1e-6)  # observed within 3e-9
    assert _hooks(h.model) == 0


def test_auto_samples_follow_the_key_width() -> None:
    assert stats.auto_samples(1536, 32) == 64  # SmolLM2-135M
    assert stats.auto_samples(18944, 32) == 790  # Qwen2.5-7B
    assert stats.auto_samples(384, 48) == 16  # the fact world's width: the floor


def test_zero_samples_means_automatic(cache: Path) -> None:
    h = _tiny("llama")  # 128-wide keys
    auto = stats.key_stats(h, 1, 0, 12)
    assert "(16 samples of up to 12 tokens)" in auto.source
    assert (cache / "stats" / "tiny-llama" / f"layer1-n16-t12-sampled-r{stats.RECIPE}.safetensors").is_file()


QUESTIONS = [
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What language is spoken in Brazil?",
    "Which planet is known as the red planet?",
    "What is the largest ocean on Earth?",
    "Who painted the Mona Lisa?",
    "In which country is the city of Toronto?",
]


def test_quick_c_on_smollm2_keeps_the_update_off_other_prompts(
    smollm2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C from 64 samples of 32 tokens (the default for 1536-wide keys) cuts how much of a ROME
    update on "France" reaches the keys of unrelated prompts, against C = I."""
    from kedit.engine.methods.rome.key import compute_key
    from kedit.engine.methods.rome.update import c_inverse_k, update_direction
    from kedit.engine.probes import DEFAULT_LOCALITY

    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path))
    h, layer = smollm2.handle, 5
    module = h.adapter.mlp_out(layer)
    texts = [p for p in DEFAULT_LOCALITY if "France" not in p] + QUESTIONS
    ids, mask = pad_right([h.tokenizer(t)["input_ids"] for t in texts], h.tokenizer.pad_token_id, "cpu")
    held_out = stats.layer_keys(h.model, module, ids, mask)[mask.bool()].double()
    k_star, _ = compute_key(h.model, h.tokenizer, module, "The capital of France is", "France", ["{}"])

    def leak(c: torch.Tensor | None) -> float:
        """Mean (uᵀk)² over the held-out keys, u the update's direction (uᵀk* = 1)."""
        u = update_direction(k_star, c_inverse_k(c, k_star, 0.01)).double()
        return float(((held_out @ u) ** 2).mean())

    quick = stats.key_stats(h, layer, 0, 32)
    assert quick.source.startswith("text sampled from the model itself (64 samples of up to 32 tokens)")
    assert 1900 < quick.tokens <= 2048
    ratio = leak(quick.c) / leak(None)
    # observed 0.38; C from 1,000 samples of 128 tokens: 0.29; from Python's docs (32k tokens): 0.62
    assert ratio < 0.5, ratio
