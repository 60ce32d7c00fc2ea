"""Editing methods, one package each, behind ``base.EditMethod``; ``table.METHODS`` lists them."""

from kedit.engine.methods.base import (
    Computed,
    EditContext,
    EditMethod,
    EditRequest,
    MethodInfo,
    MethodParams,
    as_continuation,
)

__all__ = ["Computed", "EditContext", "EditMethod", "EditRequest", "MethodInfo", "MethodParams", "as_continuation"]
