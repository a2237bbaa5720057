"""Plugin manifests: static metadata read without importing plugin code.

A plugin is a folder (an importable package) holding ``manifest.toml`` and its module(s). It is
found through the ``explorer.plugins`` entry-point group, whose value names the manifest as
``package:manifest.toml`` (the npe2 convention). Example::

    name = "attention-rollout"
    version = "0.1.0"
    description = "Attention rollout and flow"

    [[methods]]
    id = "attention.rollout"
    title = "Attention rollout"
    family = "attention"
    backends = ["clip"]
    requires = ["attentions"]
    python_name = "explorer_plugins.attention_rollout.method:Rollout"
    citation = "Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020"
    repository = "https://github.com/samiraabnar/attention_flow"
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from explorer.core.validation import first_error

__all__ = ["MethodContribution", "PluginManifest", "ManifestError", "read_manifest", "FAMILIES", "REQUIREMENTS"]

FAMILIES = ("attention", "similarity", "attribution", "pruning", "merging", "region", "caption")
# "model": calls the backend (runs on the device thread); "passes": runs extra vision-tower passes
REQUIREMENTS = ("attentions", "hidden_states", "gradients", "text", "region", "query", "model", "passes")

_ID = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
_PYTHON_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ManifestError(ValueError):
    """A manifest could not be read or does not validate (one line)."""


class MethodContribution(BaseModel):
    """One method a plugin contributes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    title: str
    family: Literal["attention", "similarity", "attribution", "pruning", "merging", "region", "caption",
                    "reconstruction"]
    backends: tuple[str, ...] = ("clip",)
    requires: tuple[str, ...] = ()
    python_name: str
    citation: str = ""
    repository: str = ""
    description: str = ""
    adaptation: str = ""  # what differs from the paper, shown in the UI
    # how the method is checked against its authors' code: "tests/golden/<file>: <what agrees, tolerance>",
    # or "none: <why>" (no official code, ...); empty: not checked yet
    official_check: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(f"method id {v!r} must be lower-case letters, digits, '.', '_' or '-'")
        return v

    @field_validator("python_name")
    @classmethod
    def _python_name(cls, v: str) -> str:
        if not _PYTHON_NAME.match(v):
            raise ValueError(f"python_name {v!r} must look like 'package.module:Object'")
        return v

    @field_validator("requires")
    @classmethod
    def _requires(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [r for r in v if r not in REQUIREMENTS]
        if bad:
            raise ValueError(f"unknown requirement(s) {bad}; known: {list(REQUIREMENTS)}")
        return v


class PluginManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str = "0.0.0"
    description: str = ""
    author: str = ""
    methods: tuple[MethodContribution, ...] = Field(default_factory=tuple)


def read_manifest(path: str | Path) -> PluginManifest:
    """Read and validate a manifest file; :class:`ManifestError` with one line on failure."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"manifest {path.name} is not valid TOML: {exc}") from None
    try:
        return PluginManifest.model_validate(data)
    except ValidationError as exc:
        where, msg = first_error(exc)
        raise ManifestError(f"manifest {path.name}: {where}: {msg}") from None
