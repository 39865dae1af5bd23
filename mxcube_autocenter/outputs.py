"""Output folders and files of the commands.

Folders are made, or refused naming the path, what is in the way and the
fix: ``os.makedirs`` under a file says only ``[Errno 17] File exists: 'a'``
or ``[Errno 20] Not a directory: 'a/b'``: neither names the option nor says
that a file stands where a folder is needed. Files are written whole or not
at all (:func:`write_whole`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def json_default(value):
    """``json.dumps(..., default=json_default)``: numpy numbers and arrays as lists and numbers, paths as text."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{value!r} ({type(value).__name__}) cannot be stored as JSON")


def write_whole(path, write, partial=None) -> None:
    """``write(partial)``, then rename ``partial`` (default ``<path>.part``) to ``path``.

    ``path`` is then whole, or as it was before: a write cut short (a full
    disk, an error, an interrupt) leaves nothing behind.
    """
    partial = os.fspath(partial or f"{os.fspath(path)}.part")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_json_whole(path, value, indent: int = 2) -> None:
    """``value`` as indented JSON at ``path`` (numpy values and paths too), written whole or not at all."""

    def dump(partial):
        with open(partial, "w") as f:
            json.dump(value, f, indent=indent, default=json_default)

    write_whole(path, dump)


def write_text_whole(path, text: str) -> None:
    """``text`` at ``path``, written whole or not at all."""
    write_whole(path, lambda partial: Path(partial).write_text(text))


def save_figure_whole(figure, path, **savefig) -> None:
    """``figure.savefig`` to ``path`` (PNG unless ``format`` says otherwise), written whole or not at all.

    A figure rewritten in place and cut short (a full disk) would leave the
    report beside it linking to a broken image.
    """
    savefig.setdefault("format", "png")  # the partial file's name says no format
    write_whole(path, lambda partial: figure.savefig(partial, **savefig))


def first_missing(path) -> Path | None:
    """The outermost of ``path`` and the folders above it that do not exist yet: what making it would create."""
    path, missing = Path(path).absolute(), None
    while not path.exists() and path != path.parent:
        path, missing = path.parent, path
    return missing


def remove_empty(path, up_to) -> None:
    """Remove ``path`` and the folders above it, up to ``up_to`` included, as long as each is empty."""
    path, up_to = Path(path).absolute(), Path(up_to).absolute()
    while path.is_relative_to(up_to):
        try:
            path.rmdir()
        except OSError:  # not empty: something else was written there meanwhile
            return
        path = path.parent


def make_directory(path, option: str = "--out") -> Path:
    """Create a folder for a command's output (and its parents) if missing.

    Parameters
    ----------
    path : path
    option : str
        How the user gave it (``--out``, ``--png``), for the message.

    Returns
    -------
    Path

    Raises
    ------
    OSError
        If it cannot be created (a file in the way, no permission, a full
        disk), naming the path, the reason and ``option``.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the folder {path} ({_reason(path, err)}): choose another {option}") from err
    return path


def check_creatable(path, option: str = "--out", *, folder: bool = False) -> None:
    """Raise OSError if ``path``, a file or folder still to be written, cannot be made there.

    Nothing is created: for commands that write only once their work is done,
    and must not leave an empty folder behind when they are refused.

    Parameters
    ----------
    path : path
    option : str
        How the user gave it, for the message.
    folder : bool
        ``path`` is to be a folder: an existing file of that name is refused too.

    Raises
    ------
    OSError
        If a file stands where ``path`` or a folder above it should be
        (permissions and space are the writer's to report).
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OSError(f"cannot create the folder {path}: it is a file: choose another {option}")
    blocking = _file_in_the_way(path)
    if blocking is not None:
        raise OSError(f"cannot create {path}: {blocking} is a file, not a folder: choose another {option}")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of ``path``'s parents that exists but is not a folder, or None."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _reason(path: Path, err: OSError) -> str:
    if path.exists() and not path.is_dir():
        return "it is a file, not a folder"
    blocking = _file_in_the_way(path)
    if blocking is not None:
        return f"{blocking} is a file, not a folder"
    return err.strerror or str(err)
