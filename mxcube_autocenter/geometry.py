"""Screen and goniometer conventions of an MD3-like on-axis view.

These are the conventions of mxcubecore's ``sample_centring`` and
``SampleView``. They hold for motor readings times their directions
(``motor_directions`` in the sample view XML, +1 or -1: how each motor's
reading runs against the sample frame), as the sine fit takes them:
:func:`sample_frame` turns readings into such positions. Positions are in
millimetres and degrees, like the motors.

The sample frame is fixed to the spindle: ``a`` runs along the rotation axis,
``(u, v)`` span the plane perpendicular to it. The centring table motors
``sampx`` and ``sampy`` rotate with omega; ``phiy`` moves along the axis and
``phiz`` moves the whole goniometer vertically. A sample point ``(a, u, v)``
appears on screen at::

    x = beam_x + ppmm_x * (a - phiy)
    y = beam_y + ppmm_y * ((u - sampx) sin(omega) + (v - sampy) cos(omega) - phiz)

so the point is in the beam, at every omega, when ``phiy = a``,
``sampx = u``, ``sampy = v`` and ``phiz = 0``. This is exactly what the
three-click sine fit of ``sample_centring.center`` assumes.
"""

from __future__ import annotations

import numpy as np

CENTRING_MOTORS = ("omega", "phiy", "phiz", "sampx", "sampy")
TRANSLATION_MOTORS = CENTRING_MOTORS[1:]


def sample_frame(motors: dict, directions: dict) -> dict:
    """Motor readings as this module's projection takes them: each reading times its direction.

    mxcubecore's sine fit (``sample_centring.center``) works in these
    positions: it turns omega by ``direction x step``, reads omega as
    ``direction x omega`` and moves each translation by ``direction x`` the
    shift it computed. A goniometer whose phiy reading grows as the sample
    moves right on screen (direction -1; with +1 it moves left, as
    ``sample_to_screen`` has it) is projected here as one whose phiy grows
    the other way.

    Parameters
    ----------
    motors : dict
        Readings by motor role (mm, degrees).
    directions : dict
        ``+1`` or ``-1`` by role (SampleView's ``motor_directions``); a role
        not in it counts as +1.

    Returns
    -------
    dict
        The same roles, each centring motor's reading times its direction.
    """
    return {name: value * directions.get(name, 1) if name in CENTRING_MOTORS else value
            for name, value in motors.items()}  # fmt: skip


def sample_to_screen(points, motors, pixels_per_mm, beam_position):
    """Project sample-frame points onto the camera image.

    Parameters
    ----------
    points : (N, 3) array_like
        Points ``(a, u, v)`` in the sample frame, in mm.
    motors : dict
        Positions of ``omega`` (degrees), ``phiy``, ``phiz``, ``sampx`` and
        ``sampy`` (mm).
    pixels_per_mm : (float, float)
        Horizontal and vertical scale of the image, in pixels per mm.
    beam_position : (float, float)
        Beam position on screen, in pixels.

    Returns
    -------
    xy : (N, 2) ndarray
        Screen positions in pixels (x to the right, y down).
    depth : (N,) ndarray
        Distance along the viewing axis from the focal plane through the
        rotation axis, in mm.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    omega = np.radians(motors["omega"])
    c, s = np.cos(omega), np.sin(omega)
    du = points[:, 1] - motors["sampx"]
    dv = points[:, 2] - motors["sampy"]
    xy = np.empty((len(points), 2))
    xy[:, 0] = beam_position[0] + pixels_per_mm[0] * (points[:, 0] - motors["phiy"])
    xy[:, 1] = beam_position[1] + pixels_per_mm[1] * (du * s + dv * c - motors["phiz"])
    depth = du * c - dv * s
    return xy, depth


def beam_frame(points, motors):
    """Coordinates of sample points relative to the X-ray beam.

    The beam runs along the viewing axis through the beam position on
    screen, so a point's offsets from the beam are its screen offsets in mm.

    Parameters
    ----------
    points : (N, 3) array_like
        Points ``(a, u, v)`` in the sample frame, in mm.
    motors : dict
        Centring motor positions (see :func:`sample_to_screen`).

    Returns
    -------
    (N, 3) ndarray
        Horizontal offset, vertical offset and depth along the beam, in mm.
    """
    xy, depth = sample_to_screen(points, motors, (1.0, 1.0), (0.0, 0.0))
    return np.column_stack([xy, depth])


def centred_motors(point, omega=0.0):
    """Motor positions that put a sample point in the beam at every omega.

    Parameters
    ----------
    point : (3,) array_like
        The point ``(a, u, v)`` in the sample frame, in mm.
    omega : float
        Omega to report with the position, in degrees.

    Returns
    -------
    dict
        ``omega``, ``phiy``, ``phiz``, ``sampx`` and ``sampy``.
    """
    a, u, v = (float(x) for x in point)
    return {"omega": float(omega), "phiy": a, "phiz": 0.0, "sampx": u, "sampy": v}


def point_in_beam(motors):
    """The sample point that lies in the beam and in the focal plane.

    Inverse of :func:`centred_motors` for the point at depth 0.

    Parameters
    ----------
    motors : dict
        Centring motor positions (see :func:`sample_to_screen`).

    Returns
    -------
    (3,) ndarray
        ``(a, u, v)`` in mm.
    """
    omega = np.radians(motors["omega"])
    c, s = np.cos(omega), np.sin(omega)
    # Solve du*s + dv*c = phiz (on the beam) and du*c - dv*s = 0 (in focus).
    du, dv = motors["phiz"] * s, motors["phiz"] * c
    return np.array([motors["phiy"], motors["sampx"] + du, motors["sampy"] + dv])
