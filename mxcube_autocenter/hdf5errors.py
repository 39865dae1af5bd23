"""Errors of damaged HDF5 files, turned into the reader's own error that names the file and the fix.

h5py does not raise one exception type for a damaged file: overwriting a few
bytes of recordings, training sets and EIGER files at random gave
``OSError`` (a chunk or an attribute that no longer reads), ``KeyError`` (an
object header that no longer parses), ``RuntimeError`` (a group's B-tree,
local heap or symbol table), ``TypeError`` (a dataspace or a link name that
no longer decodes as what it was) and ``ValueError``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

import h5py

DAMAGED_FILE_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


@contextlib.contextmanager
def reading(path, what: str, error: type[Exception], fix: str):
    """Raise ``error`` naming ``path`` for what h5py raises on a damaged file while the block reads it.

    Everything the block raises of :data:`DAMAGED_FILE_ERRORS` counts as
    damage: open the file before the block when a missing file must be
    told apart.

    Parameters
    ----------
    path : path
        The file read.
    what : str
        What it is, for the message ("camera recording", "training set").
    error : exception class
        The reader's own error; raised as it is when the block raises it.
    fix : str
        What to do about it.
    """
    try:
        yield
    except error:
        raise
    except DAMAGED_FILE_ERRORS as err:
        raise error(f"{path}: cannot read this {what} ({type(err).__name__}: {err}): the file is damaged; {fix}") from err


def not_opened(path, err: OSError, damaged: str = "") -> str:
    """Why h5py could not open ``path``, briefly: what the path is instead where it is recognisable.

    h5py's own message holds HDF5's whole error record (the time, the buffer
    address, the bytes read): for a folder, another kind of file or a file
    this user may not read, that is what the user needs. ``damaged``: what to
    add where none of these is the reason and the file itself must be damaged.
    """
    path = Path(path)
    if path.is_dir():
        return "a folder, not a file: give a file in it"
    if path.exists() and not os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
        return "no permission to read it: ask for read access (beamline data is often its user's own), or copy it"
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return f"{kind}, not an HDF5 file"
    said = re.search(r"error message = '([^']*)'", str(err)) or re.search(r"\(([^()]*)\)\s*$", str(err))
    reason = f"not a readable HDF5 file ({said.group(1) if said else str(err).splitlines()[0]})"
    return f"{reason}; {damaged}" if damaged else reason


def system_error(path, err: Exception) -> OSError | None:
    """The system's error behind what h5py raised writing ``path`` (an ``OSError`` naming it), or None.

    HDF5 reports a failed write with the system's errno in its message only,
    and h5py raises it as ``RuntimeError`` where it happens while the file
    is flushed or closed ("errno = 28, error message = 'No space left on
    device'"): a full disk would read like a fault of the program.
    """
    found = re.search(r"errno = (\d+)", str(err))
    if found is None or not isinstance(err, (OSError, RuntimeError)):
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number), os.fspath(path))


# The files a user may give in an HDF5 file's place.
_SIGNATURES = (
    (b"PK", "a zip archive (a .keras model file?)"),
    (b"\xff\xd8", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
)


def open_to_read(path) -> h5py.File:
    """``h5py.File(path, "r")``, without HDF5's file lock where the file system has none (:func:`open_hdf5`)."""
    return open_hdf5(path, "r")


def open_hdf5(path, mode: str) -> h5py.File:
    """``h5py.File(path, mode)``, without HDF5's file lock where the file system has none.

    Beamline data and home directories often sit on NFS without ``lockd``,
    where the lock fails (errno 37) and h5py's error reads like a damaged
    file. The lock is kept where it works: HDF5 refuses to open a file twice
    in one process with different locking flags, so a file this process
    already holds open without the lock opens without it again. Without the
    lock, nothing keeps a second writer out: the file system offers no way to.
    """
    try:
        return h5py.File(path, mode)
    except OSError as err:
        # Only a file system without locks (ENOLCK, ENOSYS); a lock another process holds (EAGAIN: it is
        # writing the file, e.g. `label --out` appending) keeps this one out, as it should.
        found = re.search(r"unable to lock file, errno = (\d+)", str(err))
        opened_unlocked_here = "file locking flag values don't match" in str(err)
        if not opened_unlocked_here and (found is None or int(found.group(1)) not in (errno.ENOLCK, errno.ENOSYS)):
            raise
        return h5py.File(path, mode, locking=False)
