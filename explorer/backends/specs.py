"""Backend specs: one typed spec per backend, parsed from and printed to one string.

String form (used by the CLI ``--model`` flag, settings and cache keys)::

    [KIND:]MODEL[@WEIGHTS][?key=value&key=value]

* ``KIND`` is ``clip`` (default), ``sam`` or ``vlm``.
* CLIP: ``ViT-B-16@openai`` (architecture and pretrained tag), ``ViT-B-16@/path/ckpt.pt`` (local
  checkpoint), ``hf-hub:org/repo``, ``local-dir:/path/folder``; ``?config=/path/cfg.json``
  registers a custom architecture first.
* SAM: ``sam:vit_b@/path/sam_vit_b_01ec64.pth``, ``sam:vit_b`` (the official checkpoint,
  downloaded once into the cache with a checksum), ``sam:/path/folder``.
* VLM: ``vlm:llava-hf/llava-1.5-7b-hf``, ``vlm:/path/folder``; ``?trust_remote_code=true`` only
  with the user's consent, ``?max_pixels=...`` for the Qwen2-VL family.
* ``demo`` (``clip:demo``, ``sam:demo``, ``vlm:demo``) are the offline demo models shipped in
  ``resources/models``.
* Common options: ``device=auto|cpu|cuda|mps``, ``precision=fp32|fp16|bf16``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from explorer.core.resources import demo_model_dir
from explorer.core.validation import first_error

__all__ = ["ClipSpec", "SamSpec", "VlmSpec", "TokenizerSpec", "BackendSpec", "parse_model_spec", "DEMO_CLIP", "DEFAULT_MODEL", "default_model"]

_KINDS = ("clip", "sam", "vlm", "tokenizer")
_ALIASES = {"tok": "tokenizer"}  # tok:demo is short for tokenizer:demo


class _SpecBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    model: str
    weights: str | None = None
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"device {value!r}: use auto, cpu, cuda, cuda:N or mps")
        return value

    def options(self) -> dict[str, str]:
        opts = {}
        if self.device != "auto":
            opts["device"] = self.device
        if self.precision != "fp32":
            opts["precision"] = self.precision
        return opts

    def canonical(self) -> str:
        text = f"{self.kind}:{self.model}"
        if self.weights:
            text += f"@{self.weights}"
        opts = self.options()
        if opts:
            text += "?" + urlencode(sorted(opts.items()))
        return text

    def __str__(self) -> str:
        return self.canonical()

    @property
    def is_demo(self) -> bool:
        return False


class ClipSpec(_SpecBase):
    """An open_clip model: architecture or ``hf-hub:``/``local-dir:`` name, and weights."""

    kind: Literal["clip"] = "clip"
    config: str | None = None  # model config JSON to register (custom architectures)

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty CLIP model name")
        return v.strip()

    def options(self) -> dict[str, str]:
        opts = super().options()
        if self.config:
            opts["config"] = self.config
        return opts

    @property
    def is_demo(self) -> bool:
        demo = demo_model_dir("clip")
        return self.model == f"local-dir:{demo}"

    @property
    def display_name(self) -> str:
        if self.is_demo:
            return "demo CLIP (trained on synthetic shapes)"
        name = self.model
        if self.weights:
            name += f" ({Path(self.weights).name if '/' in self.weights else self.weights})"
        return name


class SamSpec(_SpecBase):
    """A Segment Anything model: an official architecture (``vit_b``, ``vit_l``, ``vit_h``) with a
    checkpoint (a local path, or none to download the official file once into the cache), or a
    folder in the demo format (``sam_config.json`` + ``model.safetensors``)."""

    kind: Literal["sam"] = "sam"

    @property
    def is_demo(self) -> bool:
        return self.model == str(demo_model_dir("sam"))

    @property
    def display_name(self) -> str:
        if self.is_demo:
            return "demo SAM (trained on synthetic shapes)"
        return f"SAM {self.model}" + (f" ({Path(self.weights).name})" if self.weights else "")


class VlmSpec(_SpecBase):
    """A transformers vision-language model: a hub id or a local folder, loaded with
    ``from_pretrained``. ``trust_remote_code`` is never set without the user's consent."""

    kind: Literal["vlm"] = "vlm"
    trust_remote_code: bool = False
    max_pixels: int | None = None  # Qwen2-VL family: cap the image size (pixels)

    def options(self) -> dict[str, str]:
        opts = super().options()
        if self.trust_remote_code:
            opts["trust_remote_code"] = "true"
        if self.max_pixels:
            opts["max_pixels"] = str(self.max_pixels)
        return opts

    @property
    def is_demo(self) -> bool:
        return self.model == str(demo_model_dir("vlm"))

    @property
    def display_name(self) -> str:
        return "demo VLM (trained on synthetic shapes)" if self.is_demo else self.model


