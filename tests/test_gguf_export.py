"""GGUF out: a ROME edit on SmolLM2 merged into a copy of its Q4_1 GGUF. Every key and every
untouched tensor is copied byte for byte; transformers' GGUF loader reads the file back with
the edit in effect and unrelated facts intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kedit.engine import events as ev

REPO = Path(__file__).resolve().parent.parent
FACTS = {
    r["subject"]: r
    for r in (
        json.loads(line)
        for line in (REPO.parent / "shared" / "real-facts" / "smollm2-135m.jsonl").read_text().splitlines()
        if line.strip()
    )
}
EDIT = (FACTS["Japan"]["prompt"], FACTS["Japan"]["new"])  # "The capital of Japan is" -> "London"
# Unrelated facts that an identity-C edit of "capital of Japan" leaves alone (with C = I the
# edit spreads to some other countries' capitals, in the live session as in the file).
UNRELATED = [(FACTS[s]["prompt"], FACTS[s]["true"]) for s in ("The Eiffel Tower", "Romeo and Juliet")]


def _raw(field) -> bytes:
    return b"".join(part.tobytes() for part in field.parts)


def _greedy(model, tokenizer, prompt: str, n: int = 8) -> tuple[str, torch.Tensor]:
    """The greedy continuation and the next-token log-probabilities."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), logprobs


@pytest.fixture(scope="module")
def exported(smollm2_session, tmp_path_factory):
    """One ROME edit (C = I, so no key statistics), exported with /export --gguf; rolled back after.
    Rank one: with C = I the opening key's second direction is long, and Q8_0's rounding of its
    product moved the next-token log-probabilities by up to 0.069, over the 0.05 allowed below."""
    from kedit.engine.patches import sidecars

    session = smollm2_session
    assert not session.edits
    edit = session.edit(*EDIT, identity_c=True, params={"n_contexts": 3, "opening": False})
    try:
        ((module, side),) = [(n, s) for n, s in sidecars(session.handle.model).items() if s.stacked is not None]
        folder = tmp_path_factory.mktemp("gguf") / "out"
        events = list(session.run(f"/export {folder} --gguf"))
        yield {
            "session": session,
            "edit": edit,
            "folder": folder,
            "events": events,
            "module": module,
            "u": side.stacked[0].float().clone(),
            "v": side.stacked[1].float().clone(),
        }
    finally:
        session.rollback(edit.id)


def test_gguf_export_copies_every_key_and_untouched_tensor(exported) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from kedit.engine.gguf_export import EDITS_KEY

    session, edit, events = exported["session"], exported["edit"], exported["events"]
    info = [e for e in events if isinstance(e, ev.Info)]
    assert len(info) == 1, events
    path = exported["folder"] / "SmolLM2-135M-Instruct.Q4_1.kedit.gguf"
    assert f"exported {path}" in info[0].text and "1 edit(s) merged into 1 tensor(s)" in info[0].text
    source, out = GGUFReader(str(session.handle.gguf_path)), GGUFReader(str(path))

    keys = [k for k in source.fields if not k.startswith("GGUF.")]
    assert [k for k in out.fields if not k.startswith("GGUF.")] == keys + [EDITS_KEY]
    assert all(_raw(source.fields[k]) == _raw(out.fields[k]) for k in keys)  # tokenizer, chat template, ...
    recorded = json.loads(out.fields[EDITS_KEY].contents())
    assert [(r["id"], r["prompt"], r["target"].strip(), r["layer"]) for r in recorded] == [(edit.id, *EDIT, edit.layer)]

    edited = f"blk.{edit.layer}.ffn_down.weight"
    assert [t.name for t in out.tensors] == [t.name for t in source.tensors]
    src = {t.name: t for t in source.tensors}
    same = [
        t.name
        for t in out.tensors
        if t.tensor_type == src[t.name].tensor_type and np.array_equal(t.data, src[t.name].data)
    ]
    assert len(same) == len(source.tensors) - 1 == 271 and edited not in same
    new = next(t for t in out.tensors if t.name == edited)
    assert (src[edited].tensor_type.name, new.tensor_type.name) == ("Q4_1", "Q8_0")

    # the written tensor minus the source's is U Vᵀ, up to Q8_0 rounding; almost exact along the keys
    u, v = exported["u"].numpy(), exported["v"].numpy()
    delta = u @ v.T
    got = dequantize(new.data, new.tensor_type) - dequantize(src[edited].data, src[edited].tensor_type)
    assert np.linalg.norm(got - delta) / np.linalg.norm(delta) < 0.1
    assert np.linalg.norm((got - delta) @ v) / np.linalg.norm(delta @ v) < 0.01


