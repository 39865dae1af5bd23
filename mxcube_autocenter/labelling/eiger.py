"""Reading EIGER master and data files, one frame at a time.

An EIGER collection is a ``<prefix>_master.h5`` holding the metadata and
external links (``/entry/data/data_000001`` ...) to ``<prefix>_data_NNNNNN.h5``
files whose frames are bitshuffle-LZ4 compressed (other writers, such as
Jungfraujoch, give one ``/entry/data/data``, virtual over the data files, and
the start in ``/entry/start_time``). ``open_master`` reads the
metadata and checks that every data file is present, readable and decodable;
``EigerSeries.frame`` then reads one frame through the links (an EIGER2 16M
frame is 18 Mpixel: never load them all) with the mask of its valid pixels.
Anything wrong with a file raises ``EigerFileError``, whose message names the
file and the fix.
"""

from __future__ import annotations

import bisect
import logging
import re
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

from mxcube_autocenter.hdf5errors import DAMAGED_FILE_ERRORS, not_opened, open_to_read

try:
    import hdf5plugin  # noqa: F401  (registers the bitshuffle-LZ4 filter with HDF5)
except ImportError:
    # Reported by the filter check of open_master, with the fix.
    pass

log = logging.getLogger(__name__)

_REINSTALL = "install hdf5plugin in this Python environment (pip install hdf5plugin)"
_COPY_AGAIN = "copy it again from the detector's storage, or re-collect"
# NXdetector times carry their unit (NeXus NX_TIME); DECTRIS writes seconds, stream-based writers often ns.
_SECONDS_PER = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6,
    "microsecond": 1e-6, "microseconds": 1e-6, "ns": 1e-9, "nanosecond": 1e-9, "nanoseconds": 1e-9,
}  # fmt: skip
# NeXus lengths carry their unit too: DECTRIS writes metres (pixels for the beam centre), other NXmx writers mm.
_MM_PER = {
    "m": 1e3, "meter": 1e3, "metre": 1e3, "meters": 1e3, "metres": 1e3, "cm": 10.0, "mm": 1.0, "millimeter": 1.0,
    "millimetre": 1.0, "um": 1e-3, "\u00b5m": 1e-3, "micron": 1e-3, "microns": 1e-3, "nm": 1e-6,
}  # fmt: skip
_ANGSTROM_PER = {"angstrom": 1.0, "angstroms": 1.0, "a": 1.0, "\u00e5": 1.0, "nm": 10.0, "m": 1e10}
_PIXELS = ("pixel", "pixels", "px")


class EigerFileError(OSError):
    """An EIGER file is missing, truncated, corrupt or cannot be decoded; the message says which and what to do."""


