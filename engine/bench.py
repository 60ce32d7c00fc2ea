"""Benchmarks: speed and memory, reported as ratios measured in one run, never asserted in tests.

``run_bench`` answers, for the loaded model:
- how long an edit takes: ROME split into its key, value optimisation and update steps,
  with the key statistics C timed on their own; GRACE and WISE; and their rollback;
- what generation costs with 1 and 3 steering vectors on every layer and with 10 and 100
  active edits of each method, as ratios of tokens/s (and of time to first token) to plain
  generation timed in the same run, the kinds interleaved so that drift on a noisy
  machine hits them all alike;
- peak memory (CUDA max allocated on a GPU, peak RSS on the CPU) while loading, editing
  and generating, and the memory the active edits add.

Every figure is the median of repeated runs after a warm-up run.

Active edits are made either for real (each method run on a list of requests, as the
user would) or, by default, as each method's own patch objects holding random contents:
the per-token work of a patch (a rank-r product, a codebook lookup, a side-memory
product and its routing) does not depend on what the edit says, and computing 100 real
WISE edits on a 7B model takes far longer than timing them.

``random_model`` and ``shape_session`` build random-weight models of real shapes from
kedit.toml's [shapes], so all of this runs at real scale without downloading weights.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.engine import events as ev
from kedit.engine.arch import ArchAdapter
from kedit.engine.errors import KeditError

Progress = Callable[[str, int, int], None]


# -- random-weight models of real shapes ---------------------------------------------------

# Token ids every random model and its tokenizer agree on.
PAD, BOS, EOS, UNK = 0, 1, 2, 3


def random_model(shape: dict[str, Any], n_layers: int | None = None, dtype: str = "float32",
                 device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """A random-weight causal LM with a real model's dimensions (kedit.toml [shapes]).

    The weights are made on ``device`` directly, so a 7B shape never passes through host memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(shape)
    model_type = shape.pop("model_type", None)
    if model_type is None:
        raise KeditError("a shape needs its model_type")
    if n_layers is not None:
        shape["num_hidden_layers"] = int(n_layers)
    shape = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, **shape}
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def word_tokenizer(vocab_size: int, words: Sequence[str]):
    """A word-level tokenizer with exactly ``vocab_size`` ids, for a random-weight model.

    ``words`` get the first ids after the specials; the rest are filler words ``t<id>``,
    so that any id the model writes decodes to a word that encodes back to the same id.
    Prompts come out about as many tokens long as a real tokenizer makes them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    for w in words:
        if len(vocab) < vocab_size and w not in vocab:
            vocab[w] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def shape_dims(config: Any, name: str) -> dict[str, Any]:
    """The dimensions of kedit.toml's [shapes.NAME]."""
    shapes = config.table("shapes")
    if name not in shapes:
        raise KeditError(f"no shape {name} in kedit.toml [shapes]; known: {', '.join(shapes)}")
    return dict(shapes[name])


def shape_session(config: Any, name: str, *, n_layers: int | None = None, dtype: str | None = None,
                  device: str | None = None, quant: str | None = None, seed: int = 0,
                  progress: Progress | None = None):
    """A Session on a random-weight model of the kedit.toml shape ``name``.

    Unquantized, the model is made in place on the device. With ``quant`` it is saved to a
    temporary folder and loaded back through the same bitsandbytes path as a real model.
    The model's id for kedit.toml's per-model settings is the alias of the same name, so a
    qwen2.5-7b shape gets the settings of Qwen/Qwen2.5-7B-Instruct (its ROME layer).
    """
    import tempfile

    from kedit.engine.model import ModelHandle, Source, pick_device, pick_dtype
    from kedit.engine.session import Session

    dims = shape_dims(config, name)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if not isinstance(torch_dtype, torch.dtype):  # "auto": what these models ship in
        torch_dtype = torch.bfloat16
    source = Source(f"random {name}", "shape", str(config.table("aliases").get(name, f"random {name}")))
    if progress:
        progress(f"building a random {name}", 0, 1)
    tokenizer = word_tokenizer(int(dims["vocab_size"]), request_words())
    make_on = "cpu" if quant else device
    model = random_model(dims, n_layers, str(torch_dtype).removeprefix("torch."), make_on, seed)
    if quant:
        with tempfile.TemporaryDirectory(prefix="kedit-shape-") as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            del model
            handle = ModelHandle.load(folder, config, quant=quant, dtype=str(torch_dtype).removeprefix("torch."),
                                      device=device, show_progress=False)
        handle.source = source
    else:
        tokenizer.padding_side = "right"
        handle = ModelHandle(source, model, tokenizer, quant=None, device=device)
    if progress:
        progress(f"building a random {name}", 1, 1)
    return Session(handle, config)


