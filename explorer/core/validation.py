"""One-line messages from pydantic validation errors."""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ["first_error"]


def first_error(exc: ValidationError) -> tuple[str, str]:
    """``(dotted location, message)`` of the first error, for one-line reports."""
    err = exc.errors()[0]
    return ".".join(str(p) for p in err.get("loc", ())), str(err.get("msg", exc))
