"""The errors a backend load raises, and the one-line reasons for weight files it refuses.

Importing this module imports neither torch nor a model library, so the window can catch these
types before any model was ever loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

__all__ = ["ModelLoadError", "RemoteCodeRequired", "REFUSED_PICKLE", "weights_file_reason", "find_bad_weights_file"]

#: What is said of a pickled checkpoint that ``torch.load(weights_only=True)`` refused.
REFUSED_PICKLE = "holds code or objects that are not plain tensors; refused (only weights are loaded)"


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line saying why and what to do."""


class RemoteCodeRequired(ModelLoadError):
    """The model needs Python code of its own repository (its ``config.json`` has an ``auto_map``
    naming classes this transformers does not have) and the spec does not allow it.

    Nothing of that code was imported. The window asks the user (a consent dialog) and loads
    :attr:`spec` again with ``?trust_remote_code=true`` only if they agree; the command line says
    how to allow it.

    Attributes
    ----------
    spec : str
        The spec as the user wrote it (``vlm:org/name``, ``vlm:/path/folder``).
    modules : tuple of str
        The code files of the repository the model would run (``modeling_x.py``, ...).
    """

    def __init__(self, spec: str, modules: Sequence[str] = ()) -> None:
        self.spec = str(spec)
        self.modules = tuple(str(m) for m in modules)
        code = f" ({', '.join(self.modules)})" if self.modules else ""
        how = (f"add &trust_remote_code=true to the spec ({self.allowed_spec})" if "?" in self.spec
               else "add ?trust_remote_code=true to the spec")
        super().__init__(f"{self.spec} runs its repository's own Python code{code}; nothing of it ran. Allow it only "
                         f"for a repository you trust: {how}")

    @property
    def allowed_spec(self) -> str:
        """:attr:`spec` with ``trust_remote_code=true`` added (what to load once the user agrees)."""
        return f"{self.spec}{'&' if '?' in self.spec else '?'}trust_remote_code=true"

    def __reduce__(self):
        return (type(self), (self.spec, self.modules))


def weights_file_reason(exc: BaseException) -> str | None:
    """Why a weights file could not be read, when ``exc`` says it is damaged or refused:
    ``"is damaged (<the library's reason>)"`` for a safetensors file the library cannot parse,
    :data:`REFUSED_PICKLE` for a pickle ``torch.load(weights_only=True)`` would not unpickle;
    ``None`` for any other error."""
    if isinstance(exc, pickle.UnpicklingError):
        return REFUSED_PICKLE
    if type(exc).__name__ == "SafetensorError" or "safetensor" in type(exc).__module__.lower():
        text = str(exc).strip().splitlines()
        return f"is damaged ({text[0] if text else type(exc).__name__})"
    return None


def find_bad_weights_file(folder: str | Path, reason: str) -> Path | None:
    """The first weights file in ``folder`` that fails the way ``reason`` says (damaged safetensors,
    or a refused pickle); ``None`` when none does. Reads headers (safetensors) or loads with
    ``weights_only=True`` memory-mapped where possible (pickles): only called after a load failed."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if reason == REFUSED_PICKLE:
        import torch

        for path in sorted(p for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(ext)):
            try:
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # a legacy (not zip) file cannot be memory-mapped
                    torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                return path
            except Exception:  # noqa: BLE001 - damaged some other way: not the file asked for
                continue
        return None
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception:  # noqa: BLE001 - SafetensorError and OSError: this is the damaged file
            return path
    return None