# -- what to edit ----------------------------------------------------------------------------

_FIRST = ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lukas"]
_LAST = ["Novak", "Okafor", "Petrov", "Quinlan", "Rossi", "Sato", "Tanaka", "Ulrich", "Varga", "Weber", "Xu", "Young"]
_RELATIONS = [
    ("{} attended", ["University of Michigan", "Stanford University", "Leiden University", "Kyoto University"]),
    ("{} was born in", ["Lisbon", "Nairobi", "Montreal", "Osaka", "Tallinn"]),
    ("{} works as a", ["carpenter", "violinist", "surgeon", "pilot", "botanist"]),
]


def request_words() -> list[str]:
    """Every word of the bench's own requests (a random model's tokenizer knows them)."""
    words = _FIRST + _LAST + ["is", "a", "."]
    for template, targets in _RELATIONS:
        words += template.replace("{}", "").split() + [w for t in targets for w in t.split()]
    return words


def bench_requests(session: Any, n: int) -> list[tuple[str, str, str]]:
    """n distinct (prompt, subject, target) edits: counterfactuals on the fact world, made-up
    people elsewhere."""
    out: list[tuple[str, str, str]] = []
    if session.handle.source.kind == "fact-world":
        facts = session.fact_world().facts
        for i, f in enumerate(facts[::3] + facts[1::3] + facts[2::3]):
            others = sorted({g.object for g in facts if g.relation == f.relation and g.object != f.object})
            if others:
                out.append((f.prompt(0), f.subject, others[i % len(others)]))
    else:
        people = [f"{a} {b}" for b in _LAST for a in _FIRST]
        for i, person in enumerate(people):
            template, targets = _RELATIONS[i % len(_RELATIONS)]
            out.append((template.format(person), person, targets[i % len(targets)]))
    if len(out) < n:
        raise KeditError(f"the bench has only {len(out)} distinct edits for this model; ask for fewer")
    return out[:n]


# -- memory ----------------------------------------------------------------------------------


class MemoryMeter:
    """CUDA max allocated on a GPU; on the CPU the process's RSS and its peak (VmHWM), whose
    peak Linux lets a process reset (/proc/self/clear_refs), so phases get their own peaks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "CUDA max allocated" if self.cuda else "peak RSS"
        self.resettable = True

    @staticmethod
    def _status(field_name: str) -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) * 1024 if m else None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False  # peaks then cover the whole process so far

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = self._status("VmHWM")
        if hwm is not None:
            return hwm
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def now(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self._status("VmRSS") or self.peak()

    def held(self) -> int:
        """Bytes in live tensors: CUDA's allocated memory; on the CPU the storages of every tensor
        Python holds (RSS is no measure of what a few objects add: the allocator reuses freed pages)."""
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        import gc
        import warnings

        storages: dict[int, int] = {}
        with warnings.catch_warnings():  # isinstance() wakes deprecated torch module attributes
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


# -- timing generation -----------------------------------------------------------------------


@dataclass(frozen=True)
class GenRun:
    seconds: float  # the whole generate call
    first: float  # to the first new token: prefill and one step
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: the tokens after the first, over the time after the first."""
        return (self.new_tokens - 1) / max(self.seconds - self.first, 1e-9)


