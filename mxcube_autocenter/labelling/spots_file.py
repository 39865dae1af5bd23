"""Reflection counts per detector image from other spot finders' output.

Instead of running our spot finder on the EIGER frames, the labels can come
from a file of per-image spot counts, exported from DIALS
(``dials.find_spots`` + ``dials.spot_counts_per_image``), dozor, distl or a
processing pipeline. Three forms are read, chosen by the content:

* CSV (comma, semicolon or tab separated, or blank-separated columns) with a
  header row;
* JSON: a list of objects (one per image), an object of equal-length column
  lists (``dials.spot_counts_per_image json=...``, ``pandas.DataFrame.to_json(orient="list")``;
  without an image column, as DIALS writes it, the lists run from image 1),
  or an object mapping image numbers to counts (``{"1": 53, "2": 40}``);
* the text table DIALS prints (``| image | #spots | #spots_no_ice | ...``).

Columns (case-insensitive; the first present is used):

* image number, as the detector numbered the collection's images (from
  its first image number) or counted from 1 (as DIALS counts them):
  ``image``, ``image_number``, ``image_nr``;
* reflection count: ``n_spots_no_ice``, ``#spots_no_ice``, ``spots``,
  ``n_spots``, ``n_spots_total``, ``#spots``, ``reflections``,
  ``n_reflections``: DIALS' count off the ice rings comes first, as our
  spot finder labels (``pipeline.DEFAULT_SPOT_FINDER``);
* optional master file, for a file covering several collections:
  ``master_file`` (compared by file name with a recording's master file).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "image_number", "image_nr")
SPOTS_COLUMNS = (
    "n_spots_no_ice", "#spots_no_ice", "spots", "n_spots", "n_spots_total", "#spots", "reflections", "n_reflections",
)  # fmt: skip
MASTER_COLUMN = "master_file"

_EXPECTED = (
    f"expected an image column ({', '.join(IMAGE_COLUMNS)}: image numbers) and a "
    f"count column ({', '.join(SPOTS_COLUMNS)}), optionally {MASTER_COLUMN}"
)


class SpotsFileError(ValueError):
    """A spot-count file cannot be read or does not fit the collection; the message names the file and the fix."""


@dataclass(frozen=True)
class SpotCounts:
    """Per-image reflection counts read by ``read_spot_counts``.

    Attributes
    ----------
    path : Path
    images : ndarray of int64, shape (n,)
        Image numbers as the file gives them.
    counts : ndarray of float, shape (n,)
        Reflection count of each image.
    master_files : tuple of str or None
        File name of each row's master file; None when the file has no
        ``master_file`` column (all rows belong to one collection).
    column : str
        The count column used.
    """

    path: Path
    images: np.ndarray
    counts: np.ndarray
    master_files: tuple | None
    column: str

    def for_collection(self, nimages: int, master_file=None, first_image: int = 1) -> np.ndarray:
        """Counts of one collection's detector frames.

        Parameters
        ----------
        nimages : int
            Detector frames in the collection.
        master_file : path, optional
            The collection's master file; selects the rows of that file name
            when the spot-count file has a ``master_file`` column.
        first_image : int
            The detector's number of the collection's first image (its data
            files' ``image_nr_low``). The file's image numbers are read as the
            detector's where they all fit ``first_image`` to ``first_image +
            nimages - 1``, else as counted from 1 (DIALS numbers the images of
            any collection from 1).

        Returns
        -------
        ndarray of float, shape (nimages,)
            Index ``i`` is detector frame ``i``; NaN for images the file does
            not list.

        Raises
        ------
        SpotsFileError
            If no row belongs to the collection, an image is listed twice or
            lies beyond the collection in both numberings.
        """
        rows = np.ones(self.images.size, bool)
        if self.master_files is not None:
            if master_file is None:
                raise SpotsFileError(f"{self.path}: has a {MASTER_COLUMN} column: give the collection's master file")
            name = Path(master_file).name
            rows = np.array([Path(m).name == name for m in self.master_files], bool)
            if not rows.any():
                raise SpotsFileError(
                    f"{self.path}: no row with {MASTER_COLUMN} {name}: add this collection's counts, "
                    "or label it with the spot finder"
                )
        images = self.images[rows]
        unique, seen = np.unique(images, return_counts=True)
        if np.any(seen > 1):
            raise SpotsFileError(f"{self.path}: image {unique[seen > 1][0]} is listed more than once: keep one row")
        fits = [start for start in dict.fromkeys((first_image, 1))
                if images.size == 0 or (images.min() >= start and images.max() < start + nimages)]  # fmt: skip
        first = fits[0] if fits else None
        if len(fits) > 1:
            # Both read: the detector's numbering is the likelier, but a file counted from 1 that lists only
            # later images would be shifted; said, so that a wrong guess can be seen.
            log.warning("%s: its image numbers %d to %d fit the collection numbered from %d (the detector's) and "
                        "from 1: read as the detector's", self.path, images.min(), images.max(), first_image)
        if first is None:
            numbered = f"numbered from 1, or from {first_image} as the detector numbered them" if first_image != 1 else (
                "numbered from 1")
            raise SpotsFileError(
                f"{self.path}: image numbers {images.min()} to {images.max()} do not fit a collection of "
                f"{nimages} images ({numbered}): is it the file of this collection?"
            )
        counts = np.full(nimages, np.nan)
        counts[images - first] = self.counts[rows]
        return counts


def read_spot_counts(path) -> SpotCounts:
    """Read per-image reflection counts from a CSV, JSON or DIALS table file.

    Parameters
    ----------
    path : path
        The file (see the module description for the forms and columns).

    Returns
    -------
    SpotCounts

    Raises
    ------
    SpotsFileError
        If the file is missing, unreadable, of no known form, lacks the
        columns, or holds a value that is not a number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise SpotsFileError(f"{path}: cannot read this spot-count file ({err}): check the path") from err
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        columns = _json_columns(path, text)
    elif any(line.lstrip().startswith("|") for line in text.splitlines()):
        columns = _dials_table_columns(path, text)
    else:
        columns = _csv_columns(path, text)
    return _spot_counts(path, columns)


def _json_columns(path: Path, text: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise SpotsFileError(f"{path}: not valid JSON ({err}): fix the file") from err
    if isinstance(data, list):
        if not all(isinstance(row, dict) for row in data):
            raise SpotsFileError(f"{path}: a JSON list must hold one object per image; {_EXPECTED}")
        keys = {key for row in data for key in row}
        return {key: [row.get(key) for row in data] for key in keys}
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        names = {str(key).strip().lower(): key for key in data}
        spots = next((names[name] for name in SPOTS_COLUMNS if name in names), None)
        if spots is not None and not any(name in names for name in IMAGE_COLUMNS):
            # dials.spot_counts_per_image json= writes one list per statistic, in image order from
            # image 1, and no image list: number the images as DIALS' table does.
            return {"image": list(range(1, len(data[spots]) + 1)), **data}
        return data
    if isinstance(data, dict) and all(isinstance(v, (int, float)) for v in data.values()):
        return {"image": list(data), "spots": list(data.values())}
    raise SpotsFileError(
        f"{path}: JSON of unknown form: give a list of objects, an object of column lists, "
        f'or an object of image number to count ({{"1": 53}}); {_EXPECTED}'
    )


def _dials_table_columns(path: Path, text: str) -> dict:
    """Columns of the ``| image | #spots | ...`` table that DIALS prints.

    ``dials.spot_counts_per_image`` follows it with a table of overall statistics, of other columns: a table
    of another header, after text, ends the counts.
    """
    header, rows, between_tables = None, [], False
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line.startswith(("|", "+")):
            between_tables = between_tables or bool(line)
            continue
        # Rules are "|---+---|" or "+---+---+"; the header row repeats for each imageset.
        if set(line) <= set("|-+ "):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif between_tables and cells != header:
            break  # another table's header
        elif len(cells) != len(header):
            # As in a CSV file: dropping the row would leave its image without a count and nobody told.
            raise SpotsFileError(
                f"{path}: line {number} has {len(cells)} cells where the table header {header} names "
                f"{len(header)}: fix the file (a truncated or hand-edited table?)"
            )
        elif cells != header:
            rows.append(cells)
        between_tables = False
    header = header or []
    return {name: [row[k] for row in rows] for k, name in enumerate(header)}


def _csv_columns(path: Path, text: str) -> dict:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return {}
    # numpy.savetxt writes the header as "# image,spots"; later "#" lines are comments.
    lines = [lines[0].lstrip("# ")] + [line for line in lines[1:] if not line.startswith("#")]
    delimiters = [d for d in (",", ";", "\t") if d in lines[0]]
    if delimiters:
        reader = csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiters[0])
        table = [[cell.strip() for cell in row] for row in reader]
    else:
        table = [line.split() for line in lines]
    header, rows = table[0], table[1:]
    for k, row in enumerate(rows):
        if len(row) != len(header):
            # A short row is a truncated export: silently dropping it would leave that image without a count.
            raise SpotsFileError(
                f"{path}: data row {k + 1} has {len(row)} values where the header {header} names {len(header)}: "
                "fix the file (a truncated export?)"
            )
    return {name: [row[k] for row in rows] for k, name in enumerate(header)}


def _spot_counts(path: Path, columns: dict) -> SpotCounts:
    by_name = {str(name).strip().lower(): values for name, values in columns.items()}
    image_column = next((name for name in IMAGE_COLUMNS if name in by_name), None)
    spots_column = next((name for name in SPOTS_COLUMNS if name in by_name), None)
    if image_column is None or spots_column is None:
        found = ", ".join(map(str, columns)) or "none"
        raise SpotsFileError(f"{path}: columns found: {found}; {_EXPECTED}")
    images = _numbers(path, image_column, by_name[image_column])
    if images.size == 0:
        raise SpotsFileError(f"{path}: no rows of counts; {_EXPECTED}")
    if np.any(images != np.round(images)):
        raise SpotsFileError(
            f"{path}: column {image_column} holds non-integer image numbers: give whole image numbers"
        )
    master = by_name.get(MASTER_COLUMN)
    counts = _numbers(path, spots_column, by_name[spots_column])
    lengths = {image_column: images.size, spots_column: counts.size}
    if master is not None:
        lengths[MASTER_COLUMN] = len(master)
    if len(set(lengths.values())) > 1:
        found = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise SpotsFileError(f"{path}: columns of different lengths ({found} values): give one value per image in each")
    return SpotCounts(
        path=path,
        images=images.astype(np.int64),
        counts=counts,
        master_files=None if master is None else tuple(str(m) for m in master),
        column=spots_column,
    )


def _numbers(path: Path, column: str, values) -> np.ndarray:
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SpotsFileError(
            f"{path}: column {column} holds a value that is not a number ({err}): fix the file"
        ) from err
    if not np.all(np.isfinite(numbers)):
        raise SpotsFileError(f"{path}: column {column} holds a missing or infinite value: fix the file")
    if np.any(numbers < 0):
        # Some pipelines write -1 for "not processed"; a count below zero would only be refused later, by training.
        row = int(np.argmax(numbers < 0))
        raise SpotsFileError(
            f"{path}: column {column} holds a negative value ({numbers[row]:g}, data row {row + 1}): "
            "give counts >= 0 and leave out images that were not processed"
        )
    return numbers