def valid_pixels(frame: np.ndarray, pixel_mask: np.ndarray, count_cutoff: int) -> np.ndarray:
    """Pixels that hold a trustworthy count.

    Parameters
    ----------
    frame : ndarray of unsigned int, shape (H, W)
    pixel_mask : ndarray of uint32, shape (H, W)
        EIGER ``pixel_mask``: any bit set (gap, dead, hot, noisy) excludes the pixel.
    count_cutoff : int
        Counts at and above which a pixel is saturated. EIGER's "invalid"
        values (all bits set, 0xFFFF or 0xFFFFFFFF, and the one below) lie
        at or above any cutoff; in signed frames (data converted to int32)
        they read as negative counts, which are invalid too.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    valid = (pixel_mask == 0) & (frame < count_cutoff)
    if frame.dtype.kind == "i":
        valid &= frame >= 0
    return valid


def overloaded_pixels(frame: np.ndarray, pixel_mask: np.ndarray, count_cutoff: int) -> np.ndarray:
    """Saturated pixels of the detector's area: the cores of the strongest spots.

    Unlike a masked pixel, such a pixel did count: it counted more than it
    can tell. ``find_spots`` keeps it out of the background statistics (its
    count is not known) but in the spot it lies in.

    Parameters
    ----------
    frame, pixel_mask, count_cutoff
        As in :func:`valid_pixels`.

    Returns
    -------
    ndarray of bool, shape (H, W)
        Unmasked pixels at or above ``count_cutoff`` (EIGER's "invalid"
        values are set on masked pixels only).
    """
    return (pixel_mask == 0) & (frame >= count_cutoff)


class EigerSeries:
    """An open EIGER collection (use ``open_master``).

    Attributes
    ----------
    master_path : Path
    nimages : int
        Frames in the collection (``nimages * ntrigger``), or those its data
        files hold when an aborted collection left the last ones unwritten.
    declared_images : int
        Frames the master file declares (``nimages * ntrigger``).
    ntrigger : int
        Triggers of the collection, each of ``nimages / ntrigger`` frames.
    count_time, frame_time : float
        Exposure and period of each frame, s.
    start_time : float
        Collection start (``data_collection_date``), unix time (s). A date
        without a UTC offset is taken as this computer's local time.
    local_dates : bool
        Whether a date was so taken (``data_collection_date`` or the
        per-frame times' ``start``).
    ambiguous_local_s : float
        For such a date in the hour a daylight-saving change repeats (or
        skips), how much later its other reading is, s (3600 in the autumn
        hour); 0 elsewhere. It is taken at its first reading.
    frame_start_times, frame_stop_times : ndarray of float or None
        Per-frame start and end by the detector's clock (NXdetector
        ``start_time`` / ``stop_time``), unix time (s); None when the file has none.
    pixel_mask : ndarray of uint32, shape (height, width)
    count_cutoff : int
        Counts at and above which a pixel is saturated (or invalid).
    width, height : int
        Pixels.
    dtype : numpy.dtype
        Of the frames.
    beam_center_x, beam_center_y : float
        Pixels from the detector corner.
    pixel_size, distance : float
        mm.
    wavelength : float
        Angstrom.
    first_image_number : int
        Number of frame 0 in the data files (``image_nr_low``: 1, or the
        collection's start image number), for messages that name images.
    """

    def __init__(self, master_path: Path, file: h5py.File):
        self.master_path = master_path
        self._file = file
        detector = self._group("entry/instrument/detector")
        self._refuse_v2024_format(detector)
        specific = self._group("entry/instrument/detector/detectorSpecific")
        self.count_time = self._seconds(detector, "count_time")
        self.frame_time = self._seconds(detector, "frame_time")
        # In their units attributes' units; without one, as the FileWriter writes them (metres, pixels, angstrom).
        self.pixel_size = self._quantity(detector, "x_pixel_size", _MM_PER, "m")
        self.distance = self._quantity(detector, "detector_distance", _MM_PER, "m")
        self.wavelength = self._quantity(self._group("entry/instrument/beam"), "incident_wavelength", _ANGSTROM_PER,
                                       "angstrom")  # fmt: skip
        for field, value in (("x_pixel_size", self.pixel_size), ("detector_distance", self.distance),
                             ("incident_wavelength", self.wavelength)):
            if not (np.isfinite(value) and value > 0):
                # Spot finding converts pixels to resolution for its resolution and ice-ring filters.
                raise EigerFileError(
                    f"{self.master_path}: {field} is {value:g}, not a length: the collection did not record the "
                    "geometry; set it in the master file (metres; the wavelength in angstrom) before labelling")
        self.beam_center_x = self._beam_center(detector, "beam_center_x")
        self.beam_center_y = self._beam_center(detector, "beam_center_y")
        self.width = int(self._value(specific, "x_pixels_in_detector"))
        self.height = int(self._value(specific, "y_pixels_in_detector"))
        self.ntrigger = int(specific["ntrigger"][()]) if "ntrigger" in specific else 1
        self.nimages = int(self._value(specific, "nimages")) * self.ntrigger
        self.declared_images = self.nimages
        self.local_dates = False  # set by _unix_time on a date without a UTC offset
        self.ambiguous_local_s = 0.0  # so is this, on one in an hour a daylight-saving change repeats
        self.start_time = self._collection_start(specific)
        mask = self._dataset(specific, "pixel_mask")
        self._check_filters(mask, self.master_path)
        self.pixel_mask = np.asarray(mask[()], dtype=np.uint32)
        if self.pixel_mask.shape != (self.height, self.width):
            raise EigerFileError(
                f"{self.master_path}: pixel_mask is {self.pixel_mask.shape} where the detector is {self.height} x "
                f"{self.width} pixels: the master file is corrupt; {_COPY_AGAIN}"
            )
        self.first_image_number = 1  # set by _data_blocks from the data files' image_nr_low
        self._blocks = self._data_blocks()
        # After the data files: an aborted collection's per-frame times cover only the frames it took.
        self.frame_start_times = self._frame_times(detector, "start_time")
        self.frame_stop_times = self._frame_times(detector, "stop_time")
        self.dtype = self._blocks[0][1].dtype if self._blocks else np.dtype(np.uint32)
        invalid = np.iinfo(self.dtype).max
        # A cutoff of 0 or less is none written (every pixel would be saturated, every frame 0 spots).
        cutoffs = [float(group[name][()]) for group, name in ((specific, "countrate_correction_count_cutoff"),
                                                             (detector, "saturation_value")) if name in group]
        cutoff = next((c for c in cutoffs if c > 0), invalid)
        # EIGER flags gaps and bad pixels with the top two values (2^N - 1, 2^N - 2).
        self.count_cutoff = int(min(cutoff, invalid - 1))

    def _group(self, name: str) -> h5py.Group:
        if name not in self._file:
            raise EigerFileError(
                f"{self.master_path}: no /{name} group, so not an EIGER master file: "
                "give the <prefix>_master.h5 that the detector wrote"
            )
        return self._file[name]

    def _value(self, group: h5py.Group, name: str):
        return self._dataset(group, name)[()]

    def _dataset(self, group: h5py.Group, name: str) -> h5py.Dataset:
        if name not in group:
            raise EigerFileError(
                f"{self.master_path}: no {group.name}/{name}, so not a complete EIGER master file: "
                f"give the <prefix>_master.h5 that the detector wrote, or {_COPY_AGAIN}"
            )
        return group[name]

    def _refuse_v2024_format(self, detector: h5py.Group) -> None:
        """Refuse the FileWriter's "hdf5 nexus v2024.2 nxmx" layout, which this reader does not know."""
        data = self._file.get("entry/data/data")
        channels = [name for name in detector if name.endswith("_channel")]
        if channels or (isinstance(data, h5py.Dataset) and data.ndim == 4):
            raise EigerFileError(
                f"{self.master_path}: written in the DECTRIS FileWriter's \"hdf5 nexus v2024.2 nxmx\" format "
                "(multi-channel /entry/data/data, no detectorSpecific group), which cannot be read yet: set the "
                "FileWriter's format to \"hdf5 nexus legacy nxmx\" for the collections to label"
            )

    def _seconds(self, group: h5py.Group, name: str):
        """A time field in seconds, converted from its ``units`` attribute (seconds without one)."""
        return self._quantity(group, name, _SECONDS_PER, "s")

    def _quantity(self, group: h5py.Group, name: str, per_unit: dict, default: str):
        """A field in the unit of ``per_unit`` (value 1), converted from its ``units`` attribute (``default``
        without one): a float, or an array of them for an array field."""
        dataset = self._dataset(group, name)
        units = _text(dataset.attrs["units"]).strip() if "units" in dataset.attrs else default
        factor = per_unit.get(units, per_unit.get(units.lower()))
        if factor is None:
            raise EigerFileError(
                f"{self.master_path}: {dataset.name} is in {units!r}, not a unit this reader knows "
                f"({', '.join(per_unit)}): fix its units attribute"
            )
        value = np.asarray(dataset[()], dtype=np.float64) * factor
        return float(value) if value.ndim == 0 else value

    def _beam_center(self, detector: h5py.Group, name: str) -> float:
        """Beam centre in pixels: DECTRIS writes pixels, NXmx allows a length (converted with the pixel size)."""
        dataset = self._dataset(detector, name)
        units = _text(dataset.attrs["units"]).strip().lower() if "units" in dataset.attrs else "pixel"
        if units in _PIXELS:
            return float(dataset[()])
        return self._quantity(detector, name, _MM_PER, "m") / self.pixel_size

    def _unix_time(self, text: str, what: str) -> float:
        try:
            date = iso_date(text)
        except ValueError as err:
            raise EigerFileError(
                f"{self.master_path}: {what} {text!r} is not an ISO-8601 date ({err}): fix it in the file, e.g. "
                "2023-11-14T22:13:20.123+01:00"
            ) from err
        if date.tzinfo is None:
            self.local_dates = True
            self.ambiguous_local_s = max(self.ambiguous_local_s, date.replace(fold=1).timestamp() - date.timestamp())
        return date.timestamp()

    def _collection_start(self, specific: h5py.Group) -> float:
        """When the collection started: DECTRIS' ``data_collection_date``, else NXmx's ``/entry/start_time``.

        Writers other than DECTRIS' (Jungfraujoch) keep the DECTRIS layout
        but write the start in NXmx's field alone.
        """
        if "data_collection_date" in specific:
            return self._unix_time(_text(specific["data_collection_date"][()]), "data_collection_date")
        if isinstance(self._file.get("entry/start_time"), h5py.Dataset):
            return self._unix_time(_text(self._file["entry/start_time"][()]), "/entry/start_time")
        raise EigerFileError(
            f"{self.master_path}: neither {specific.name}/data_collection_date nor /entry/start_time, so no time the "
            f"collection started: give the <prefix>_master.h5 that the detector wrote, or {_COPY_AGAIN}"
        )

    def _frame_times(self, detector: h5py.Group, name: str) -> np.ndarray | None:
        """NXdetector per-frame times, made absolute with their ``start`` attribute."""
        if name not in detector:
            return None
        times = detector[name]
        reference = (
            self._unix_time(_text(times.attrs["start"]), f"{name}@start") if "start" in times.attrs else self.start_time
        )
        values = reference + np.asarray(self._seconds(detector, name), dtype=np.float64)
        if values.ndim != 1 or values.size < self.nimages:
            # Matching needs a time for every image: a short list would leave the last ones unlabelled unseen.
            raise EigerFileError(
                f"{self.master_path}: {name} holds {values.size} times for {self.nimages} images: the master file "
                f"is incomplete or corrupt; {_COPY_AGAIN}"
            )
        return values

    def _check_filters(self, dataset: h5py.Dataset, path: Path) -> None:
        plist = dataset.id.get_create_plist()
        for i in range(plist.get_nfilters()):
            code, _, _, name = plist.get_filter(i)
            if not h5py.h5z.filter_avail(code):
                raise EigerFileError(
                    f"{path}: {dataset.name} is compressed with HDF5 filter {code} "
                    f"({name.decode(errors='replace')}), which this Python cannot decode: {_REINSTALL}"
                )

    def _data_blocks(self) -> list:
        """(first image index, dataset, data file) of each linked data file, in image order.

        An aborted collection leaves its master file linking data files that
        were never written (and its last written file short): the frames
        before them, from image 1 on, are the collection (``nimages`` is
        lowered to them, with a warning). Any other missing frame is an error.
        """
        data = self._group("entry/data")
        blocks, missing = [], []
        names = sorted(key for key in data if key.startswith("data_"))
        if not names and isinstance(data.get("data"), h5py.Dataset):
            # Writers without DECTRIS' links (Jungfraujoch): one dataset of every frame, in the master file or
            # virtual over the data files.
            names = ["data"]
        for name in names:
            link = data.get(name, getlink=True)
            target = self._link_target(link.filename) if isinstance(link, h5py.ExternalLink) else self.master_path
            if not target.is_file():
                missing.append((name, target))
                continue
            if missing:
                self._missing(*missing[0])  # a gap before this file: not an aborted collection
            try:
                dataset = data[name]
            except DAMAGED_FILE_ERRORS as err:
                damaged = f"it is truncated or corrupt (an interrupted copy or collection?): {_COPY_AGAIN}"
                raise EigerFileError(f"{target}: cannot open this data file of {self.master_path}: "
                                     f"{not_opened(target, err, damaged)}") from err
            if dataset.is_virtual:
                self._check_sources(dataset, name)
            self._check_filters(dataset, target)
            self._check_frames(dataset, target, name)
            first = int(dataset.attrs.get("image_nr_low", sum(len(b[1]) for b in blocks) + 1)) - 1
            blocks.append((first, dataset, target))
        self._check_unnumbered(blocks)
        blocks.sort(key=lambda block: block[0])
        if blocks:
            # A collection may number its images from its start_image_number (the FileWriter's image_nr_start):
            # its first image is frame 0 here.
            start = blocks[0][0]
            self.first_image_number = start + 1
            blocks = [(first - start, dataset, target) for first, dataset, target in blocks]
        held = sum(len(dataset) for _, dataset, _ in blocks)
        firsts = [first for first, _, _ in blocks]
        one_run = firsts == [int(n) for n in np.cumsum([0] + [len(d) for _, d, _ in blocks])][:len(blocks)]
        if not one_run or held == 0 < self.nimages:
            if missing:
                self._missing(*missing[0])
            raise EigerFileError(
                f"{self.master_path}: declares {self.nimages} images but its data files hold {held}"
                + ("" if one_run else f", not one run of images (image_nr_low of each file: "
                                      f"{[first + start + 1 for first in firsts]})")
                + f": the collection is incomplete; {_COPY_AGAIN}"
            )
        if held < self.nimages:
            log.warning(
                "%s: declares %d images but its data files hold its first %d%s: an aborted collection? "
                "Only those are used", self.master_path, self.nimages, held,
                f" ({len(missing)} linked data files missing, first {missing[0][1].name})" if missing else "",
            )  # fmt: skip
            self.nimages = held
        return blocks

    def _check_unnumbered(self, blocks):
        """Refuse data files without ``image_nr_low`` whose images cannot be placed: a short one before the last.

        Without the attribute a file's images are taken to follow the previous file's, which holds only while
        every file but the last holds as many as the first (the FileWriter's nimages_per_file): after a
        short one, every later image would be labelled with another image's count.
        """
        if not blocks or all("image_nr_low" in dataset.attrs for _, dataset, _ in blocks):
            return
        per_file = len(blocks[0][1])
        for _, dataset, target in blocks[:-1]:
            if len(dataset) != per_file:
                raise EigerFileError(
                    f"{target}: holds {len(dataset)} images where {blocks[0][2].name} holds {per_file}, and the "
                    f"data files carry no image_nr_low to place the images after it: the collection is "
                    f"incomplete; {_COPY_AGAIN}"
                )

    def _link_target(self, filename: str) -> Path:
        """The data file an external link (or a virtual dataset's source) names, found as HDF5 finds it."""
        path = Path(filename)
        target = self.master_path.parent / path
        if path.is_absolute() and not target.is_file():
            # HDF5 also looks for an absolute link's file next to the master file: the data moved with it.
            beside = self.master_path.parent / path.name
            if beside.is_file():
                return beside
        return target

    def _check_sources(self, dataset: h5py.Dataset, name: str):
        """Refuse a virtual dataset with a source file missing, or holding no source dataset.

        HDF5 reads the frames of a missing source as the fill value: frames without a spot.
        """
        for source in dataset.virtual_sources():
            if source.file_name == ".":
                continue
            path = self._link_target(source.file_name)
            if not path.is_file():
                self._missing(name, path)
            try:
                with open_to_read(path) as data_file:
                    held = isinstance(data_file.get(source.dset_name), h5py.Dataset)
            except DAMAGED_FILE_ERRORS:
                held = False
            if not held:
                raise EigerFileError(
                    f"{path}: holds no readable {source.dset_name}, which {self.master_path}'s /entry/data/{name} "
                    f"reads its frames from: the collection is incomplete; {_COPY_AGAIN}"
                )

    def _missing(self, name: str, target: Path):
        raise EigerFileError(
            f"{target}: data file missing (linked from {self.master_path} as {name}): "
            f"put it next to the master file, or {_COPY_AGAIN}"
        )

    def _check_frames(self, dataset, target: Path, name: str):
        """A data block must hold frames of the declared size, in integer counts (as the pixel mask is)."""
        shape = dataset.shape
        if len(shape or ()) != 3 or tuple(shape[1:]) != (self.height, self.width) or dataset.dtype.kind not in "iu":
            raise EigerFileError(
                f"{target}: {name} holds {shape} {dataset.dtype} data where {self.master_path.name} declares frames "
                f"of {self.height} x {self.width} integer counts: is it this collection's data file? {_COPY_AGAIN}"
            )

    def frame(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one frame.

        Parameters
        ----------
        index : int
            0-based (EIGER numbers images from 1: this is image ``index + 1``).

        Returns
        -------
        frame : ndarray, shape (height, width)
            Raw counts.
        valid : ndarray of bool, shape (height, width)
            False on masked, gap and saturated pixels (``valid_pixels``).
        """
        if not 0 <= index < self.nimages:
            raise IndexError(f"image index {index} outside 0..{self.nimages - 1} of {self.master_path}")
        block = bisect.bisect_right([first for first, _, _ in self._blocks], index) - 1
        first, dataset, target = self._blocks[block]
        try:
            frame = dataset[index - first]
        except DAMAGED_FILE_ERRORS as err:
            raise EigerFileError(
                f"{target}: cannot read image {index + self.first_image_number} ({err}); the file is corrupt: "
                f"{_COPY_AGAIN}"
            ) from err
        return frame, valid_pixels(frame, self.pixel_mask, self.count_cutoff)

    def overloaded(self, frame: np.ndarray) -> np.ndarray:
        """The saturated pixels of one of its frames (:func:`overloaded_pixels`)."""
        return overloaded_pixels(frame, self.pixel_mask, self.count_cutoff)

    def frame_windows(self) -> np.ndarray:
        """Exposure window of each frame.

        From the per-frame ``start_time`` / ``stop_time`` when the file has
        them (the detector's clock), else ``start_time + i * frame_time`` with
        ``count_time`` of exposure.

        Returns
        -------
        ndarray of float, shape (nimages, 2)
            (start, end), unix time (s).
        """
        if self.frame_start_times is not None:
            start = self.frame_start_times[: self.nimages]
            stop = start + self.count_time if self.frame_stop_times is None else self.frame_stop_times[: self.nimages]
        else:
            if self.ntrigger > 1:
                # Each trigger starts when the beamline says so: the frames after the first are not evenly spaced.
                raise EigerFileError(
                    f"{self.master_path}: {self.ntrigger} triggers and no per-frame start_time: when the frames "
                    "after the first trigger were taken is unknown; label collections taken with one trigger, or "
                    "have the file writer store each frame's start_time")
            if not 0 < self.count_time <= self.frame_time < np.inf:
                # A frame cannot be exposed longer than its period: the windows would overlap the next frames'.
                raise EigerFileError(
                    f"{self.master_path}: count_time {self.count_time} s and frame_time {self.frame_time} s are no "
                    f"exposure and frame period (0 < count_time <= frame_time): the master file is corrupt; "
                    f"{_COPY_AGAIN}")  # fmt: skip
            start = self.start_time + np.arange(self.nimages) * self.frame_time
            stop = start + self.count_time
        windows = np.column_stack([start, stop])
        bad = np.flatnonzero(~(np.isfinite(windows).all(axis=1) & (windows[:, 1] > windows[:, 0])))
        if bad.size:
            raise EigerFileError(
                f"{self.master_path}: image {bad[0] + self.first_image_number} has no exposure window (start "
                f"{windows[bad[0], 0]}, end {windows[bad[0], 1]}; {bad.size} such images): its count_time or "
                f"per-frame times are not finite or end before they start; the master file is corrupt; {_COPY_AGAIN}"
            )
        return windows

    def close(self) -> None:
        # The data files opened through external links stay open while their datasets are referenced: each closed
        # once (a block in the master file itself closes with it).
        data_files = {target: dataset.file for _, dataset, target in self._blocks if target != self.master_path}
        self._blocks = []
        for data_file in data_files.values():
            if data_file.id.valid:
                data_file.close()
        self._file.close()

    def __enter__(self) -> EigerSeries:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A date and time as detectors write them: extended or basic ("20231114T221320"), "T" or a space, a fraction of
# any length, and "Z", "+01:00", "+0100" or "+01".
_ISO_DATE = re.compile(
    r"(?P<year>\d{4})-?(?P<month>\d{2})-?(?P<day>\d{2})[T ](?P<hour>\d{2}):?(?P<minute>\d{2}):?(?P<second>\d{2})"
    r"(?:[.,](?P<fraction>\d+))?(?:(?P<utc>[zZ])|(?P<sign>[+-])(?P<hours>\d{2}):?(?P<minutes>\d{2})?)?"
)


def iso_date(text: str) -> datetime:
    """An ISO-8601 date and time as a detector writes it: naive where it gives no UTC offset.

    Read alike by every Python the package supports (3.10's ``fromisoformat`` reads only 3 or 6 digits of a
    second and no ``Z``); a fraction beyond microseconds is cut, and blanks around the text are ignored. A date
    without the seconds of its time (a day alone, a week date) is refused: read, it would move the collection's
    start by up to a day.

    Raises
    ------
    ValueError
        If ``text`` is no such date.
    """
    match = _ISO_DATE.fullmatch(text.strip())
    if match is None:
        raise ValueError("expected YYYY-MM-DDThh:mm:ss, a fraction of a second and a UTC offset being optional")
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    offset = "+00:00" if match["utc"] else (
        f"{match['sign']}{match['hours']}:{match['minutes'] or '00'}" if match["sign"] else "")
    return datetime.fromisoformat(f"{match['year']}-{match['month']}-{match['day']}T{match['hour']}:"
                                  f"{match['minute']}:{match['second']}.{fraction}{offset}")


def _text(value) -> str:
    """HDF5 text as str: the FileWriter stores fixed-length bytes, h5py may give str."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else str(value)


def open_master(path) -> EigerSeries:
    """Open an EIGER collection by its master file.

    Parameters
    ----------
    path : path
        ``<prefix>_master.h5``; its data files must lie next to it.

    Returns
    -------
    EigerSeries
        Close it, or use it as a context manager.

    Raises
    ------
    EigerFileError
        If the master file or a data file is missing, truncated, corrupt, not
        EIGER's, or compressed with a filter this Python cannot decode.
    """
    path = Path(path)
    try:
        found = path.is_file()
    except PermissionError as err:
        raise EigerFileError(f"{path}: no permission to look into its folder: ask for access to it (beamline data is "
                             "often its user's own), or copy the collection") from err  # fmt: skip
    if not found:
        raise EigerFileError(f"{path}: no such EIGER master file: check the path (<prefix>_master.h5)")
    try:
        file = open_to_read(path)
    except OSError as err:
        raise EigerFileError(f"{path}: {not_opened(path, err, f'it is truncated or corrupt: {_COPY_AGAIN}')}") from err
    try:
        return EigerSeries(path, file)
    except BaseException as err:
        file.close()
        if isinstance(err, DAMAGED_FILE_ERRORS) and not isinstance(err, EigerFileError):
            raise EigerFileError(
                f"{path}: cannot read its metadata ({err}); the master file is truncated or corrupt: {_COPY_AGAIN}"
            ) from err
        raise
