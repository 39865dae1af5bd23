"""Typed configuration of the AutoCenter hardware object.

Beamline staff write these properties in the hardware object's XML file (see
``hardware_objects_xml/auto_centring.xml`` and ``docs/configuration.md``).
mxcubecore passes every XML property to :class:`AutoCenterConfig`; a value of
the wrong type or out of range is refused with a message that names the
property and says what is allowed.
"""

from __future__ import annotations

import ast
import difflib
import os
import string
from typing import Annotated, Literal, get_args

from mxcubecore.BaseHardwareObjects import ConfiguredObject
from mxcube_autocenter.collection_recorder import DEFAULT_MASTER_FILE_TEMPLATE
from pydantic import ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator, model_validator

SCAN_TYPES = ("OSC", "Helical")
# dc_params["fileinfo"] as mxcubecore's queue fills it (queue_model_objects.to_collect_dict), to try templates on.
EXAMPLE_FILEINFO = {"directory": "/data/visit/sample", "prefix": "sample", "run_number": 1,
                    "archive_directory": "/archive/visit/sample", "process_directory": "/data/visit/sample/process",
                    "template": "sample_1_%06d.h5", "compression": False}
# Files and folders of the centring: ``~`` is expanded here, and a relative path is taken from the folder of the
# XML file (:func:`resolve_relative_paths`), not from MXCuBE's working directory, which is no fixed place.
PATH_PROPERTIES = ("centring_model", "centring_classifier", "centring_ice_model", "centring_save_directory")
# Smallest region searched along or across the spindle, um: a few beam widths.
MIN_ROI_UM = 50.0


