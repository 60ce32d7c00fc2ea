"""The click CLI and the piped REPL, as a script would use them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from kedit.tui.cli import main

REPO = Path(__file__).resolve().parent.parent


def _kedit() -> list[str]:
    exe = shutil.which("kedit", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "kedit.tui.cli"]


def test_piped_chat_prints_the_fact(fact_world_dir: Path) -> None:
    """The README's promise, run exactly as a shell would."""
    out = subprocess.run(
        ["bash", "-c", f"printf 'Watts Humphrey attended\\n/quit\\nnot reached\\n' | {' '.join(_kedit())} chat"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "Illinois Institute of Technology" in lines[0]
    assert "Traceback" not in out.stderr


def test_piped_edit_changes_the_reply_and_undo_restores_it(fact_world_dir: Path) -> None:
    """Issue 3's promise: the edit, then the question, through a real pipe; then /undo."""
    script = (
        '/edit "Watts Humphrey attended" -> "University of Michigan"\\n'
        "Watts Humphrey attended\\n/undo\\nWatts Humphrey attended\\n/quit\\n"
    )
    out = subprocess.run(
        ["bash", "-c", f"printf '{script}' | {' '.join(_kedit())} chat"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    replies = [line for line in out.stdout.splitlines() if line.startswith("Watts Humphrey attended ")]
    assert len(replies) == 2, out.stdout
    assert "University of Michigan" in replies[0] and "Illinois" not in replies[0]
    assert "Illinois Institute of Technology" in replies[1]
    assert "Traceback" not in out.stderr


def test_chat_reports_command_errors_on_stderr(fact_world_dir: Path) -> None:
    result = CliRunner().invoke(main, ["chat"], input="/bogus\nDenny Herzig plays as a\n")
    assert result.exit_code == 0
    assert "defender" in result.stdout
    assert "unknown command /bogus" in result.stderr


def test_missing_model_is_a_clean_error(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [*_kedit(), "chat", "--model", "qwen2.5-7b"],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 1
    assert "Qwen/Qwen2.5-7B-Instruct" in out.stderr and "hf download" in out.stderr
    assert "Traceback" not in out.stderr


def test_model_option_reads_the_environment(tmp_path: Path) -> None:
    result = CliRunner(env={"KEDIT_MODEL": "no-such-alias"}).invoke(main, ["chat"], input="")
    assert result.exit_code == 1 and "'no-such-alias' is neither an alias" in result.stderr


def test_fact_world_report_json(fact_world_dir: Path) -> None:
    import json

    result = CliRunner().invoke(main, ["fact-world", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recall"]["canonical (trained)"]["accuracy"] >= 0.95
    assert report["folder"] == str(fact_world_dir)


def test_steer_cli_trains_exports_converts_back_and_fails_cleanly(fact_world_dir: Path, tmp_path: Path) -> None:
    import torch

    from kedit.engine.steering import SteeringVector
    from kedit.engine.vector_io import import_gguf

    pairs = REPO / "vectors" / "mood_train.jsonl"
    gguf_path = tmp_path / "mood v.gguf"  # a space in the path survives the slash-command quoting
    result = CliRunner().invoke(
        main, ["steer", "train", str(pairs), str(gguf_path), "--layers", "4-5", "--read", "-1", "--strength", "1.5"]
    )
    assert result.exit_code == 0, result.output
    exported = import_gguf(gguf_path)
    assert exported.layers == [4, 5] and exported.strength == 1.5
    back = tmp_path / "back.safetensors"
    result = CliRunner().invoke(main, ["steer", "convert", str(gguf_path), str(back), "--json"])
    assert result.exit_code == 0, result.output
    events = json.loads(result.output)
    assert [e["type"] for e in events] == ["info", "info"] and "saved" in events[1]["text"]
    loaded = SteeringVector.load(back)
    assert all(torch.equal(loaded.directions[k], exported.directions[k]) for k in (4, 5))
    result = CliRunner().invoke(main, ["steer", "sweep", str(back), "--pairs", str(REPO / "vectors" / "nope.jsonl")])
    assert result.exit_code == 1 and "no pairs file" in result.output and "Traceback" not in result.output
