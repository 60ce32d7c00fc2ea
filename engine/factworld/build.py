"""Build the fact-world model: train a BPE tokenizer and a small Qwen2 on the synthetic corpus.

The result is an ordinary Hugging Face folder (``config.json``, safetensors weights,
``tokenizer.json`` with a chat template), cached under the user cache dir and keyed
by a hash of the corpus and the build settings, so a change to either rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kedit.engine import paths
from kedit.engine.factworld.corpus import FactWorld

if TYPE_CHECKING:
    from transformers import Qwen2ForCausalLM

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
log = logging.getLogger("kedit")
BUILD_VERSION = 8  # bump when the training recipe changes in a way the settings don't show
# The fact world's weights ship with kedit, in this folder beside this file. Training is chaotic:
# torch and MKL pick their kernels by CPU (AVX2, AVX-512, AVX-512 with FP16...), the kernels round
# differently, and a few hundred steps grow those roundings into another model (even in float64:
# the builds of two kernel sets differed by 0.3% after 100 steps and entirely after 260). The tests'
# figures and the vectors in vectors/ fit one model, so that model is shipped, not rebuilt. Settings
# other than the shipped ones build into the cache; `python -m kedit.engine.factworld.build`
# rebuilds the shipped model after a change to the recipe or the corpus.
SHIPPED = Path(__file__).resolve().with_name("model")


@dataclass(frozen=True)
class BuildSettings:
    """Architecture and training budget of the fact-world model (kedit.toml [fact_world])."""

    seed: int = 1234
    vocab_size: int = 1024  # the facts' pieces; the mood words are added as whole tokens
    hidden_size: int = 192
    intermediate_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    local_layers: int = 2  # the first layers attend only to the last local_window tokens
    local_window: int = 2
    steps: int = 260
    batch_size: int = 16
    pack_length: int = 128
    n_people: int = 60
    n_taxa: int = 20
    learning_rate: float = 3e-3
    mood_steps: int = 200  # a second phase: the mood sentences, with every fact replayed
    mood_learning_rate: float = 3e-3
    mood_frozen_layers: int = 5  # blocks the mood phase leaves as the facts left them
    object_weight: float = 8.0

    @classmethod
    def from_config(cls, table: dict) -> BuildSettings:
        known = {k: v for k, v in table.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def world(self) -> FactWorld:
        return FactWorld(seed=self.seed, n_people=self.n_people, n_taxa=self.n_taxa)

    def key(self) -> str:
        """A short hash naming this build: settings, corpus and recipe version."""
        world = self.world()
        blob = json.dumps(
            {
                "settings": asdict(self),
                "version": BUILD_VERSION,
                "texts": world.statements(),
                "dialogues": world.dialogues(),
                "moods": world.mood_statements(),
                "mood_dialogues": world.mood_dialogues(),
                "template": CHAT_TEMPLATE,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_dir(settings: BuildSettings) -> Path:
    return paths.cache_dir() / "fact-world" / settings.key()


def train_tokenizer(world: FactWorld, settings: BuildSettings):
    """A byte-level BPE trained on the corpus; BOS is added by the tokenizer's post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        special_tokens=[PAD, BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [t for t, _ in world.statements()] + [m["content"] for d, _ in world.dialogues() for m in d]
    texts += ["user", "assistant", "system"]
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
    )


def add_mood_tokens(tokenizer, model: Qwen2ForCausalLM) -> int:
    """Give every mood word a token of its own (after the facts' pieces) and the model rows
    for them; returns how many tokens the facts' tokenizer had."""
    from tokenizers import AddedToken

    from kedit.engine.factworld.corpus import MOODS

    before = len(tokenizer)
    words = sorted({w for group in MOODS.values() for w in group})
    tokenizer.add_tokens([AddedToken(" " + w, normalized=False) for w in words])
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it announces how it fills the new rows
    try:
        model.resize_token_embeddings(len(tokenizer))  # new rows drawn around the others' mean
    finally:
        hf_logging.set_verbosity(level)
    model.config.vocab_size = len(tokenizer)
    return before


