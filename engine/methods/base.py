"""The one seam for editing methods: the request, the settings, the result, and the
``EditMethod`` protocol every method implements. ``kedit.engine.methods.table.METHODS`` lists
them; nothing outside a method's package branches on its name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from kedit.engine.errors import ConfigError, KeditError
from kedit.engine.patches import LowRankPatch, Patch, sidecar

if TYPE_CHECKING:
    from kedit.engine.config import Config
    from kedit.engine.ledger import Edit
    from kedit.engine.model import ModelHandle

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EditRequest:
    """What the user asked to change: after ``prompt``, the model should say ``target``."""

    prompt: str  # brackets removed
    subject: str
    target: str  # with the leading space a continuation needs
    paraphrases: tuple[str, ...] = field(default_factory=tuple)


def as_continuation(prompt: str, target: str) -> str:
    """The target as the text that follows the prompt: one space between them, as EasyEdit does."""
    target = target.strip()
    return target if prompt.endswith((" ", "\n")) else " " + target


class MethodParams:
    """Base of a method's frozen hyperparameter dataclass, read from kedit.toml: [section],
    then [section.family.<model_type>], then [section.model."<model id>"], each overriding the
    one before; unknown keys are refused. Subclasses set ``section`` (and ``skip``, keys of
    the section that are not hyperparameters)."""

    section: ClassVar[str]
    skip: ClassVar[tuple[str, ...]] = ()
    # every subclass is a dataclass: this tells the type checker so (fields, replace, asdict)
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @classmethod
    def from_config(cls, config: Any, model_type: str, model_id: str) -> Any:
        base = config.table(cls.section)
        table: dict[str, Any] = {k: v for k, v in base.items() if not isinstance(v, dict) and k not in cls.skip}
        table.update(base.get("family", {}).get(model_type, {}))
        table.update(base.get("model", {}).get(model_id, {}))
        names = {f.name for f in fields(cls)}
        unknown = set(table) - names
        if unknown:
            raise ConfigError(
                f"unknown {cls.section} setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
            )
        return cls(**table)

    def with_(self, **changes: Any) -> Any:
        """A copy with the given settings (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MethodInfo:
    """What computing one edit measured; each method extends it with its own fields."""

    layer: int
    module: str
    nll_before: float = float("nan")
    nll_after: float = float("nan")
    value_steps: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """The saved record's info (keys this kedit does not know are dropped)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Computed:
    """A computed edit: its patch (not yet applied) and what computing it measured."""

    patch: Patch
    info: MethodInfo


@dataclass
class EditContext:
    """What a method may use while it computes an edit, and nothing of the session around it."""

    handle: ModelHandle
    config: Config
    contexts: Callable[[int, int], list[str]]  # (n, tokens) -> model-written texts, kept per session
    trace_cases: Callable[[], list[tuple[str, str]]]  # (prompt, subject) pairs for causal tracing
    stats_corpus: Path | None = None
    progress: Progress | None = None


class EditMethod(Protocol):
    """One editing method. ``name`` is its key in METHODS and on the command line.

    Its settings are read-only properties here, so that a method's plain class attributes
    (``params = RomeParams``, ``bench_layer_share = None``) satisfy them."""

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> type[MethodParams]: ...

    @property
    def info(self) -> type[MethodInfo]: ...

    @property
    def exports(self) -> bool:  # its patches are low-rank deltas that export merges into the weights
        ...

    @property
    def lr_setting(self) -> str:  # the setting to lower when an edit diverges
        ...

    @property
    def batches(self) -> bool:  # it edits many facts in one solve (compute_batch)
        ...

    @property
    def bench_layer_share(
        self,
    ) -> float | None:  # on a random-weight shape, edit this far up (None: its own layer choice)
        ...

    @property
    def timing_steps(self) -> tuple[str, ...]:  # the steps of info.timings the bench shows
        ...

    def layer(self, ctx: EditContext, hp: Any) -> int:
        """The layer an edit with settings ``hp`` changes."""
        ...

    def compute(self, ctx: EditContext, request: EditRequest, hp: Any, layer: int, edit_id: str) -> Computed:
        """The edit's patch, not applied; the model is left as it was."""
        ...

    def compute_batch(
        self, ctx: EditContext, requests: Sequence[EditRequest], hp: Any, layer: int, edit_id: str
    ) -> Computed:
        """One patch for many facts (methods with ``batches``), not applied."""
        ...

    def prepare(self, ctx: EditContext, hp: Any, layer: int) -> dict[str, Any]:
        """Work done once per model and layer before edits (ROME: the key statistics), done
        afresh for the bench; what it measured ("stats_s", "stats_tokens", "stats_source")."""
        ...

    def describe(self, edit: Edit) -> str:
        """A clause for the edit's title line in /edit and /edits."""
        ...

    def save(self, edit: Edit, put: Callable[[str, torch.Tensor], None]) -> dict[str, Any]:
        """The patch's JSON fields ("module" among them); its tensors go through ``put``."""
        ...

    def restore(
        self,
        model: torch.nn.Module,
        record: dict[str, Any],
        module: torch.nn.Module,
        tensors: dict[str, torch.Tensor],
        pending: dict[str, Any],
    ) -> Patch:
        """A saved edit's patch, in force. ``pending`` is shared by one load's edits of this method."""
        ...

    def finish_restore(
        self, model: torch.nn.Module, modules: dict[str, torch.nn.Module], pending: dict[str, Any]
    ) -> None:
        """Called once after a load restored every edit."""
        ...

    def synthetic(self, handle: ModelHandle, hp: Any, layer: int, i: int, g: torch.Generator) -> Patch:
        """Patch ``i`` of this method's kind with random contents, for the bench."""
        ...

    def state(self, model: torch.nn.Module) -> list[str]:
        """Lines on the method's live state on the model (codebooks, side memories)."""
        ...


class MethodDefaults:
    """What most methods share, for them to inherit: no merge into weights, no once-per-layer
    work, nothing to finish after a load, no state lines, their own layer on a random shape."""

    exports = False
    batches = False
    bench_layer_share: float | None = None
    timing_steps: tuple[str, ...] = ()

    def compute_batch(
        self, ctx: EditContext, requests: Sequence[EditRequest], hp: Any, layer: int, edit_id: str
    ) -> Computed:
        raise KeditError("this method edits one fact at a time")

    def prepare(self, ctx: EditContext, hp: Any, layer: int) -> dict[str, Any]:
        return {}

    def finish_restore(
        self, model: torch.nn.Module, modules: dict[str, torch.nn.Module], pending: dict[str, Any]
    ) -> None:
        return None

    def state(self, model: torch.nn.Module) -> list[str]:
        return []


def share_layer(handle: ModelHandle, hp: Any) -> int:
    """The configured layer, else ``layer_share`` of the way up the stack."""
    n = handle.adapter.n_layers
    layer = hp.layer if hp.layer is not None else round(hp.layer_share * (n - 1))
    return check_layer(handle, layer)


def synthetic_factors(handle: ModelHandle, layer: int, key: str, g: torch.Generator) -> LowRankPatch:
    """A rank-one patch of small random factors on ``layer``'s MLP output projection, for the bench."""
    module, name = handle.adapter.mlp_out(layer), handle.adapter.mlp_out_name(layer)
    device = next(handle.model.parameters()).device
    u = (torch.randn(handle.adapter.hidden_size, 1, generator=g) * 1e-2).to(device)
    v = (torch.randn(handle.adapter.mlp_hidden_size, 1, generator=g) * 1e-2).to(device)
    return LowRankPatch(sidecar(handle.model, module, name), key, u, v)


def check_layer(handle: ModelHandle, layer: int) -> int:
    n = handle.adapter.n_layers
    if not 0 <= layer < n:
        raise KeditError(f"layer {layer} is out of range: the model has {n} layers (0-{n - 1})")
    return layer


def fmt(v: Any) -> str:
    """A figure in a method's state line."""
    return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
