"""The engine imports no UI library: proven in a clean interpreter."""

import subprocess
import sys

UI_LIBRARIES = ("textual", "prompt_toolkit", "click", "rich")


def test_engine_imports_no_ui_library() -> None:
    """Every module of kedit.engine, the lazily imported ones included, found by walking the package."""
    code = (
        "import sys, pkgutil, importlib\n"
        "import kedit.engine\n"
        "names = [m.name for m in pkgutil.walk_packages(kedit.engine.__path__, 'kedit.engine.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "assert len(names) > 40, names\n"
        f"print(','.join(m for m in {UI_LIBRARIES!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"kedit.engine pulled in: {out.stdout.strip()}"


def test_the_check_itself_sees_an_imported_ui_library() -> None:
    """Guard against a check that cannot fail: importing click is seen."""
    code = "import sys, click\nprint('click' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_every_package_folder_is_listed_for_installation() -> None:
    """pyproject.toml lists packages one by one: a new package folder missing there would be left
    out of a wheel while an editable install still finds it."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        "kedit." + ".".join(p.parent.relative_to(root).parts)
        for top in ("engine", "tui")
        for p in (root / top).rglob("__init__.py")
    }
    assert folders == listed