def training_sequences(
    world: FactWorld, tokenizer, object_weight: float, moods: bool = False
) -> list[tuple[list[int], list[float]]]:
    """Token ids and loss weights of every fact statement (BOS ... EOS) and chat dialogue, or
    with ``moods`` of the mood sentences and dialogues.

    Tokens that spell a fact's object (or a mood word) weigh ``object_weight``, the rest 1:
    the template words are easy, the facts are what the model is for.
    """
    eos = tokenizer.convert_tokens_to_ids(EOS)
    statements, dialogues = (
        (world.mood_statements(), world.mood_dialogues()) if moods else (world.statements(), world.dialogues())
    )
    texts = [(text, obj, True) for text, obj in statements]
    texts += [(tokenizer.apply_chat_template(d, tokenize=False), obj, False) for d, obj in dialogues]
    out = []
    for text, obj, plain in texts:
        enc = tokenizer(text, add_special_tokens=plain, return_offsets_mapping=True)
        start = text.rindex(obj)
        end = start + len(obj)
        ids = list(enc["input_ids"])
        weights = [object_weight if (a < end and b > start and b > a) else 1.0 for a, b in enc["offset_mapping"]]
        if plain:
            ids.append(eos)
            weights.append(1.0)
        out.append((ids, weights))
    return out


def make_model(settings: BuildSettings, tokenizer) -> Qwen2ForCausalLM:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Local attention in the first layers: the final position cannot read a name's raw
    # tokens directly, so the name is composed and enriched at its last token (as in
    # large LMs, and as ROME assumes) instead of being looked up at the answer.
    local: dict[str, Any] = (
        {
            "layer_types": ["sliding_attention"] * settings.local_layers
            + ["full_attention"] * (settings.num_hidden_layers - settings.local_layers),
            "sliding_window": settings.local_window,
            "use_sliding_window": True,
        }
        if settings.local_layers
        else {}
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
        **local,
    )
    torch.manual_seed(settings.seed)
    return Qwen2ForCausalLM(config)


def _batches(seqs: list[tuple[list[int], list[float]]], settings: BuildSettings, pad: int, rng: random.Random):
    """Endless shuffled batches of packed rows: whole sequences laid end to end, then padded.

    Packing wastes no compute on padding; each sequence still opens with its own BOS, and
    seeing facts after other text is what later edits' context prefixes look like.
    Yields (ids, attention mask, per-token loss weights for predicting each token).
    """
    width = settings.pack_length
    while True:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        rows: list[tuple[list[int], list[float]]] = []
        row: tuple[list[int], list[float]] = ([], [])
        for i in order:
            ids, weights = seqs[i]
            if len(row[0]) + len(ids) > width:
                rows.append(row)
                row = ([], [])
            row = (row[0] + ids[:width], row[1] + weights[:width])
        rows.append(row)
        for start in range(0, len(rows) - settings.batch_size + 1, settings.batch_size):
            chunk = rows[start : start + settings.batch_size]
            ids_t = torch.full((len(chunk), width), pad, dtype=torch.long)
            weight_t = torch.zeros((len(chunk), width))
            for j, (ids, weights) in enumerate(chunk):
                ids_t[j, : len(ids)] = torch.tensor(ids)
                weight_t[j, : len(ids)] = torch.tensor(weights)
            yield ids_t, (weight_t > 0).long(), weight_t