def test_gguf_export_reloads_with_the_edit_and_other_facts(exported) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    session = exported["session"]
    handle = session.handle
    folder = exported["folder"]
    # the config is the one kedit converted from the same (byte-identical) metadata; passing it
    # skips a second parse of the file's 49k-token vocabulary
    config = AutoConfig.from_pretrained(handle.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.kedit.gguf", config=config, dtype=torch.float32
    ).eval()
    # every weight but the edited one is the unedited model's, bit for bit
    live = handle.model.state_dict()
    loaded = model.state_dict()
    changed = [k for k in live if not torch.equal(live[k], loaded[k])]
    assert changed == [exported["module"] + ".weight"]
    delta = exported["u"] @ exported["v"].T
    err = (loaded[changed[0]] - live[changed[0]] - delta).norm() / delta.norm()
    assert err < 0.1

    text, logprobs = _greedy(model, handle.tokenizer, EDIT[0])
    assert EDIT[1] in text, text
    with session.lock:
        live_text, live_logprobs = _greedy(handle.model, handle.tokenizer, EDIT[0])
    assert text == live_text  # the exported file answers as the edited session does
    assert (logprobs - live_logprobs).abs().max() < 0.05
    for prompt, true in UNRELATED:
        answer, _ = _greedy(model, handle.tokenizer, prompt)
        assert true in answer, (prompt, answer)


def test_gguf_export_refuses_a_model_not_loaded_from_gguf(session, tmp_path) -> None:
    events = list(session.run(f"/export {tmp_path / 'out'} --gguf"))
    assert isinstance(events[-1], ev.Error) and "was not loaded from one" in events[-1].message
    assert "drop --gguf" in events[-1].message and not (tmp_path / "out").exists()
    events = list(session.run(f"/export {tmp_path / 'out'} --gguf-type source"))
    assert isinstance(events[-1], ev.Error) and "add --gguf" in events[-1].message


def test_gguf_tensor_names_and_types() -> None:
    from gguf import MODEL_ARCH
    from gguf import GGMLQuantizationType as T

    from kedit.engine.errors import KeditError
    from kedit.engine.gguf_export import output_path, tensor_name, written_type

    assert tensor_name(MODEL_ARCH.LLAMA, 30, "model.layers.5.mlp.down_proj") == "blk.5.ffn_down.weight"
    assert tensor_name(MODEL_ARCH.QWEN2, 24, "model.layers.23.mlp.down_proj") == "blk.23.ffn_down.weight"
    with pytest.raises(KeditError, match="permuted"):
        tensor_name(MODEL_ARCH.LLAMA, 30, "model.layers.5.self_attn.q_proj")
    assert [written_type(T.Q4_1, w) for w in ("q8_0", "source", "f16", "f32")] == [T.Q8_0, T.Q4_1, T.F16, T.F32]
    assert written_type(T.Q4_K, "source") == T.Q8_0  # gguf cannot encode K-quants
    assert output_path(Path("/m/SmolLM2.Q4_1.gguf"), Path("/o")) == Path("/o/SmolLM2.Q4_1.kedit.gguf")
    assert output_path(Path("/o/SmolLM2.Q4_1.kedit.gguf"), Path("/p")) == Path("/p/SmolLM2.Q4_1.kedit.gguf")


def test_kedit_edit_gguf_needs_export() -> None:
    from kedit.tui.cli import main

    result = CliRunner().invoke(main, ["edit", "The capital of Japan is", "London", "--gguf"])
    assert result.exit_code == 2 and "give --export DIR too" in result.output