class AutoCenterConfig(ConfiguredObject.HOConfig):
    """XML properties of ``mxcube_autocenter.AutoCenter``.

    Undeclared properties are reported by mxcubecore (a warning, or an error
    in its "strict" validation mode), so a misspelt property never passes
    silently.
    """

    # "nan" or "inf" in the XML would switch a threshold or a limit off without a word.
    model_config = ConfigDict(allow_inf_nan=False)
    # The XML file's folder, where relative paths start (:func:`resolve_relative_paths`); None until resolved.
    _folder: str | None = PrivateAttr(default=None)

    username: str = Field(default="Optical ML centring", description="Name shown in MXCuBE.")
    centring_model: str | None = Field(
        default=None,
        description="Keras regressor file for centring; empty: the shipped default model in models/.",
    )
    recording_enabled: bool = Field(
        default=True,
        description="Record camera frames during the configured collection types.",
    )
    record_directory: str = Field(
        default="{data_directory}/autocenter_frames",
        description=(
            "Where recordings go: absolute, or a template with {data_directory}, "
            "the collection's data directory."
        ),
    )
    record_frame_rate: float = Field(
        default=10.0, gt=0, le=100, description="Frames recorded per second."
    )
    record_scan_types: list[Literal["OSC", "Helical"]] = Field(
        default=list(SCAN_TYPES),
        min_length=1,  # none would record nothing with recording_enabled true: that is recording_enabled false
        description="Collection types to record, from 'OSC' (rotational) and 'Helical'.",
    )

    record_source: Literal["stream", "poll"] = Field(
        default="stream",
        description="'stream': the camera's imageReceived signal; 'poll': sample_view snapshots.",
    )
    record_storage: Literal["jpeg", "raw"] = Field(
        default="jpeg", description="Frames kept as the camera's JPEG (compact) or as raw RGB."
    )
    record_max_frames: int = Field(default=20000, gt=0, description="Frames kept at most per collection.")
    record_min_free_mb: float = Field(
        default=1000.0, ge=0, description="Free disk space below which recording stops, MB."
    )
    record_camera_timeout_s: float = Field(
        default=5.0, gt=0,
        description="Seconds without a new camera frame (not a repeat of the last) after which recording stops.",
    )
    master_file_template: str = Field(
        default=DEFAULT_MASTER_FILE_TEMPLATE,
        description="EIGER master file of a collection, over dc_params['fileinfo'] keys.",
    )

    centring_enabled: bool = Field(
        default=True,
        description="Take over SampleView's automatic centring (web UI button, queue auto loop centring).",
    )
    centring_classifier: str | None = Field(
        default=None, description="Keras crystal/empty classifier file; empty: the shipped one, if any."
    )
    centring_ice_model: str | None = Field(
        default=None, description="Keras ice network file (a classifier of the beam on ice, asked in the "
        "verification view); empty: the shipped one, if any.",
    )
    # mxcubecore's sine fit needs three points.
    centring_angles: int = Field(
        default=6, ge=3, le=12,
        description="Views, spread evenly over half a turn of omega (6: 0, 30, ..., 150 degrees), fused and fitted.",
    )  # fmt: skip
    verify_centring: Literal["off", "report", "require"] = Field(
        default="require",
        description="After the move, score the beam in one more view (half a view step past the fit's end), counted "
        "with the centring views against blind_views (a miss: below verify_min_score): 'report' logs a point that "
        "fails, 'require' fails on it and returns the sample (or, with the loop fallback, centres the loop).",
    )
    verify_min_score: float = Field(
        default=2.0, ge=0,
        description="Predicted reflection count at the beam below which the verification view counts as not seeing "
        "the crystal; such a miss counts with the centring views below min_score against blind_views.",
    )  # fmt: skip
    # At least a beam-sized region's worth of um: 0.7 (mm typed into a um field) gave an empty region.
    roi_width_um: float = Field(default=700.0, ge=MIN_ROI_UM,
                                description="Region searched along the spindle from the loop tip, um.")
    roi_height_um: float = Field(default=600.0, ge=MIN_ROI_UM, description="Region searched across the spindle, um.")
    heatmap_stride_px: float = Field(default=6.0, gt=0, le=64, description="Heatmap grid step on the image, pixels.")
    heatmap_symmetries: Literal["dihedral", "flips", "none"] = Field(
        default="none",
        description="Average each heatmap over the region's flips and quarter turns ('dihedral', 8 passes), its "
        "flips ('flips', 4) or not at all ('none', 1).",
    )
    min_score: float = Field(
        default=5.0, ge=0,
        description="Smallest predicted reflection count at the chosen point, in every view but blind_views, that "
        "counts as a crystal.",
    )
    blind_views: int = Field(
        default=2, ge=0,
        description="Views in which the chosen point may score below min_score (a plate or needle seen edge-on "
        "hardly shows on camera); the others, at least two, must reach it.",
    )  # fmt: skip
    refine_max_um: float = Field(
        default=7.0, ge=0, le=50,
        description="Largest move of the fused point onto the dark mass of the crystal the views predict, um; 0: "
        "the heatmaps' point as it is.",
    )
    min_crystal_probability: float = Field(
        default=0.5, ge=0, le=1,
        description="Smallest classifier probability that counts as a crystal (a NaN counts as none); 0: the "
        "classifier's veto is off, NaN included.",
    )
    max_ice_probability: float = Field(
        default=0.5, ge=0, le=1,
        description="Ice network probability at the beam in the verification view above which (or NaN) the point "
        "is taken for an ice ball, not a crystal: the verification fails (asked only with verify_centring on; 'report' "
        "only warns); 1: never, the veto is off.",
    )
    no_crystal_fallback: Literal["none", "loop"] = Field(
        default="none", description="With no crystal found: 'none' (fail, no move) or 'loop' (centre the loop tip)."
    )
    pin_side: Literal["left", "right"] = Field(default="left", description="Side from which the pin enters the image.")
    max_displacement_mm: float = Field(
        default=1.0, gt=0, description="Largest move of a translation motor a centring may make, mm."
    )
    move_timeout_s: float = Field(default=30.0, gt=0, description="Time allowed for each motor move, s.")
    snapshot_fresh_frames: int = Field(
        default=2, ge=0, le=10,
        description="New camera frames awaited before each view's snapshot: the camera's last frame may have been "
        "exposed before the motors stopped; 0: the last frame at once.",
    )  # fmt: skip
    centring_save_directory: str | None = Field(
        default=None, description="Where each centring's heatmap PNGs and JSON record go; empty: not saved."
    )

    @model_validator(mode="before")
    @classmethod
    def _as_written(cls, data):
        # mxcubecore hands over an element's text with its blanks and line breaks (and makes None, True, False
        # or a number only of text without them): an element written over several lines reads as on one line.
        if not isinstance(data, dict):
            return data
        values = {}
        for name, value in data.items():
            if isinstance(value, str):
                value = value.strip()
                if value == "None":
                    value = None  # as mxcubecore reads the text None
            field = cls.model_fields.get(name)
            if value is None and field is not None and "none" in get_args(field.annotation):
                value = "none"  # the text None, for a property whose choices include 'none'
            values[name] = value
        return values

    @field_validator("*", mode="before")
    @classmethod
    def _no_number_for_a_text(cls, value, info):
        # mxcubecore makes the text 2024, 007 or 1e3 a number, whose spelling is then lost: a folder, file or name
        # of digits alone cannot be given in the XML.
        annotation = cls.model_fields[info.field_name].annotation
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and str in (annotation, *get_args(annotation)) and int not in (annotation, *get_args(annotation))):
            raise ValueError(f"mxcubecore reads this text as the number {value!r}, not as the text written: give a "
                             "folder or file as ./NAME, a name with a letter in it")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_switch_for_a_number(cls, value, info):
        # mxcubecore makes the text True or False a bool, which pydantic would read as 1 or 0.
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in (int, float):
            raise ValueError("expected a number, not True or False")
        return value

    @field_validator(*PATH_PROPERTIES)
    @classmethod
    def _home(cls, value):
        return os.path.expanduser(value) if value else value

    @field_validator("centring_save_directory")
    @classmethod
    def _no_template(cls, value):
        # Not filled in like record_directory's: a literal "{data_directory}" folder would be made.
        if value and "{" in value and "}" in value:
            raise ValueError("a folder, not a template: nothing is filled in here (centrings belong to no collection)")
        return value

    @field_validator("record_scan_types", mode="before")
    @classmethod
    def _parse_list(cls, value):
        # XML properties arrive as text such as '["OSC", "Helical"]'.
        if isinstance(value, str):
            try:
                return ast.literal_eval(value)
            except (ValueError, SyntaxError) as err:
                raise ValueError(
                    f"expected a list such as {list(SCAN_TYPES)!r}, got {value!r}"
                ) from err
        return value

    @field_validator("record_directory")
    @classmethod
    def _directory_template(cls, value):
        # Filled in at each collection (collection_recorder.recording_directory), where a bad template
        # would only end up as "could not start recording" in the log, collection after collection.
        value = os.path.expanduser(value)
        try:
            directory = value.format(data_directory="/data")
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(
                f"not a template over {{data_directory}} alone ({type(err).__name__}: {err}); "
                "write braces as {{ and }}"
            ) from None
        if not os.path.isabs(directory):
            raise ValueError("must be an absolute path, or start with {data_directory}")
        return value

    @field_validator("master_file_template")
    @classmethod
    def _fileinfo_template(cls, value):
        # Filled in with dc_params["fileinfo"] at each collection (collection_recorder.master_file_path).
        if not value:
            raise ValueError(
                f"empty: no recording could be labelled; leave the property out for the default {DEFAULT_MASTER_FILE_TEMPLATE}"
            )
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as err:
            raise ValueError(f"not a format string ({err}); write braces as {{{{ and }}}}") from None
        if any(not name or name[0].isdigit() for name in fields):
            raise ValueError("fields must be named after fileinfo keys, such as {directory}, {prefix}, {run_number}")
        try:
            path = value.format(**EXAMPLE_FILEINFO)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(
                f"cannot be filled in with a collection's fileinfo ({type(err).__name__}: {err}); its keys are "
                f"{', '.join('{' + key + '}' for key in EXAMPLE_FILEINFO)}"
            ) from None
        if not os.path.isabs(path):
            raise ValueError("must give an absolute path: start it with {directory}")
        return value

    def __setattr__(self, name, value):
        # A script's or the queue's ``ho.config.min_score = ...`` is checked as the XML is: unchecked, NaN
        # switched the crystal threshold off and a frame rate of 0 divided by zero at the next collection.
        # The whole configuration is validated with the new value (pydantic's validate_assignment keeps a
        # refused value, and runs no validator that reads several properties).
        fields = type(self).model_fields
        if name not in fields and not name.startswith("_"):
            close = difflib.get_close_matches(name, fields, n=1)
            raise AttributeError(f"AutoCenter has no property {name!r}" + (f": did you mean {close[0]!r}?" if close
                                 else ": see docs/configuration.md"))  # fmt: skip
        if name in fields:
            value = getattr(type(self).model_validate({**self.model_dump(), name: value}), name)
            if name in PATH_PROPERTIES and value and self._folder is not None and not os.path.isabs(value):
                value = os.path.normpath(os.path.join(self._folder, value))
        super().__setattr__(name, value)

    @model_validator(mode="after")
    def _two_views_see_the_crystal(self):
        check_blind_views(self.blind_views, self.centring_angles)
        return self

    @model_validator(mode="after")
    def _a_polled_camera_is_heard_before_its_watchdog(self):
        # The poll source looks for a new image once a frame period: a period over half the time-out stops every
        # recording of a camera that streams fine.
        if self.record_source == "poll" and self.record_camera_timeout_s < 2.0 / self.record_frame_rate:
            raise ValueError(
                f"record_camera_timeout_s ({self.record_camera_timeout_s:g} s) must be at least two frame periods of "
                f"record_frame_rate ({self.record_frame_rate:g} frames/s, {2.0 / self.record_frame_rate:g} s) with "
                "record_source 'poll': raise one of them"
            )
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _explain_errors(cls, data, handler):
        # pydantic's own report is terse; name each property, its value, what
        # it means and where to fix it, as beamline staff read it in the log.
        try:
            return handler(data)
        except ValidationError as err:
            raise ValueError(
                "invalid AutoCenter configuration (fix it in the hardware "
                "object's XML file, see docs/configuration.md):\n"
                + describe_errors(err, cls)
            ) from None


