"""Output files that are checked before the work and written whole or not at all.

Every file the program writes for the user (the CLI's ``--out`` and ``--json``, the window's
exports) goes through this module:

* :func:`check_output_path` / :func:`check_output_dir` check a destination *before* anything
  expensive runs (a model load, a forward pass): the folder exists (or can be created), is a folder
  and is writable, the name is not too long, the path is not a folder, the extension is one the
  command writes. A bad destination raises :class:`OutputError` with one line naming the path and
  the reason.
* :func:`atomic_write` (and :func:`write_bytes_atomic`, :func:`write_text_atomic`,
  :func:`save_image_atomic`) write to a temporary file in the destination's folder, flush and
  ``fsync`` it and move it onto the destination with ``os.replace``. On any failure (a full disk,
  a read-only folder, an exception while the content is produced) the temporary file is removed,
  folders created for the file are removed again, and an earlier file at the destination is left
  exactly as it was. Two writers of the same destination never mix their bytes: each has its own
  temporary file and the last complete file wins.

An existing destination that is not a regular file (``/dev/null``, a FIFO, ``/dev/stdout``) is
written in place: there is nothing to protect and a rename would replace the device node. A
symbolic link is followed: the file it points to is replaced, the link stays.

Failures of the operating system become :class:`OutputError`, which is both an ``OSError`` (for
code that handles I/O errors) and a ``ValueError`` (the program's error for bad input); its message
reads ``"cannot write '<path>': <reason>"``, e.g. ``"cannot write 'out/x.png': No space left on
device"``.

This module is standard library only (Pillow is imported by :func:`save_image_atomic` when used).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

__all__ = [
    "OutputError",
    "atomic_write",
    "check_output_dir",
    "check_output_path",
    "os_error_reason",
    "save_image_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]

_UMASK_LOCK = threading.Lock()


class OutputError(OSError, ValueError):
    """A destination cannot be written; the message is one line naming the path and the reason.

    Attributes
    ----------
    path : str
        The destination as given.
    reason : str
        Why, in words (``"No space left on device"``).
    errno : int or None
        The operating system's error number when there was one.
    """

    def __init__(self, path: str | os.PathLike, reason: str, err: int | None = None) -> None:
        super().__init__(f"cannot write '{_shown(path)}': {reason}")
        self.path = os.fspath(path)
        self.reason = reason
        self.errno = err


def _shown(path: str | os.PathLike, limit: int = 160) -> str:
    """The path for a message: whole, or its start and end around an ellipsis when very long."""
    text = os.fspath(path)
    text = os.fsdecode(text) if isinstance(text, bytes) else text
    return text if len(text) <= limit else text[: limit // 2 - 1] + "…" + text[-(limit // 2):]


def os_error_reason(exc: OSError) -> str:
    """One short reason for an ``OSError``, in the operating system's words (``"No space left
    on device"``, ``"Read-only file system"``), without the errno number or a traceback."""
    if isinstance(exc, OutputError):
        return exc.reason
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else "") or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _error(path: str | os.PathLike, exc: OSError) -> OutputError:
    if isinstance(exc, OutputError):
        return exc
    return OutputError(path, os_error_reason(exc), exc.errno)


def _suffix_text(suffixes: Iterable[str]) -> str:
    items = list(suffixes)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _nearest_existing(folder: Path) -> tuple[Path, list[Path]]:
    """The nearest folder of ``folder``'s ancestry (itself included) that exists, and the missing
    ones below it (top down)."""
    missing: list[Path] = []
    here = folder
    while not here.exists() and not here.is_symlink():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    return here, missing[::-1]


def _check_folder(path: str | os.PathLike, folder: Path, create_parents: bool) -> Path:
    """Check that files can be made in ``folder`` (created when missing and ``create_parents``);
    returns the nearest existing folder."""
    base, missing = _nearest_existing(folder)
    if not base.is_dir():
        what = "does not exist" if not base.exists() else "is a file, not a folder"
        raise OutputError(path, f"'{base}' {what}", errno.ENOTDIR)
    if missing and not create_parents:
        raise OutputError(path, f"the folder '{folder}' does not exist", errno.ENOENT)
    if not os.access(base, os.W_OK | os.X_OK):
        reason = os.strerror(errno.EROFS) if _read_only(base) else os.strerror(errno.EACCES)
        raise OutputError(path, f"the folder '{base}' is not writable ({reason})", errno.EACCES)
    # access() says yes to root and ignores some mounts: make (and remove) an empty file to be sure
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=base)
    except OSError as exc:
        raise OutputError(path, f"the folder '{base}' is not writable ({os_error_reason(exc)})", exc.errno) from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return base


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
    except (OSError, AttributeError):
        return False


