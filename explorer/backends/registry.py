"""Backend dispatch: a spec (object or string) to a loaded backend of its kind."""

from __future__ import annotations

from typing import Any

from .specs import BackendSpec, ClipSpec, SamSpec, TokenizerSpec, VlmSpec, parse_model_spec

__all__ = ["load_backend", "parse_model_spec"]


def load_backend(spec: BackendSpec | str) -> Any:
    """Load the backend for ``spec``; raises ``ModelLoadError`` (a ``ValueError``) with one line."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    if isinstance(spec, ClipSpec):
        from .clip import ClipBackend

        return ClipBackend.load(spec)
    if isinstance(spec, SamSpec):
        from .sam import SamBackend

        return SamBackend.load(spec)
    if isinstance(spec, VlmSpec):
        from .vlm import VlmBackend

        return VlmBackend.load(spec)
    if isinstance(spec, TokenizerSpec):
        from .tokenizer import TokenizerBackend

        return TokenizerBackend.load(spec)
    raise ValueError(f"no backend for model kind {spec.kind!r}")
