"""Rendering the on-axis camera view of a virtual sample.

The image is composed like a back-lit microscope picture: a vignetted,
tinted backlight multiplied by the transmission of the sample (pin, stem,
loop fibre, liquid film, crystal facets, ice) plus bright refraction edges
and glints, blurred by defocus, with sensor noise. All drawing is done with
OpenCV on single-channel 8-bit layers, so a 1280x1024 frame renders in a few
milliseconds on one core.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import cv2
import numpy as np

from mxcube_autocenter.geometry import sample_to_screen
from mxcube_autocenter.recording import decode_jpeg, encode_jpeg
from mxcube_autocenter.simulation.sample import VirtualSample

_SHIFT = 4  # sub-pixel bits for OpenCV drawing
_SCALE = 1 << _SHIFT


@dataclass(frozen=True)
class Look:
    """Optics and lighting of the camera view (domain randomisation acts here).

    Attributes
    ----------
    tint : (float, float, float)
        RGB colour of the backlight, each 0-1.
    brightness : float
        Backlight level at the image centre, 0-1.
    vignetting : float
        Relative darkening at the image corners.
    hotspot : (float, float, float)
        Position (fractions of width and height) and strength of a bright spot.
    flare : float
        Strength of a coloured flare arc, as seen on real OAV cameras.
    blur_px : float
        Blur of a perfectly focused image, pixels (sigma).
    numerical_aperture : float
        Sets the defocus blur: sigma ~ NA x distance from the focal plane.
    noise : float
        Sensor noise, grey levels (sigma).
    jpeg_quality : int or None
        Quality of a JPEG round trip, None for none.
    front_light : float
        Front light level, 0 (off) to 1: glints on crystals and the loop.
    rim_darkness, film_opacity, crystal_opacity : float
        Absorption of the loop fibre, the liquid film and the crystal bodies, 0-1.
    """

    tint: tuple = (0.86, 0.93, 0.84)
    brightness: float = 0.75
    vignetting: float = 0.3
    hotspot: tuple = (0.45, 0.4, 0.08)
    flare: float = 0.0
    blur_px: float = 0.8
    numerical_aperture: float = 0.04
    noise: float = 3.0
    jpeg_quality: int | None = None
    front_light: float = 0.0
    rim_darkness: float = 0.8
    film_opacity: float = 0.12
    crystal_opacity: float = 0.35


DEFAULT_LOOK = Look()

TINTS = {
    "green": (0.84, 0.95, 0.8),
    "blue-grey": (0.8, 0.86, 0.95),
    "yellowish": (0.97, 0.92, 0.75),
    "grey": (0.9, 0.9, 0.9),
}


def _noise_phase(motors, pixels_per_mm, beam_position) -> int:
    """A shift of the noise pattern that follows the view, not the frame count.

    The same view renders the same frame however many frames came before it, so a
    centring on the virtual beamline gives the same result on a loaded machine as
    on an idle one; positions are rounded to 0.1 um and 0.001 degree.
    """
    values = [round(float(motors[name]), 3 if name == "omega" else 4) for name in sorted(motors)]
    values += [round(float(v), 3) for v in (*pixels_per_mm, *beam_position)]
    # + 0.0 turns -0.0 into 0.0, whose bytes differ
    return zlib.crc32((np.asarray(values, np.float64) + 0.0).tobytes())


def random_look(rng, *, lighting=True, tint=True, blur=True, noise=True, jpeg=True) -> Look:
    """A randomised look for training-data generation.

    Each switch turns one family of randomisation on or off; what is off
    keeps :data:`DEFAULT_LOOK`'s value.
    """
    look = DEFAULT_LOOK
    if lighting:
        look = replace(
            look,
            brightness=rng.uniform(0.4, 0.9),
            vignetting=rng.uniform(0.0, 0.6),
            hotspot=(rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.0, 0.2)),
            flare=rng.choice([0.0, rng.uniform(0.02, 0.1)]),
            front_light=rng.choice([0.0, 0.0, rng.uniform(0.2, 0.8)]),
            rim_darkness=rng.uniform(0.55, 0.95),
            film_opacity=rng.uniform(0.04, 0.3),
            crystal_opacity=rng.uniform(0.2, 0.55),
        )
    if tint:
        base = np.array(TINTS[rng.choice(list(TINTS))])
        look = replace(look, tint=tuple(np.clip(base + rng.normal(0, 0.03, 3), 0.5, 1.0)))
    if blur:
        look = replace(look, blur_px=rng.uniform(0.3, 2.0), numerical_aperture=rng.uniform(0.02, 0.08))
    if noise:
        look = replace(look, noise=rng.uniform(0.5, 8.0))
    if jpeg:
        look = replace(look, jpeg_quality=int(rng.integers(60, 96)))
    return look


def backlight(width, height, look: Look) -> np.ndarray:
    """The empty field: tinted backlight with vignetting, a hot spot and flare, RGB uint8."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    xn, yn = (x - width / 2) / (width / 2), (y - height / 2) / (height / 2)
    level = look.brightness * (1 - look.vignetting * (xn**2 + yn**2) / 2)
    hx, hy, hs = look.hotspot
    level += hs * np.exp(-(((x / width - hx) ** 2 + (y / height - hy) ** 2) / 0.05))
    rgb = level[..., None] * np.asarray(look.tint, dtype=np.float32)
    if look.flare:
        r = np.hypot(xn + 0.3, yn + 0.9)
        arc = np.exp(-((r - 1.1) ** 2) / 0.004)[..., None] * np.array([0.6, 0.3, 0.5], dtype=np.float32)
        rgb += look.flare * arc
    return np.clip(rgb * 255, 0, 255).astype(np.uint8)