def weighted_lm_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each target token weighted (0 for padding)."""
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    w = weights[:, 1:].reshape(-1)
    return (ce * w).sum() / w.sum()


def train(
    model: Qwen2ForCausalLM,
    seqs: list[tuple[list[int], list[float]]],
    settings: BuildSettings,
    pad: int,
    progress: Callable[[int, float], None] | None = None,
    phase: int = 0,
    fact_vocab: int | None = None,
) -> float:
    """AdamW, warm-up-hold-cool-down schedule; returns the final smoothed loss.

    Phase 0 is the facts (``steps`` at ``learning_rate``); phase 1 the moods with the
    facts replayed (``mood_steps`` at ``mood_learning_rate``), in its own order. Phase 1
    leaves the first ``mood_frozen_layers`` blocks alone, and the embedding rows of the first
    ``fact_vocab`` tokens.
    """
    steps, lr = (
        (settings.steps, settings.learning_rate) if phase == 0 else (settings.mood_steps, settings.mood_learning_rate)
    )
    rng = random.Random(settings.seed + phase)
    params = list(model.parameters())
    if phase:  # the moods leave the first blocks alone: a name is composed and its facts are
        # stored there (where ROME edits) and carried to the answer, as the facts left them
        frozen: set[int] = set()
        for layer in model.model.layers[: settings.mood_frozen_layers]:
            frozen |= {id(p) for p in layer.parameters()}
        for p in params:
            p.requires_grad_(id(p) not in frozen)  # no weight gradients where nothing is trained
        params = [p for p in params if id(p) not in frozen]
        if fact_vocab is not None:
            keep = torch.zeros_like(model.model.embed_tokens.weight)
            keep[fact_vocab:] = 1.0
            model.model.embed_tokens.weight.register_hook(lambda grad: grad * keep)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # warm up, hold, then cool down over the last quarter
        if step < warmup:
            return (step + 1) / warmup
        cool = int(steps * 0.75)
        if step < cool:
            return 1.0
        t = (step - cool) / max(1, steps - cool)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batches = _batches(seqs, settings, pad, rng)
    model.train()
    smooth = float("nan")
    for step in range(steps):
        ids, mask, weights = next(batches)
        loss = weighted_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, weights)
        model.zero_grad(set_to_none=True)  # frozen parameters too, or their grads pile up
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if math.isnan(smooth) else 0.95 * smooth + 0.05 * loss.item()
        if progress:
            progress(step + (settings.steps if phase else 0), smooth)
    model.requires_grad_(True)
    model.eval()
    return smooth


def build(
    out_dir: Path | None = None,
    settings: BuildSettings | None = None,
    show_progress: bool = True,
) -> Path:
    """Build the fact-world model into ``out_dir`` (atomically) and return the folder."""
    from tqdm.auto import tqdm

    settings = settings or BuildSettings()
    out_dir = Path(out_dir) if out_dir else default_dir(settings)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    world = settings.world()
    tokenizer = train_tokenizer(world, settings)
    seqs = training_sequences(world, tokenizer, settings.object_weight)
    model = make_model(settings, tokenizer)
    bar = tqdm(
        total=settings.steps + settings.mood_steps,
        desc="building the fact-world model",
        unit="step",
        disable=not show_progress,
        leave=False,
    )

    def tick(step: int, loss: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    try:
        train(model, seqs, settings, tokenizer.pad_token_id, tick)
        # The moods come second, on a model that already knows its facts, with the facts
        # replayed; the facts' tokens, and the blocks where names and facts are stored, stay.
        fact_vocab = add_mood_tokens(tokenizer, model)
        moods = training_sequences(world, tokenizer, settings.object_weight, moods=True)
        seqs = training_sequences(world, tokenizer, settings.object_weight)
        loss = train(model, moods + seqs, settings, tokenizer.pad_token_id, tick, phase=1, fact_vocab=fact_vocab)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir.parent))
    try:
        model.generation_config.do_sample = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "settings": asdict(settings),
            "key": settings.key(),
            "final_loss": loss,
            "build_seconds": time.perf_counter() - started,
            "facts": len(world.facts),
            "sequences": len(seqs) + len(moods),
        }
        (tmp / "fact_world.json").write_text(json.dumps(info, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def shipped(settings: BuildSettings) -> bool:
    """Whether the model shipped with kedit is the build of ``settings``."""
    info = SHIPPED / "fact_world.json"
    return info.is_file() and json.loads(info.read_text())["key"] == settings.key()


def ensure_built(settings: BuildSettings | None = None, show_progress: bool = True) -> Path:
    """The cached fact-world folder, building it first if needed (one builder at a time)."""
    from filelock import FileLock

    settings = settings or BuildSettings()
    if shipped(settings):
        return SHIPPED
    out = default_dir(settings)
    if (out / "fact_world.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "fact_world.json").exists():  # another process built it while we waited
            return out
        log.info("building a fact-world model once (about 90 s on 2 CPU cores) into %s", out)
        return build(out, settings, show_progress)


if __name__ == "__main__":  # rebuild the shipped model from kedit.toml's [fact_world]
    from kedit.engine.config import Config

    build(SHIPPED, BuildSettings.from_config(Config.load().table("fact_world")))