def check_blind_views(blind_views: int, n_angles: int) -> None:
    """Check that at least two views must still see the chosen point: one view gives no depth.

    Parameters
    ----------
    blind_views : int
        The ``blind_views`` property.
    n_angles : int
        Views of the centring (``centring_angles``, or a script's ``n_angles``).

    Raises
    ------
    ValueError
        If ``blind_views`` exceeds ``n_angles - 2``.
    """
    if blind_views > n_angles - 2:
        raise ValueError(
            f"blind_views = {blind_views} with {n_angles} centring angles: at most {n_angles - 2}, since two views "
            "must see the crystal to place it in 3D (lower blind_views, or centre with more angles)"
        )


def check_centring_angles(n_angles) -> int:
    """The omega angles of one centring (a script's or a queue task's), checked as the property is.

    Parameters
    ----------
    n_angles : int
        Views over half a turn of omega.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If ``n_angles`` is outside the ``centring_angles`` property's range
        (fewer than 3: mxcubecore's sine fit needs three points).
    """
    field = AutoCenterConfig.model_fields["centring_angles"]
    try:
        return TypeAdapter(Annotated[field.annotation, *field.metadata]).validate_python(n_angles)
    except ValidationError as err:
        raise ValueError(
            f"n_angles = {n_angles!r}: {err.errors()[0]['msg']}, as for the centring_angles property "
            f"({field.description})"
        ) from None


