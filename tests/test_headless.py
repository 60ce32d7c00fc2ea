"""The engine imports no UI library: proven in a clean interpreter."""

import subprocess
import sys

UI_LIBRARIES = ("textual", "prompt_toolkit", "click", "rich")


def test_engine_imports_no_ui_library() -> None:
    code = (
        "import sys\n"
        "import kedit.engine, kedit.engine.session, kedit.engine.builtins, kedit.engine.model\n"
        "import kedit.engine.factworld.build, kedit.engine.factworld.recall, kedit.engine.metrics\n"
        "import kedit.engine.editing, kedit.engine.trace, kedit.engine.probes, kedit.engine.recipes\n"
        "import kedit.engine.evaluate, kedit.engine.export, kedit.engine.steering, kedit.engine.vector_io\n"
        "import kedit.engine.bench\n"
        "import kedit.engine.methods.rome.method, kedit.engine.methods.rome.stats\n"
        f"print(','.join(m for m in {UI_LIBRARIES!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"kedit.engine pulled in: {out.stdout.strip()}"


def test_the_check_itself_sees_an_imported_ui_library() -> None:
    """Guard against a check that cannot fail: importing click is seen."""
    code = "import sys, click\nprint('click' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
