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