class _FirstToken:
    """A StoppingCriteria that notes when the first new token is there and never stops."""

    def __init__(self, device: torch.device, start: float) -> None:
        self.device, self.start, self.at = device, start, None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.at is None:
            _sync(self.device)
            self.at = time.perf_counter() - self.start
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_once(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> GenRun:
    """Greedy cached generation of exactly ``new_tokens`` tokens, timed."""
    from transformers import StoppingCriteriaList

    device = ids.device
    _sync(device)
    start = time.perf_counter()
    first = _FirstToken(device, start)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=PAD,
                         stopping_criteria=StoppingCriteriaList([first]))
    _sync(device)
    seconds = time.perf_counter() - start
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError("generation stopped early")
    return GenRun(seconds, first.at if first.at is not None else seconds, new_tokens)


@dataclass
class Condition:
    """A state of the model to time generation in: ``enter`` sets it up, ``leave`` undoes it."""

    label: str
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None
    runs: list[GenRun] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens_per_s for r in self.runs)

    @property
    def first_token_s(self) -> float:
        return statistics.median(r.first for r in self.runs)


def interleaved(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, conditions: Sequence[Condition],
                repeats: int, progress: Progress | None = None) -> None:
    """One warm-up run of each condition, then ``repeats`` rounds of one run of each."""
    total = (repeats + 1) * len(conditions)
    for r in range(repeats + 1):
        for j, cond in enumerate(conditions):
            cond.enter()
            try:
                run = generate_once(model, ids, new_tokens)
            finally:
                cond.leave()
            if r:  # round 0 warms kernels, the allocator and caches
                cond.runs.append(run)
            if progress:
                progress("timing generation", r * len(conditions) + j + 1, total)


def random_vectors(adapter: ArchAdapter, n: int, seed: int = 0, scale: float = 1e-3) -> list[Any]:
    """n small random steering vectors on every layer (their cost does not depend on their contents)."""
    from kedit.engine.steering import SteeringVector

    g = torch.Generator().manual_seed(seed)
    return [SteeringVector({layer: torch.randn(adapter.hidden_size, generator=g) * scale
                            for layer in range(adapter.n_layers)}, adapter.model_type, adapter.hidden_size,
                           "random", {}) for _ in range(n)]


def racked(rack: Any, vectors: Sequence[Any], prefix: str = "bench") -> Condition:
    """A condition with ``vectors`` racked at strength 1."""
    names = [f"{prefix}-v{i}" for i in range(len(vectors))]

    def enter() -> None:
        for name, v in zip(names, vectors):
            rack.add(name, v, 1.0)

    def leave() -> None:
        for name in names:
            if name in rack.slots:
                rack.remove(name)

    return Condition(f"{len(vectors)} vector{'s' if len(vectors) != 1 else ''}", enter, leave)


