"""Reading EIGER master and data files, one frame at a time.

An EIGER collection is a ``<prefix>_master.h5`` holding the metadata and
external links (``/entry/data/data_000001`` ...) to ``<prefix>_data_NNNNNN.h5``
files whose frames are bitshuffle-LZ4 compressed. ``open_master`` reads the
metadata and checks that every data file is present, readable and decodable;
``EigerSeries.frame`` then reads one frame through the links (an EIGER2 16M
frame is 18 Mpixel: never load them all) with the mask of its valid pixels.
Anything wrong with a file raises ``EigerFileError``, whose message names the
file and the fix.
"""

from __future__ import annotations

import bisect
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

try:
    import hdf5plugin  # noqa: F401  (registers the bitshuffle-LZ4 filter with HDF5)
except ImportError:
    # Reported by the filter check of open_master, with the fix.
    pass

_REINSTALL = "install hdf5plugin in this Python environment (pip install hdf5plugin)"
_COPY_AGAIN = "copy it again from the detector's storage, or re-collect"


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
        value (all bits set, 0xFFFF or 0xFFFFFFFF) lies above any cutoff.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    return (pixel_mask == 0) & (frame < count_cutoff)


class EigerSeries:
    """An open EIGER collection (use ``open_master``).

    Attributes
    ----------
    master_path : Path
    nimages : int
        Frames in the collection (``nimages * ntrigger``).
    count_time, frame_time : float
        Exposure and period of each frame, s.
    start_time : float
        Collection start (``data_collection_date``), unix time (s). A date
        without a UTC offset is taken as this computer's local time.
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
    """

    def __init__(self, master_path: Path, file: h5py.File):
        self.master_path = master_path
        self._file = file
        detector = self._group("entry/instrument/detector")
        specific = self._group("entry/instrument/detector/detectorSpecific")
        self.count_time = float(self._value(detector, "count_time"))
        self.frame_time = float(self._value(detector, "frame_time"))
        self.beam_center_x = float(self._value(detector, "beam_center_x"))
        self.beam_center_y = float(self._value(detector, "beam_center_y"))
        # The FileWriter stores lengths in metres.
        self.pixel_size = 1e3 * float(self._value(detector, "x_pixel_size"))
        self.distance = 1e3 * float(self._value(detector, "detector_distance"))
        self.wavelength = float(self._value(self._group("entry/instrument/beam"), "incident_wavelength"))
        self.width = int(self._value(specific, "x_pixels_in_detector"))
        self.height = int(self._value(specific, "y_pixels_in_detector"))
        ntrigger = int(specific["ntrigger"][()]) if "ntrigger" in specific else 1
        self.nimages = int(self._value(specific, "nimages")) * ntrigger
        self.start_time = self._unix_time(_text(self._value(specific, "data_collection_date")), "data_collection_date")
        self.frame_start_times = self._frame_times(detector, "start_time")
        self.frame_stop_times = self._frame_times(detector, "stop_time")
        mask = self._dataset(specific, "pixel_mask")
        self._check_filters(mask, self.master_path)
        self.pixel_mask = np.asarray(mask[()], dtype=np.uint32)
        if self.pixel_mask.shape != (self.height, self.width):
            raise EigerFileError(
                f"{self.master_path}: pixel_mask is {self.pixel_mask.shape} where the detector is {self.height} x "
                f"{self.width} pixels: the master file is corrupt; {_COPY_AGAIN}"
            )
        self._blocks = self._data_blocks()
        self.dtype = self._blocks[0][1].dtype if self._blocks else np.dtype(np.uint32)
        invalid = np.iinfo(self.dtype).max
        if "countrate_correction_count_cutoff" in specific:
            cutoff = specific["countrate_correction_count_cutoff"][()]
        else:
            cutoff = detector["saturation_value"][()] if "saturation_value" in detector else invalid
        self.count_cutoff = int(min(cutoff, invalid))

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

    def _unix_time(self, text: str, what: str) -> float:
        try:
            # Python 3.10 does not read the "Z" suffix of UTC.
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError as err:
            raise EigerFileError(
                f"{self.master_path}: {what} {text!r} is not an ISO-8601 date ({err}); fix or re-collect"
            ) from err

    def _frame_times(self, detector: h5py.Group, name: str) -> np.ndarray | None:
        """NXdetector per-frame times, made absolute with their ``start`` attribute."""
        if name not in detector:
            return None
        times = detector[name]
        reference = (
            self._unix_time(_text(times.attrs["start"]), f"{name}@start") if "start" in times.attrs else self.start_time
        )
        values = reference + np.asarray(times[()], dtype=np.float64)
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
        """(first image index, dataset, data file) of each linked data file, in image order."""
        data = self._group("entry/data")
        blocks = []
        for name in sorted(key for key in data if key.startswith("data_")):
            link = data.get(name, getlink=True)
            external = isinstance(link, h5py.ExternalLink)
            target = self.master_path.parent / link.filename if external else self.master_path
            if not target.is_file():
                raise EigerFileError(
                    f"{target}: data file missing (linked from {self.master_path} as {name}): "
                    f"put it next to the master file, or {_COPY_AGAIN}"
                )
            try:
                dataset = data[name]
            except (KeyError, OSError) as err:
                raise EigerFileError(
                    f"{target}: cannot open this data file of {self.master_path} ({err}); it is truncated "
                    f"or corrupt (an interrupted copy or collection?): {_COPY_AGAIN}"
                ) from err
            self._check_filters(dataset, target)
            self._check_frames(dataset, target, name)
            first = int(dataset.attrs.get("image_nr_low", sum(len(b[1]) for b in blocks) + 1)) - 1
            blocks.append((first, dataset, target))
        blocks.sort(key=lambda block: block[0])
        held = sum(len(dataset) for _, dataset, _ in blocks)
        if held < self.nimages:
            raise EigerFileError(
                f"{self.master_path}: declares {self.nimages} images but its data files hold {held}: "
                f"the collection is incomplete; {_COPY_AGAIN}"
            )
        return blocks

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
        except OSError as err:
            raise EigerFileError(
                f"{target}: cannot read image {index + 1} ({err}); the file is corrupt: {_COPY_AGAIN}"
            ) from err
        return frame, valid_pixels(frame, self.pixel_mask, self.count_cutoff)

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
            start = self.start_time + np.arange(self.nimages) * self.frame_time
            stop = start + self.count_time
        return np.column_stack([start, stop])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EigerSeries:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    if not path.is_file():
        raise EigerFileError(f"{path}: no such EIGER master file: check the path (<prefix>_master.h5)")
    try:
        file = h5py.File(path, "r")
    except OSError as err:
        raise EigerFileError(
            f"{path}: not a readable HDF5 file ({err}); it is truncated or corrupt: {_COPY_AGAIN}"
        ) from err
    try:
        return EigerSeries(path, file)
    except BaseException as err:
        file.close()
        if isinstance(err, (OSError, KeyError, ValueError)) and not isinstance(err, EigerFileError):
            raise EigerFileError(
                f"{path}: cannot read its metadata ({err}); the master file is truncated or corrupt: {_COPY_AGAIN}"
            ) from err
        raise
