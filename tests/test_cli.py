"""The click CLI and the piped REPL, as a script would use them."""

from __future__ import annotations

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
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "Illinois Institute of Technology" in lines[0]
    assert "Traceback" not in out.stderr


def test_piped_edit_changes_the_reply_and_undo_restores_it(fact_world_dir: Path) -> None:
    """Issue 3's promise: the edit, then the question, through a real pipe; then /undo."""
    script = ('/edit "Watts Humphrey attended" -> "University of Michigan"\\n'
              'Watts Humphrey attended\\n/undo\\nWatts Humphrey attended\\n/quit\\n')
    out = subprocess.run(["bash", "-c", f"printf '{script}' | {' '.join(_kedit())} chat"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
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
    out = subprocess.run([*_kedit(), "chat", "--model", "qwen2.5-7b"], input="", capture_output=True,
                         text=True, timeout=120, env=env, cwd=REPO)
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