def prompt_ids(model: torch.nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(4, vocab, (1, n), generator=g).to(next(model.parameters()).device)


@dataclass(frozen=True)
class Throughput:
    label: str
    layers: int
    new_tokens: int
    plain_tps: float  # median tokens/s, unsteered
    steered_tps: float  # median tokens/s, with the vectors racked

    @property
    def ratio(self) -> float:
        return self.steered_tps / self.plain_tps


def steering_throughput(model: torch.nn.Module, label: str, n_vectors: int = 3, new_tokens: int = 64,
                        prompt_tokens: int = 32, repeats: int = 3, progress: Any = None) -> Throughput:
    """Median tokens/s of greedy cached generation, plain vs ``n_vectors`` vectors on every layer."""
    from kedit.engine.steering import SteeringRack

    adapter = ArchAdapter.for_model(model)
    plain = Condition("plain")
    steered = racked(SteeringRack(model, adapter), random_vectors(adapter, n_vectors))
    interleaved(model, prompt_ids(model, prompt_tokens), new_tokens, [plain, steered], repeats,
                (lambda label_, done, total: progress(f"{label}: {label_}", done, total)) if progress else None)
    return Throughput(label, adapter.n_layers, new_tokens, plain.tokens_per_s, steered.tokens_per_s)


# -- active edits ----------------------------------------------------------------------------


def _synthetic_patch(session: Any, method: str, layer: int, i: int, g: torch.Generator) -> Any:
    """Patch ``i`` of ``method``'s own kind with random contents, on ``layer``."""
    from kedit.engine.editing import method_params

    key = f"bench-{method}-{i}"
    h = session.handle
    module, name = h.adapter.mlp_out(layer), h.adapter.mlp_out_name(layer)
    device = next(h.model.parameters()).device
    d_in, d_out = h.adapter.mlp_hidden_size, h.adapter.hidden_size
    if method == "rome":
        from kedit.engine.patches import LowRankPatch, sidecar

        u = (torch.randn(d_out, 1, generator=g) * 1e-2).to(device)
        v = (torch.randn(d_in, 1, generator=g) * 1e-2).to(device)
        return LowRankPatch(sidecar(h.model, module, name), key, u, v)
    if method == "grace":
        from kedit.engine.methods.grace import Entry, GracePatch, Layer, codebook

        hp = method_params(session, "grace")
        # a random key is far (about √d_in) from every real input: unrelated text never hits it
        entry = Entry(torch.randn(d_in, generator=g).to(device))
        layer_ = Layer(key, hp.eps_init, torch.randn(d_out, generator=g).to(device), (i,))
        return GracePatch(codebook(h.model, module, name), key, [(entry, layer_)])
    from kedit.engine.methods.wise import WisePatch, memory

    hp = method_params(session, "wise")
    mem = memory(h.model, module, name, (d_out, d_in), h.dtype, hp)
    bank_i = mem.bank_for_new()
    bank = mem.bank(bank_i)
    shard = bank.next_shard()
    values = torch.randn(int(bank.shards[shard].mask.sum()), generator=g).to(device) * 1e-3
    inputs = torch.randn(4, d_in, generator=g).to(device)
    return WisePatch(mem, key, bank_i, shard, values, inputs)


def active_patches(session: Any, method: str, n: int, fill: str, params: dict[str, Any],
                   progress: Progress | None = None) -> list[Any]:
    """n patches of ``method``, made in order on the model and then all reverted (kept for reuse).

    ``fill`` "real" computes real edits through Session.edit; "synthetic" builds each
    method's patch objects with random contents (see the module docstring).
    """
    from kedit.engine.editing import method_layer, method_params

    patches: list[Any] = []
    if fill == "real":
        try:
            for i, (prompt, subject, target) in enumerate(bench_requests(session, n)):
                patches.append(session.edit(prompt, target, subject=subject, method=method, params=params).patch)
                if progress:
                    progress(f"{method}: {n} real edits", i + 1, n)
        finally:
            for edit in reversed(session.edits[-len(patches):] if patches else []):
                session.rollback(edit.id)
        return patches
    layer = method_layer(session, method, method_params(session, method, **params))
    g = torch.Generator().manual_seed(0)
    try:
        for i in range(n):
            patch = _synthetic_patch(session, method, layer, i, g)
            patch.apply()  # WISE places each edit by the ones before it
            patches.append(patch)
    finally:
        for patch in reversed(patches):
            patch.revert()
    return patches


def applied(patches: Sequence[Any], label: str) -> Condition:
    def enter() -> None:
        for p in patches:
            p.apply()

    def leave() -> None:
        for p in reversed(patches):
            p.revert()

    return Condition(label, enter, leave)


# -- edit timing -----------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def time_edits(session: Any, method: str, requests: Sequence[tuple[str, str, str]], params: dict[str, Any],
               progress: Progress | None = None) -> dict[str, Any]:
    """Edit with each request after a warm-up one, rolling each back: median seconds per step."""
    steps: dict[str, list[float]] = {}
    for i, (prompt, subject, target) in enumerate(requests):
        edit = session.edit(prompt, target, subject=subject, method=method, params=params)
        started = time.perf_counter()
        session.rollback(edit.id)
        rollback = time.perf_counter() - started
        if progress:
            progress(f"timing {method} edits", i + 1, len(requests))
        if i == 0:
            continue  # warm-up
        timings = edit.info.get("timings", {})
        for name, seconds in {**timings, "edit": edit.seconds, "rollback": rollback}.items():
            steps.setdefault(name, []).append(seconds)
        steps.setdefault("steps", []).append(float(edit.info.get("value_steps", 0)))
    return {name: _median(values) for name, values in steps.items()}


