"""README.md opens with the two set-up commands, and CI runs the second one as written."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_run_and_test_commands() -> None:
    run, test = _readme_commands()
    assert run.endswith("kedit chat")
    assert "pytest" in test
    assert "-c constraints.txt" in run and "-c constraints.txt" in test


def test_ci_runs_the_readme_test_command() -> None:
    _, test = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_constraints_pin_the_cpu_torch() -> None:
    lines = [x for x in (REPO / "constraints.txt").read_text().splitlines() if x and not x.startswith("#")]
    assert "torch==2.13.0" in lines