def describe_errors(error: ValidationError, model) -> str:
    """One line per invalid property of a pydantic ``ValidationError``.

    Parameters
    ----------
    error : pydantic.ValidationError
        The error raised while validating ``model``.
    model : type of pydantic.BaseModel
        The configuration model, for the properties' descriptions.

    Returns
    -------
    str
        Lines of the form ``<property> = <value>: <problem> (<meaning>)``.
    """
    lines = []
    for item in error.errors():
        if not item["loc"]:
            # A check across properties (blind_views, undeclared ones): its input is every property, its message names them.
            lines.append(f"  {item['msg']}")
            continue
        name = str(item["loc"][0])
        field = model.model_fields.get(name)
        meaning = f" ({field.description})" if field and field.description else ""
        lines.append(f"  {name} = {item.get('input')!r}: {item['msg']}{meaning}")
    return "\n".join(lines)


def resolve_relative_paths(config: AutoCenterConfig, folder) -> None:
    """Take the relative paths of :data:`PATH_PROPERTIES` from ``folder`` (the XML file's), in place.

    The configuration keeps ``folder``: a relative path a script sets later
    (``ho.config.centring_save_directory = "reviews"``) starts there too.

    Parameters
    ----------
    config : AutoCenterConfig
        Validated properties (``~`` already expanded).
    folder : path
        The folder of the hardware object's XML file.
    """
    config._folder = os.fspath(folder)
    for name in PATH_PROPERTIES:
        setattr(config, name, getattr(config, name))  # a relative one is taken from the folder now