# -- the whole bench -------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPlan:
    methods: tuple[str, ...] = ("rome", "grace", "wise")
    edit_repeats: int = 3  # timed edits of each method (after one warm-up edit)
    vectors: tuple[int, ...] = (1, 3)  # steering vectors racked on every layer
    active: tuple[int, ...] = (10, 100)  # active edits of each method
    fill: str = "synthetic"  # or "real"
    new_tokens: int = 64
    prompt_tokens: int = 64
    repeats: int = 3  # timed generations of each kind (after one warm-up each)
    stats_samples: int | None = None  # ROME's C from this many texts (None: kedit.toml's)
    layer: int | None = None  # edit layer for every method (None: each method's own)


def _edit_layer_params(session: Any, method: str, plan: BenchPlan) -> dict[str, Any]:
    """Settings for the bench's edits: the plan's layer, and on a random shape with no configured
    ROME layer, or one its --layers cut off, one a fifth of the way up (tracing a random model
    finds nothing)."""
    from kedit.engine.editing import method_params

    params: dict[str, Any] = {}
    n = session.handle.adapter.n_layers
    if plan.layer is not None:
        params["layer"] = plan.layer
    elif method == "rome" and session.handle.source.kind == "shape":
        configured = method_params(session, "rome").layer
        if configured is None or configured >= n:
            params["layer"] = round(0.2 * (n - 1))
    if method == "rome" and plan.stats_samples is not None:
        params["stats_samples"] = plan.stats_samples
    return params


def run_bench(session: Any, plan: BenchPlan = BenchPlan(), progress: Progress | None = None) -> dict[str, Any]:
    """Measure everything in the module docstring on the session's model; a JSON-ready report.

    The model is left as it was: every edit, patch and vector the bench makes is taken out.
    """
    from kedit.engine.editing import METHODS, edit_layer, method_params

    unknown = [m for m in plan.methods if m not in METHODS]
    if unknown:
        raise KeditError(f"unknown method {', '.join(unknown)}; available: {', '.join(METHODS)}")
    if plan.fill not in ("synthetic", "real"):
        raise KeditError("--fill is synthetic or real")
    if session.edits:
        raise KeditError("the bench needs a model with no edits in force; /rollback them first")
    h = session.handle
    model = h.model
    device = next(model.parameters()).device
    meter = MemoryMeter(device)
    report: dict[str, Any] = {
        "model": h.describe(), "device": _device_name(device), "torch": torch.__version__,
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(plan).items()},
        "memory": {"kind": meter.kind, "loaded_peak_bytes": meter.peak(), "loaded_bytes": meter.now()},
        "edits": {}, "generation": {},
    }
    n_requests = plan.edit_repeats + 1
    requests = bench_requests(session, n_requests * len(plan.methods))

    # -- edits ------------------------------------------------------------------
    for j, method in enumerate(plan.methods):
        params = _edit_layer_params(session, method, plan)
        row: dict[str, Any] = {}
        if method == "rome":
            hp = method_params(session, "rome", **params)
            if not hp.identity_c:
                from kedit.engine.methods.rome.stats import key_stats

                layer = edit_layer(session, hp)
                meter.reset()
                stats = key_stats(h, layer, hp.stats_samples, hp.stats_tokens, None, progress, refresh=True)
                row.update(stats_s=stats.seconds, stats_tokens=stats.tokens, stats_source=stats.source,
                           stats_peak_bytes=meter.peak())
        meter.reset()
        row.update(time_edits(session, method, requests[j * n_requests:(j + 1) * n_requests], params, progress))
        row["peak_bytes"] = meter.peak()
        report["edits"][method] = row

    # -- generation -------------------------------------------------------------
    rack = session.steering
    conditions = [Condition("plain")]
    conditions += [racked(rack, random_vectors(h.adapter, n, seed=n)) for n in plan.vectors]
    added: dict[str, int] = {}
    for method in plan.methods if plan.active else ():
        params = _edit_layer_params(session, method, plan)
        before = meter.held()
        patches = active_patches(session, method, max(plan.active), plan.fill, params, progress)
        for n in plan.active:
            conditions.append(applied(patches[:n], f"{method} × {n}"))
        for p in patches:
            p.apply()
        added[f"{method} × {len(patches)}"] = meter.held() - before
        for p in reversed(patches):
            p.revert()
    ids = prompt_ids(model, plan.prompt_tokens)
    meter.reset()
    interleaved(model, ids, plan.new_tokens, conditions, plan.repeats, progress)
    plain = conditions[0]
    report["generation"] = {
        "prompt_tokens": plan.prompt_tokens, "new_tokens": plan.new_tokens,
        "plain": {"tokens_per_s": plain.tokens_per_s, "first_token_s": plain.first_token_s},
        "conditions": [{"label": c.label, "tokens_per_s": c.tokens_per_s, "first_token_s": c.first_token_s,
                        "ratio": c.tokens_per_s / plain.tokens_per_s,
                        "first_token_ratio": c.first_token_s / plain.first_token_s} for c in conditions[1:]],
    }
    report["memory"].update(generation_peak_bytes=meter.peak(), added_by_active_edits_bytes=added)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# -- reading a report ------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MiB"