def _check_text(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise OutputError(path, "no file name given")
    if "\0" in text:
        raise OutputError(path, "the path contains a NUL character")
    return text


def check_output_path(path: str | os.PathLike, allowed_suffixes: Iterable[str] | None = None, *,
                      create_parents: bool = True) -> Path:
    """Check that a file can be written at ``path``, before any work is done; returns it as a ``Path``.

    Parameters
    ----------
    path
        The destination file.
    allowed_suffixes
        Extensions the caller writes (``(".png", ".npz")``, compared case-insensitively), or
        ``None`` for any.
    create_parents
        Whether missing folders will be created by the write (then the nearest existing folder
        must be writable); when ``False`` a missing folder is refused.

    Raises
    ------
    OutputError
        (a ``ValueError``) with one line: the folder does not exist or is a file, the folder is not
        writable, the path is a folder, the name is too long, or the extension is not allowed.
    """
    text = _check_text(path)
    try:
        return _check_file(path, text, allowed_suffixes, create_parents)
    except OSError as exc:  # a stat that failed (a name too long, a loop of links): one line
        raise _error(path, exc) from None


def _check_file(path: str | os.PathLike, text: str, allowed_suffixes: Iterable[str] | None,
                create_parents: bool) -> Path:
    p = Path(text)
    if text.endswith(("/", os.sep)) or p.name in ("", ".", ".."):
        raise OutputError(path, "it names a folder, not a file", errno.EISDIR)
    if p.is_dir():
        raise OutputError(path, "it is a folder", errno.EISDIR)
    if allowed_suffixes is not None:
        allowed = tuple(s.lower() for s in allowed_suffixes)
        if p.suffix.lower() not in allowed:
            raise OutputError(path, f"unknown extension {p.suffix or '(none)'}: use {_suffix_text(allowed)}")
    folder = Path(os.path.abspath(p.parent))
    base = _check_folder(path, folder, create_parents)
    limit = _name_max(base)
    if len(os.fsencode(p.name)) > limit:
        raise OutputError(path, f"the file name is too long ({len(os.fsencode(p.name))} bytes; the limit is {limit})",
                          errno.ENAMETOOLONG)
    return p


def check_output_dir(path: str | os.PathLike, *, create: bool = True) -> Path:
    """Check that files can be written into the folder ``path`` (created by the command when
    missing and ``create``); returns it as a ``Path``. Raises :class:`OutputError` (one line)."""
    text = _check_text(path)
    try:
        return _check_dir(path, text, create)
    except OSError as exc:
        raise _error(path, exc) from None


def _check_dir(path: str | os.PathLike, text: str, create: bool) -> Path:
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise OutputError(path, "it is a file, not a folder", errno.ENOTDIR)
    folder = Path(os.path.abspath(p))
    limit = _name_max(_nearest_existing(folder)[0])
    for part in folder.parts:
        if len(os.fsencode(part)) > limit:
            raise OutputError(path, f"a folder name is too long ({len(os.fsencode(part))} bytes; the limit is {limit})",
                              errno.ENAMETOOLONG)
    _check_folder(path, folder, create)
    return p


def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders created (top down)."""
    _, missing = _nearest_existing(folder)
    created = []
    try:
        for d in missing:
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue
            created.append(d)
    except OSError:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:  # not empty: another writer uses it
            break


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    # short whatever the name's length, so the temporary name is never longer than the real one allows
    stem = name[:24].replace(os.sep, "_")
    return f".{stem}."


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 newline: str | None = None, create_parents: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding`` defaults to UTF-8). The file object is
    flushed and ``fsync``-ed, given the destination's permissions (an earlier file's, or the
    umask's for a new file) and moved onto ``path`` with ``os.replace``. If the ``with`` body
    raises, or any step fails, the temporary file is deleted and an earlier file at ``path`` is
    untouched; an ``OSError`` becomes :class:`OutputError` (one line naming ``path``), any other
    exception propagates unchanged. Missing folders are created when ``create_parents`` (and
    removed again on failure).
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_write writes whole files: mode 'wb' or 'w', not {mode!r}")
    text = _check_text(path)
    binary = "b" in mode
    enc = None if binary else (encoding or "utf-8")
    target = Path(text)
    try:
        if target.is_symlink():
            target = Path(os.path.realpath(target))
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _error(path, exc) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(path, "it is a folder", errno.EISDIR)
    if st is not None and not stat.S_ISREG(st.st_mode):
        # a device, FIFO or terminal: written in place
        try:
            fh = open(target, mode, encoding=enc, newline=None if binary else newline)
        except OSError as exc:
            raise _error(path, exc) from None
        try:
            with fh:
                yield fh
        except OSError as exc:
            raise _error(path, exc) from None
        return
    folder = Path(os.path.abspath(target.parent))
    created: list[Path] = []
    try:
        if create_parents:
            created = _make_folders(folder)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=folder)
    except OSError as exc:
        _remove_folders(created)
        raise _error(path, exc) from None
    done = False
    try:
        with os.fdopen(fd, mode, encoding=enc, newline=None if binary else newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
        done = True
    except OSError as exc:
        raise _error(path, exc) from None
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            _remove_folders(created)
    _fsync_folder(folder)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, create_parents: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns ``Path(path)``."""
    with atomic_write(path, "wb", create_parents=create_parents) as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      create_parents: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); returns ``Path(path)``."""
    with atomic_write(path, "w", encoding=encoding, create_parents=create_parents) as fh:
        fh.write(text)
    return Path(path)


def save_image_atomic(path: str | os.PathLike, image: Any, format: str | None = None, *,
                      create_parents: bool = True, **params: Any) -> Path:
    """Save a Pillow image, or an ``(H, W)`` / ``(H, W, 3|4)`` ``uint8`` array, to ``path``
    atomically (see :func:`atomic_write`). ``format`` defaults to the one Pillow registers for
    the extension (PNG when unknown); ``params`` go to ``Image.save``."""
    from PIL import Image

    if format is None:
        format = Image.registered_extensions().get(Path(os.fspath(path)).suffix.lower(), "PNG")
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with atomic_write(path, "wb", create_parents=create_parents) as fh:
        img.save(fh, format=format, **params)
    return Path(path)