class TokenizerSpec(_SpecBase):
    """An image tokenizer (encode to discrete ids, decode back): ``demo`` (the shipped 1D
    tokenizer with ordered tokens) or ``demo-grid`` (the shipped grid VQ baseline), a folder with
    ``config.json`` and ``model.safetensors`` (the project's TiTok format, which is the layout the
    official TiTok releases use), or a Hugging Face hub id of such a folder
    (``yucornetto/tokenizer_titok_l32_imagenet``)."""

    kind: Literal["tokenizer"] = "tokenizer"

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty tokenizer name")
        return v.strip()

    def canonical(self) -> str:
        return "tok:" + super().canonical().split(":", 1)[1]

    @property
    def is_demo(self) -> bool:
        return self.model in (str(demo_model_dir("tok")), str(demo_model_dir("tok-grid")))

    @property
    def display_name(self) -> str:
        if self.model == str(demo_model_dir("tok")):
            return "demo 1D tokenizer (trained on synthetic shapes)"
        if self.model == str(demo_model_dir("tok-grid")):
            return "demo grid tokenizer (trained on synthetic shapes)"
        return self.model


BackendSpec = ClipSpec | SamSpec | VlmSpec | TokenizerSpec


DEMO_CLIP = "demo"
DEFAULT_MODEL = DEMO_CLIP


def default_model() -> str:
    """The model used when none is configured: ``$EXPLORER_MODEL``, else the demo CLIP."""
    import os

    return os.environ.get("EXPLORER_MODEL") or DEFAULT_MODEL


def parse_model_spec(text: str, kind: str | None = None) -> BackendSpec:
    """Parse a model spec string (see module docstring). Raises ``ValueError`` with a clear line.

    ``kind`` is the kind assumed when the string names none (default ``clip``).
    """
    raw = (text or "").strip()
    if not raw:
        raise ValueError("empty model spec")
    body, _, query = raw.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=False, strict_parsing=False)) if query else {}
    head, sep, rest = body.partition(":")
    head = _ALIASES.get(head, head)
    if sep and head in _KINDS:
        kind, body = head, rest
    kind = _ALIASES.get(kind, kind) if kind else "clip"
    if body == "demo":
        body = (f"local-dir:{demo_model_dir('clip')}" if kind == "clip" else
                str(demo_model_dir("tok" if kind == "tokenizer" else kind)))
    elif kind == "tokenizer" and body == "demo-grid":
        body = str(demo_model_dir("tok-grid"))
    model, _, weights = body.partition("@")
    allowed = {"clip": {"device", "precision", "config"}, "sam": {"device"},
               "vlm": {"device", "precision", "trust_remote_code", "max_pixels"},
               "tokenizer": {"device", "precision"}}[kind]
    unknown = set(opts) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in a {kind} model spec; allowed: {sorted(allowed)}")
    if "trust_remote_code" in opts:
        opts["trust_remote_code"] = opts["trust_remote_code"].lower() in ("1", "true", "yes")
    cls = {"clip": ClipSpec, "sam": SamSpec, "vlm": VlmSpec, "tokenizer": TokenizerSpec}[kind]
    try:
        return cls(model=model, weights=weights or None, **opts)
    except ValidationError as exc:
        raise ValueError(f"invalid model spec {raw!r}: {first_error(exc)[1]}") from None
