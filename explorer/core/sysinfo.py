"""Process facts for the status bar (stdlib only)."""

from __future__ import annotations

import os

__all__ = ["process_rss_bytes"]


def process_rss_bytes() -> int | None:
    """Resident memory of this process in bytes, or ``None`` when the platform does not say."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return rss if os.uname().sysname == "Darwin" else rss * 1024  # macOS reports bytes, Linux KiB
    except (ImportError, OSError, AttributeError):
        return None