def report_tables(report: dict[str, Any]) -> list[ev.Table]:
    """The report as tables a terminal can show (events.table_text renders them)."""
    tables = []
    edits = report["edits"]
    if edits:
        rows = []
        for method, r in edits.items():
            split = (f"key {_ms(r.get('key'))} · value {_ms(r.get('value'))} ({r.get('steps', 0):.0f} steps) · "
                     f"update {_ms(r.get('update'))}" if method == "rome" else f"{r.get('steps', 0):.0f} steps")
            rows.append((method, _ms(r.get("edit")), _ms(r.get("compute")),
                         _ms((r.get("probe") or 0) + (r.get("locality") or 0)), split,
                         _ms(r.get("rollback")), _mib(r.get("peak_bytes"))))
        tables.append(ev.Table(f"Edits (median of {report['plan']['edit_repeats']}, after a warm-up)",
                               ("method", "edit", "compute", "probe (before+after)", "steps", "rollback", "peak memory"), rows))
        rome = edits.get("rome", {})
        if "stats_s" in rome:
            tables.append(ev.Table("ROME key statistics C (once per model and layer, then cached)",
                                   ("time", "tokens", "source", "peak memory"),
                                   [(_ms(rome["stats_s"]), f"{rome['stats_tokens']:,}", rome["stats_source"],
                                     _mib(rome.get("stats_peak_bytes")))]))
    gen = report["generation"]
    rows = [("plain", f"{gen['plain']['tokens_per_s']:.1f}", "1.000", _ms(gen["plain"]["first_token_s"]), "1.000")]
    rows += [(c["label"], f"{c['tokens_per_s']:.1f}", f"{c['ratio']:.3f}", _ms(c["first_token_s"]),
              f"{c['first_token_ratio']:.3f}") for c in gen["conditions"]]
    fill = report["plan"]["fill"]
    tables.append(ev.Table(f"Generation: {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} new tokens, "
                           f"median of {report['plan']['repeats']} (active edits: {fill})",
                           ("state", "tokens/s", "ratio", "first token", "ratio"), rows))
    mem = report["memory"]
    rows = [("after loading (peak)", _mib(mem["loaded_peak_bytes"])),
            ("generating (peak)", _mib(mem.get("generation_peak_bytes")))]
    held = "allocated" if mem["kind"].startswith("CUDA") else "in tensors"
    rows += [(f"held by {label} active edits ({held})", _mib(n))
             for label, n in mem.get("added_by_active_edits_bytes", {}).items()]
    tables.append(ev.Table(f"Memory ({mem['kind']})", ("", "bytes"), rows))
    return tables


def report_text(report: dict[str, Any]) -> str:
    head = f"{report['model']}\n{report['device']}, torch {report['torch']}"
    return "\n\n".join([head] + [ev.table_text(t) for t in report_tables(report)])
