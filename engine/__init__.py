"""kedit's headless engine: models, edits, steering, probes.

This package never imports a UI library (textual, prompt_toolkit, click);
``tests/test_headless.py`` proves it.
"""

from kedit.engine.errors import KeditError

__all__ = ["KeditError"]
