"""One namespace for method math on the host (numpy) and on a device (torch tensors).

A :class:`~explorer.core.trace.Trace` keeps its arrays where the model computed them: numpy
arrays for a model on the CPU, torch tensors on the model's device (in the model's dtype) for a
GPU or MPS model. Methods write their math once against the Python array API standard
(https://data-apis.org/array-api/), through ``array-api-compat``, which gives numpy and torch the
same namespace; the same code then runs on the host and on the device. Only what is drawn or
exported crosses to the host, with :func:`to_host`, and only when asked.

This module never imports torch: ``array_api_compat`` imports it lazily when it is handed a torch
tensor, so the core stays free of it.

Conventions
-----------
* ``xp = namespace(a, b, ...)`` is the namespace of the given arrays (``None`` and Python scalars
  ignored; numpy when nothing is left).
* :func:`work_dtype` is the float dtype methods compute in: float64 on the CPU (numpy or torch),
  float32 on an accelerator (MPS has no float64; GPUs are slow in it). Results are compared across
  the two within float32 precision.
* :func:`take` / :func:`take_along` / :func:`index_array` move integer index arrays to the data's
  device before indexing, so a CPU index never forces a synchronisation on a GPU.
"""

from __future__ import annotations

from typing import Any

import array_api_compat as _aac
import numpy as np

__all__ = [
    "namespace", "is_host", "is_torch", "to_host", "to_scalar", "device_of", "nbytes", "work_dtype", "as_work",
    "index_array", "take", "take_along", "asarray_like", "stable_argsort", "is_cpu", "device",
]

_SCALARS = (bool, int, float, complex)


def namespace(*arrays: Any):
    """The array namespace shared by ``arrays`` (numpy's when none is an array)."""
    arrs = [a for a in arrays if a is not None and not isinstance(a, _SCALARS) and not isinstance(a, np.generic)]
    if not arrs:
        return _aac.array_namespace(np.zeros(0))
    return _aac.array_namespace(*arrs)


def is_host(a: Any) -> bool:
    """True for numpy arrays (and numpy scalars): data already on the host."""
    return isinstance(a, (np.ndarray, np.generic))


def is_torch(a: Any) -> bool:
    return _aac.is_torch_array(a)


def device_of(a: Any) -> str:
    """``'cpu'`` for host arrays and CPU tensors, else the tensor's device (``'cuda:0'``, ``'mps:0'``)."""
    if a is None or is_host(a) or isinstance(a, _SCALARS):
        return "cpu"
    return str(_aac.device(a))


def device(a: Any):
    """The array's device object, to pass as ``device=`` to the namespace's creation functions."""
    return _aac.device(a)


def is_cpu(a: Any) -> bool:
    return device_of(a) == "cpu"


def nbytes(a: Any) -> int:
    """Bytes held by an array of either namespace (0 for ``None``)."""
    if a is None:
        return 0
    n = getattr(a, "nbytes", None)
    if isinstance(n, int):
        return n
    if is_torch(a):
        return int(a.numel() * a.element_size())
    return int(np.asarray(a).nbytes)


def to_host(a: Any, dtype: Any = None) -> np.ndarray | None:
    """A numpy array with the values of ``a``: a device tensor is copied to the host (bfloat16 and
    other dtypes numpy lacks become float32); numpy arrays are returned as they are (cast to
    ``dtype`` when given). This is the one place where values leave a device."""
    if a is None:
        return None
    if is_torch(a):
        t = a.detach()
        if str(t.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"):
            t = t.float()
        out = t.cpu().numpy()
    else:
        out = np.asarray(a)
    if dtype is not None and out.dtype != np.dtype(dtype):
        out = out.astype(dtype)
    return out


def to_scalar(a: Any) -> float:
    """A Python float from a 0-d array of either namespace (one host synchronisation)."""
    if is_torch(a):
        return float(a.detach().float().cpu().item())
    return float(np.asarray(a))


def work_dtype(xp, a: Any):
    """The float dtype to compute in for data like ``a``: float64 on the CPU, float32 elsewhere."""
    return xp.float64 if is_cpu(a) else xp.float32


def as_work(a: Any, xp=None):
    """``a`` converted to :func:`work_dtype` in its own namespace and device."""
    xp = xp or namespace(a)
    dt = work_dtype(xp, a)
    return a if a.dtype == dt else xp.astype(a, dt)


def index_array(idx: Any, like: Any):
    """Integer indices ``idx`` (numpy, list or array) as an int64 array on ``like``'s device."""
    if is_host(like):
        return np.asarray(idx, dtype=np.int64)
    xp = namespace(like)
    if is_torch(idx) and str(idx.device) == str(like.device):
        return idx if idx.dtype == xp.int64 else xp.astype(idx, xp.int64)
    return xp.asarray(np.asarray(to_host(idx), dtype=np.int64), device=_aac.device(like))


def take(a: Any, idx: Any, axis: int = 0):
    """``a`` indexed by the integer array ``idx`` along ``axis`` (any namespace, idx on any device)."""
    xp = namespace(a)
    return xp.take(a, index_array(idx, a), axis=axis)


def take_along(a: Any, idx: Any, axis: int = -1):
    """``take_along_axis`` in either namespace (``idx`` broadcasts against ``a`` except on ``axis``)."""
    xp = namespace(a)
    return xp.take_along_axis(a, index_array(idx, a), axis=axis)


def asarray_like(values: Any, like: Any, dtype: Any = None):
    """``values`` as an array in ``like``'s namespace, on its device (host arrays are copied over)."""
    xp = namespace(like)
    if is_host(like):
        return np.asarray(values if not is_torch(values) else to_host(values), dtype=dtype)
    if is_torch(values) and str(values.device) == str(like.device):
        return values if dtype is None else xp.astype(values, dtype)
    host = to_host(values) if is_torch(values) else np.asarray(values)
    return xp.asarray(host, dtype=dtype, device=_aac.device(like))


def stable_argsort(a: Any, descending: bool = False, axis: int = -1):
    """Stable argsort in either namespace (ties keep their order, also when descending)."""
    xp = namespace(a)
    return xp.argsort(a, axis=axis, descending=descending, stable=True)
