"""Whether weights can be fetched at all: cheap checks before a loader goes to the network.

The libraries that fetch weights (open_clip and transformers through ``huggingface_hub``,
``urllib`` for SAM's official checkpoints) retry a failed request for tens of seconds and log
every attempt before they give up. Without network that is only delay and noise, so the backends
first ask whether the files a loader would fetch are already in the Hugging Face cache
(:func:`cached_hub_file`, file lookups only) and, when they are not, whether the server can be
reached at all (:func:`hub_reachable`, :func:`url_reachable`: offline mode, or one TCP connection
with a short timeout, remembered for a minute). When neither holds they fail at once with one
line (:func:`offline_message`) that names the spec forms that load local files.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

__all__ = ["hub_offline", "hub_endpoint", "hub_reachable", "url_reachable", "host_reachable", "hub_cache_dirs",
           "cached_hub_file", "offline_message", "forget_reachability"]

_TRUE = ("1", "on", "yes", "true")
REMEMBER_SECONDS = 60.0  # a reachability answer is reused this long (one check per load, not per file)

_seen: dict[tuple[str, int], tuple[float, bool]] = {}
_seen_lock = threading.Lock()


def hub_offline() -> bool:
    """True when offline mode is asked for (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``, read
    now or when ``huggingface_hub`` was imported): the loaders will not fetch anything."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_endpoint() -> str:
    """The Hugging Face hub's address (``HF_ENDPOINT``, default ``https://huggingface.co``)."""
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env
    try:
        from huggingface_hub import constants
    except ImportError:
        return "https://huggingface.co"
    return str(getattr(constants, "ENDPOINT", "") or "https://huggingface.co")


def _connect(host: str, port: int, timeout: float) -> bool:
    """One TCP connection to ``host:port``, name lookup included, bounded by ``timeout`` seconds
    (the lookup runs on a daemon thread: ``getaddrinfo`` itself has no timeout)."""
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=attempt, name=f"reach {host}:{port}", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def host_reachable(host: str, port: int = 443, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds; the answer is
    remembered for :data:`REMEMBER_SECONDS` per process."""
    key = (host, int(port))
    now = time.monotonic()
    with _seen_lock:
        hit = _seen.get(key)
    if hit is not None and now - hit[0] < REMEMBER_SECONDS:
        return hit[1]
    ok = _connect(host, int(port), timeout)
    with _seen_lock:
        _seen[key] = (time.monotonic(), ok)
    return ok


def forget_reachability() -> None:
    """Drop the remembered answers (the network came back; tests)."""
    with _seen_lock:
        _seen.clear()


def url_reachable(url: str, timeout: float = 1.0) -> bool:
    """Whether the server of an ``http(s)`` URL can be reached (through the configured proxy, when
    there is one for it). URLs of other schemes (``file:``) need no network: ``True``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return True
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            host, port = p.hostname, p.port or (443 if p.scheme == "https" else 80)
    return host_reachable(host, port, timeout)


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the Hugging Face hub can be asked for files: not in offline mode, and its server
    answers a TCP connection within ``timeout`` seconds (remembered, see :func:`host_reachable`)."""
    if hub_offline():
        return False
    return url_reachable(hub_endpoint(), timeout)


def hub_cache_dirs() -> list[Path]:
    """Where the hub cache is: from the environment now (``HF_HUB_CACHE``, else ``HF_HOME/hub``)
    and as ``huggingface_hub`` read it at import; a file in either is found by the loaders."""
    dirs: list[Path] = []
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        dirs.append(Path(env).expanduser())
    elif os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    try:
        from huggingface_hub import constants

        dirs.append(Path(constants.HF_HUB_CACHE).expanduser())
    except ImportError:
        dirs.append(Path("~/.cache/huggingface/hub").expanduser())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def cached_hub_file(repo_id: str, filenames: Iterable[str], revision: str | None = None) -> str | None:
    """The cached path of the first of ``filenames`` (alternatives for one file) in the hub cache
    of ``repo_id``, or ``None``. Reads the cache folders only; never goes to the network."""
    from huggingface_hub import try_to_load_from_cache

    names = list(filenames)
    for folder in hub_cache_dirs():
        for name in names:
            try:
                hit = try_to_load_from_cache(repo_id, name, cache_dir=folder, revision=revision)
            except ValueError:  # not a valid repository id: nothing of it can be cached
                return None
            if isinstance(hit, str):
                return hit
    return None


def offline_message(name: str, local_forms: str) -> str:
    """The one line of a load that needs files from the network when there is none."""
    return (f"could not fetch weights for {name}: no network and not in the Hugging Face cache; "
            f"pass a local checkpoint ({local_forms})")
