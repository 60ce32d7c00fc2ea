"""Configuration layers: flag > env > ./kedit.toml > user config dir > shipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from kedit.engine.config import Config
from kedit.engine.errors import ConfigError


def test_shipped_defaults_are_read() -> None:
    cfg = Config.load(env={})
    assert cfg.get("aliases")["qwen2.5-7b"] == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.get("model.default") == "fact-world"
    assert cfg.get("model.trust_remote_code") is False
    assert cfg.table("shapes")["qwen2.5-7b"]["hidden_size"] == 3584


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "kedit.toml").write_text(
        '[generation]\nmax_new_tokens = 11\ntemperature = 0.5\n[aliases]\nmine = "me/my-model"\n'
    )
    project = tmp_path / "project"
    project.mkdir()
    (project / "kedit.toml").write_text("[generation]\nmax_new_tokens = 22\n")
    monkeypatch.setenv("KEDIT_CONFIG_DIR", str(user))

    cfg = Config.load(cwd=project, env={})
    assert cfg.get("generation.max_new_tokens") == 22  # project over user
    assert cfg.get("generation.temperature") == 0.5  # user over shipped
    assert cfg.get("aliases.mine") == "me/my-model"
    assert cfg.get("aliases")["qwen2.5-7b"] == "Qwen/Qwen2.5-7B-Instruct"  # tables merge

    cfg = Config.load(cwd=project, env={"KEDIT_MAX_NEW_TOKENS": "33", "KEDIT_MODEL": "mine"})
    assert cfg.get("generation.max_new_tokens") == 33  # env over project, typed like the default
    assert cfg.get("model.default") == "mine"
    assert (
        cfg.with_overrides({"generation.max_new_tokens": 44, "model.quant": None}).get("generation.max_new_tokens")
        == 44
    )  # flags over env; None leaves a key alone


def test_bad_files_and_values_are_reported(tmp_path: Path) -> None:
    (tmp_path / "kedit.toml").write_text("[generation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(cwd=tmp_path, env={})
    with pytest.raises(ConfigError, match="KEDIT_MAX_NEW_TOKENS"):
        Config.load(env={"KEDIT_MAX_NEW_TOKENS": "lots"})