def _fixed(xy) -> np.ndarray:
    """Screen points as OpenCV fixed-point integer coordinates."""
    return np.round(np.asarray(xy) * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _px(length_px) -> int:
    return max(1, int(round(length_px)))


class Renderer:
    """Renders frames of a given size and look, caching what does not change.

    Parameters
    ----------
    width, height : int
        Frame size, pixels.
    look : Look
    seed : int
        Seed of the sensor-noise pattern.
    """

    def __init__(self, width=1280, height=1024, look: Look = DEFAULT_LOOK, seed=0):
        self.width, self.height, self.look = width, height, look
        self._background = backlight(width, height, look)
        rng = np.random.default_rng(seed)
        noise = rng.normal(0, look.noise, size=(height + 16, width + 16, 3)) if look.noise else None
        self._noise_up = None if noise is None else np.clip(noise, 0, 255).astype(np.uint8)
        self._noise_down = None if noise is None else np.clip(-noise, 0, 255).astype(np.uint8)

    def render_empty(self) -> np.ndarray:
        """The field with nothing mounted: backlight and sensor noise only."""
        return self._finish(self._background.copy(), noise_phase=0)

    def render(self, sample: VirtualSample, motors, pixels_per_mm, beam_position) -> np.ndarray:
        """The camera image of ``sample`` at these motor positions.

        Parameters
        ----------
        sample : VirtualSample
        motors : dict
            ``omega`` (degrees), ``phiy``, ``phiz``, ``sampx``, ``sampy`` (mm).
        pixels_per_mm : (float, float)
        beam_position : (float, float)
            Beam on screen, pixels.

        Returns
        -------
        (height, width, 3) uint8 ndarray
            RGB image.
        """
        look = self.look
        shape = (self.height, self.width)
        dark = np.zeros(shape, np.uint8)
        bright = np.zeros(shape, np.uint8)
        ppmm = pixels_per_mm

        def project(points):
            return sample_to_screen(points, motors, ppmm, beam_position)

        self._draw_pin(dark, sample, project, ppmm)
        film_xy, film_depth = project(sample.film_points())
        hull = cv2.convexHull(film_xy.astype(np.float32))
        cv2.fillConvexPoly(dark, _fixed(hull), int(255 * look.film_opacity), cv2.LINE_AA, _SHIFT)
        cv2.polylines(dark, [_fixed(hull)], True, int(255 * min(1, look.film_opacity + 0.35)), 2, cv2.LINE_AA, _SHIFT)
        for crystal in sample.crystals:
            self._draw_crystal(dark, bright, crystal, motors, project, ppmm)
        if len(sample.ice):
            xy, _ = project(sample.ice[:, :3])
            # Sub-pixel centres and radii: the ball is drawn where the beam hits it (expected_ice_spots).
            for (x, y), radius in zip(xy, sample.ice[:, 3] * ppmm[0]):
                r = max(1.0, radius)
                cv2.circle(dark, tuple(_fixed((x, y))[0, 0]), int(round(r * _SCALE)), 150, -1, cv2.LINE_AA, _SHIFT)
                glint = tuple(_fixed((x - r / 3, y - r / 3))[0, 0])
                cv2.circle(bright, glint, int(round(max(1.0, r / 3) * _SCALE)), 90, -1, cv2.LINE_AA, _SHIFT)
        fibre_px = _px(sample.fibre_diameter * ppmm[0])
        for seg in sample.mesh_lines:
            xy, _ = project(seg)
            pts = _fixed(xy)
            cv2.line(dark, tuple(pts[0, 0]), tuple(pts[1, 0]), int(255 * look.rim_darkness * 0.8), max(1, fibre_px // 2), cv2.LINE_AA, _SHIFT)
        rim_xy, _ = project(sample.loop_outline)
        cv2.polylines(dark, [_fixed(rim_xy)], True, int(255 * look.rim_darkness), fibre_px, cv2.LINE_AA, _SHIFT)
        cv2.polylines(bright, [_fixed(rim_xy)], True, int(40 + 80 * look.front_light), max(1, fibre_px // 4), cv2.LINE_AA, _SHIFT)
        stem_xy, _ = project(sample.stem)
        cv2.polylines(dark, [_fixed(stem_xy)], False, int(255 * look.rim_darkness), _px(sample.stem_diameter * ppmm[0]), cv2.LINE_AA, _SHIFT)

        # Defocus: the loop is nearly planar, so its mean depth sets the blur.
        sigma = look.blur_px + look.numerical_aperture * abs(float(np.mean(film_depth))) * ppmm[0]
        if sigma > 0.3:
            dark, bright = _blur(dark, sigma), _blur(bright, sigma)

        transmission = cv2.merge([cv2.bitwise_not(dark)] * 3)
        frame = cv2.multiply(self._background, transmission, scale=1 / 255)
        frame = cv2.add(frame, cv2.merge([bright] * 3))
        return self._finish(frame, _noise_phase(motors, pixels_per_mm, beam_position))

    def _finish(self, frame, noise_phase) -> np.ndarray:
        """Sensor noise (the pattern shifted by ``noise_phase``) and JPEG artefacts."""
        look = self.look
        if self._noise_up is not None:
            dy, dx = noise_phase % 16, (noise_phase // 16) % 16
            window = np.s_[dy : dy + self.height, dx : dx + self.width]
            frame = cv2.subtract(cv2.add(frame, self._noise_up[window]), self._noise_down[window])
        if look.jpeg_quality:
            frame = decode_jpeg(encode_jpeg(frame, int(look.jpeg_quality)))
        return frame

    def _draw_pin(self, dark, sample, project, ppmm):
        """The metal pin: a dark cylinder with a rough end, from the stem to the frame edge."""
        side = 1.0 if sample.pin_side == "left" else -1.0
        far = sample.pin_start - side * 10.0
        rng = np.random.default_rng(sample.seed)
        n = 48
        half = sample.pin_diameter / 2
        # A machined but glued pin end: rough on the scale of ~10 um.
        end_offsets = np.convolve(rng.normal(0, 0.012, n + 4), np.ones(5) / 5, mode="valid")
        across = np.linspace(-half, half, n)
        end = np.column_stack([sample.pin_start + side * end_offsets, np.zeros(n), np.zeros(n)])
        far_pts = np.array([[far, 0.0, 0.0], [far, 0.0, 0.0]])
        xy_end, _ = project(end)
        xy_far, _ = project(far_pts)
        # The pin is a cylinder on the spindle axis: its outline does not turn with omega.
        xy_end[:, 1] += across * ppmm[1]
        xy_far[:, 1] += np.array([half, -half]) * ppmm[1]
        polygon = np.concatenate([xy_end, xy_far])
        cv2.fillPoly(dark, [_fixed(polygon)], 225, cv2.LINE_AA, _SHIFT)

    def _draw_crystal(self, dark, bright, crystal, motors, project, pixels_per_mm):
        """Facets darker the more obliquely they are seen, dark edges, and glints."""
        look = self.look
        xy, depth = project(crystal.vertices)
        omega = np.radians(motors["omega"])
        view = np.array([0.0, np.cos(omega), -np.sin(omega)])  # depth direction in the sample frame
        normals = crystal.hull.equations[:, :3]
        facing = normals @ view
        base = 255 * look.crystal_opacity
        for simplex, cos_view in zip(crystal.hull.simplices, facing):
            if cos_view >= 0:  # back faces are hidden behind front faces
                continue
            level = base * (1.6 - abs(cos_view))
            cv2.fillConvexPoly(dark, _fixed(xy[simplex]), int(min(level, 230)), cv2.LINE_AA, _SHIFT)
            if abs(cos_view) > 0.97:
                cv2.fillConvexPoly(bright, _fixed(xy[simplex]), int(30 + 120 * look.front_light), cv2.LINE_AA, _SHIFT)
        edge_level = int(min(255, base + 140))
        # Total internal reflection makes crystal edges a few um wide and dark.
        edge_px = _px(0.002 * pixels_per_mm[0])
        for i, j in crystal.edges():
            p, q = _fixed(xy[[i, j]])
            cv2.line(dark, tuple(p[0]), tuple(q[0]), edge_level, edge_px, cv2.LINE_AA, _SHIFT)


def _blur(layer, sigma) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels; wide blurs run on a downscaled copy.

    A defocused image has no detail finer than the blur, so a blur wider
    than 2 pixels loses nothing when computed at a lower resolution, and
    costs a fraction of the full-size kernel.
    """
    factor = 1
    while sigma / factor > 2.0 and factor < 8:
        factor *= 2
    small = layer if factor == 1 else cv2.resize(layer, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
    s = sigma / factor
    k = 2 * int(3 * s) + 1
    small = cv2.GaussianBlur(small, (k, k), s)
    if factor == 1:
        return small
    return cv2.resize(small, (layer.shape[1], layer.shape[0]), interpolation=cv2.INTER_LINEAR)


def benchmark(quick: bool = False) -> dict:
    """Render time of 1280x1024 frames on one core, ms per frame (JPEG encoding not included)."""
    import time

    from mxcube_autocenter.simulation.sample import make_sample

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        renderer = Renderer(1280, 1024)
        samples = [make_sample(seed, n_crystals=2) for seed in range(3)]
        n = 30 if quick else 150
        start = time.perf_counter()
        for i in range(n):
            sample = samples[i % len(samples)]
            motors = {"omega": 2.4 * i, "phiy": float(sample.loop_centre[0]), "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}
            renderer.render(sample, motors, (1300.0, 1300.0), (640, 512))
        return {"render_ms_per_frame": 1000 * (time.perf_counter() - start) / n}
    finally:
        # Not setNumThreads(0): that turns OpenCV's threading off for the rest of the
        # process (the later benchmarks' lucid3, resampling and JPEG decoding included).
        cv2.setNumThreads(threads)
