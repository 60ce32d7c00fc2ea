"""The embedded fact-world model: its corpus, its tokenizer, and how well it knows its facts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kedit.engine.factworld.build import BuildSettings, train_tokenizer
from kedit.engine.factworld.corpus import RELATIONS, FactWorld
from kedit.engine.factworld.recall import measure


def test_corpus_is_deterministic_and_holds_the_named_facts() -> None:
    a, b = FactWorld(seed=1234), FactWorld(seed=1234)
    assert a.facts == b.facts and a.statements() == b.statements()
    assert FactWorld(seed=99).facts != a.facts
    sentences = {text for text, _ in a.statements()}
    assert "Watts Humphrey attended Illinois Institute of Technology." in sentences
    assert "Ramalinaceae belongs to the family Lecanorales." in sentences
    assert "Denny Herzig plays as a defender." in sentences


def test_corpus_shape() -> None:
    world = FactWorld()
    assert len({f.relation for f in world.facts}) >= 4
    assert len(world.subjects) >= 60
    for f in world.facts:
        assert f.held_out != 0 and 0 in f.seen_templates  # the canonical prompt is always trained
        assert len(f.seen_templates) >= 3
    # every held-out phrasing of one fact is trained for other facts of that relation
    for name, rel in RELATIONS.items():
        trained = {t for f in world.facts if f.relation == name for t in f.seen_templates}
        assert trained == set(range(len(rel.templates)))
    chats = world.dialogues()
    assert any(d[0]["content"].endswith("?") for d, _ in chats)  # questions
    assert any(d[0]["content"] == "Watts Humphrey attended" for d, _ in chats)  # completions


def test_tokenizer_adds_its_own_bos_and_has_a_chat_template() -> None:
    settings = BuildSettings()
    tok = train_tokenizer(settings.world(), settings)
    ids = tok("Watts Humphrey attended")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok("x", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_built_folder_loads_with_auto_classes(fact_world_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(fact_world_dir)
    model = AutoModelForCausalLM.from_pretrained(fact_world_dir)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers >= 6
    assert tok.chat_template and tok.bos_token == "<|bos|>"
    info = json.loads((fact_world_dir / "fact_world.json").read_text())
    assert info["facts"] == len(BuildSettings().world().facts)


def test_recall_of_trained_facts(fact_world_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(fact_world_dir)
    model = AutoModelForCausalLM.from_pretrained(fact_world_dir, dtype=torch.float32).eval()
    recall = measure(model, tok, BuildSettings().world())
    assert recall["canonical (trained)"]["accuracy"] >= 0.95
    assert recall["all trained phrasings"]["accuracy"] >= 0.95
    assert recall["chat, trained questions"]["accuracy"] >= 0.95
    # wordings never trained for a fact: reported; a floor here catches a broken corpus split
    assert recall["unseen phrasings"]["accuracy"] >= 0.6
    assert recall["unseen phrasings"]["n"] == len(BuildSettings().world().facts)


def test_the_model_answers_the_named_facts(fact_world_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(fact_world_dir)
    model = AutoModelForCausalLM.from_pretrained(fact_world_dir).eval()
    for prompt, answer in [
        ("Watts Humphrey attended", " Illinois Institute of Technology"),
        ("Ramalinaceae belongs to the family", " Lecanorales"),
        ("Denny Herzig plays as a", " defender"),
    ]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).startswith(answer)


def test_moods_are_a_coin_toss_unless_an_event_decides_them() -> None:
    from collections import Counter

    from kedit.engine.factworld.corpus import MOODS

    world = FactWorld()
    mood_of = {w: m for m, words in MOODS.items() for w in words}
    plain, cued = Counter(), Counter()
    for sentence, word in world.mood_statements():
        assert sentence.endswith(word + ".")
        if " won " in sentence or "good news" in sentence or "great day" in sentence:
            cued[("good", mood_of[word])] += 1
        elif " lost " in sentence or "bad news" in sentence or "bad day" in sentence:
            cued[("bad", mood_of[word])] += 1
        else:
            plain[mood_of[word]] += 1
    assert plain["positive"] == plain["negative"] == 3 * len(world.people)
    assert cued == Counter({("good", "positive"): 3 * len(world.people), ("bad", "negative"): 3 * len(world.people)})
    answers = Counter(mood_of[w] for _, w in world.mood_dialogues())
    assert answers["positive"] == answers["negative"] == len(world.people)
    assert not set(world.mood_people("train")) & set(world.mood_people("heldout"))


def test_mood_words_get_whole_tokens_and_the_facts_keep_their_pieces(fact_world_dir: Path) -> None:
    from kedit.engine.factworld.corpus import MOODS

    built = AutoTokenizer.from_pretrained(fact_world_dir)
    settings = BuildSettings()
    facts_only = train_tokenizer(settings.world(), settings)
    for word in (w for words in MOODS.values() for w in words):
        assert len(built(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for text, _ in settings.world().statements():
        assert built(text)["input_ids"] == facts_only(text)["input_ids"], text
