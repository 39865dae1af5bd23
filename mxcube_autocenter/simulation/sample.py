"""Virtual samples: pin, stem, loop, mother-liquor film, crystals and ice, in 3D.

Everything is in the sample frame of :mod:`mxcube_autocenter.geometry`
(``a`` along the spindle, ``(u, v)`` across it), in millimetres. A sample is
fully determined by its seed and generation options, so every figure measured
on the virtual beamline can be reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial import ConvexHull

CRYSTAL_HABITS = ("cube", "plate", "rod", "needle")
LOOP_KINDS = ("plain", "mesh")
# Median diffraction capacity of a crystal, reflections per um^3 (drawn lognormal around it).
MEDIAN_CAPACITY = 0.03


@dataclass
class Crystal:
    """A convex crystal with a diffraction capacity and an internal quality field.

    Attributes
    ----------
    vertices : (V, 3) ndarray
        Corners in the sample frame, mm.
    habit : str
        One of :data:`CRYSTAL_HABITS`.
    capacity : float
        Reflections per um^3 of fully illuminated, perfect crystal.
    blobs : (K, 4) ndarray
        Good regions of the quality field: centre (mm) and radius (mm).
    cracks : (C, 4) ndarray
        Crack planes: unit normal and offset (mm), ``n . p = d``.
    crack_width : float
        Half-thickness of the damaged slab around each crack, mm.
    tint : (3,) ndarray
        RGB colour of the crystal body (0-1).
    """

    vertices: np.ndarray
    habit: str
    capacity: float
    blobs: np.ndarray
    cracks: np.ndarray
    crack_width: float
    tint: np.ndarray
    hull: ConvexHull = field(init=False, repr=False)

    def __post_init__(self):
        self.hull = ConvexHull(self.vertices)

    @property
    def centre(self) -> np.ndarray:
        return self.vertices.mean(axis=0)

    @property
    def volume_um3(self) -> float:
        return float(self.hull.volume) * 1e9

    def contains(self, points) -> np.ndarray:
        """Whether each (N, 3) point lies inside the crystal."""
        eq = self.hull.equations
        return np.all(points @ eq[:, :3].T + eq[:, 3] <= 1e-12, axis=1)

    def quality(self, points) -> np.ndarray:
        """Diffraction quality (0-1) at each (N, 3) point inside the crystal.

        A base level raised by smooth good regions and cut by cracks, so the
        best point to shoot is rarely the geometric centre.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        q = np.full(len(points), 0.3)
        for cx, cy, cz, radius in self.blobs:
            d2 = np.sum((points - (cx, cy, cz)) ** 2, axis=1)
            q += 0.7 * np.exp(-d2 / (2 * radius**2))
        for nx, ny, nz, d in self.cracks:
            near = np.abs(points @ (nx, ny, nz) - d) < self.crack_width
            q[near] *= 0.1
        return np.clip(q, 0.0, 1.0)

    def edges(self) -> np.ndarray:
        """Vertex index pairs of the polyhedron's edges (between distinct faces)."""
        eq = self.hull.equations
        pairs = {}
        for simplex, plane in zip(self.hull.simplices, eq):
            for i in range(3):
                e = tuple(sorted((simplex[i], simplex[(i + 1) % 3])))
                pairs.setdefault(e, []).append(plane[:3])
        return np.array(
            [e for e, normals in pairs.items() if len(normals) < 2 or normals[0] @ normals[1] < 0.999]
        )


@dataclass
class VirtualSample:
    """A mounted sample: what the camera sees and what diffracts.

    Attributes
    ----------
    seed : int
        The seed it was made from.
    pin_side : str
        ``"left"`` or ``"right"``: where the pin enters the view.
    loop_kind : str
        One of :data:`LOOP_KINDS`.
    loop_outline : (M, 3) ndarray
        Closed centre line of the loop fibre, mm.
    loop_normal : (3,) ndarray
        Unit normal of the loop plane.
    fibre_diameter : float
        Loop fibre thickness, mm.
    film_thickness : float
        Mother-liquor film thickness at the loop centre, mm.
    mesh_lines : (L, 2, 3) ndarray
        Fibre segments of a mesh loop (empty for plain loops), mm.
    stem : (S, 3) ndarray
        Centre line of the stem from the loop neck to the pin, mm.
    stem_diameter : float
        mm.
    pin_start : float
        ``a`` coordinate where the metal pin begins, mm.
    pin_diameter : float
        mm.
    crystals : list of Crystal
        Empty for an empty loop.
    ice : (I, 4) ndarray
        Ice or dirt blobs: centre and radius, mm.
    """

    seed: int
    pin_side: str
    loop_kind: str
    loop_outline: np.ndarray
    loop_normal: np.ndarray
    fibre_diameter: float
    film_thickness: float
    mesh_lines: np.ndarray
    stem: np.ndarray
    stem_diameter: float
    pin_start: float
    pin_diameter: float
    crystals: list
    ice: np.ndarray

    @property
    def loop_centre(self) -> np.ndarray:
        return self.loop_outline.mean(axis=0)

    def describe(self) -> str:
        """Loop and crystals in a few words, e.g. ``plain loop 247 um, rod 22 um`` (crystal sizes: cube roots of volumes)."""
        crystals = ", ".join(f"{c.habit} {c.volume_um3 ** (1 / 3):.0f} um" for c in self.crystals) or "empty"
        return f"{self.loop_kind} loop {self.loop_size_um:.0f} um, {crystals}"

    @property
    def loop_size_um(self) -> float:
        """Largest extent of the loop, um."""
        extent = self.loop_outline.max(axis=0) - self.loop_outline.min(axis=0)
        return float(extent.max()) * 1000

    @property
    def is_empty(self) -> bool:
        return not self.crystals

    def film_points(self, n: int = 24) -> np.ndarray:
        """Points bounding the liquid film: the loop outline offset to both faces.

        The film is a meniscus: as thick as ``film_thickness`` in the middle
        and as thin as the fibre at the rim.
        """
        centre = self.loop_centre
        rings = []
        for frac in np.linspace(0.0, 1.0, 4):
            ring = centre + (self.loop_outline[::max(1, len(self.loop_outline) // n)] - centre) * frac
            half = 0.5 * max(self.fibre_diameter, self.film_thickness * np.sqrt(1 - frac**2))
            rings.append(ring + half * self.loop_normal)
            rings.append(ring - half * self.loop_normal)
        return np.concatenate(rings)


def uniform_crystals(sample: VirtualSample, capacity: float | None = None) -> VirtualSample:
    """The sample with every crystal of uniform quality (no good regions, no cracks).

    The camera image shows a crystal's shape and position but nothing of its
    quality field, nor of its diffraction capacity: with ``capacity`` given,
    every crystal also has that capacity (reflections per um^3), and the
    counts are what exact knowledge of the shapes alone predicts.
    """
    crystals = [
        replace(c, blobs=np.zeros((0, 4)), cracks=np.zeros((0, 4)),
                capacity=c.capacity if capacity is None else float(capacity))
        for c in sample.crystals
    ]  # fmt: skip
    return replace(sample, crystals=crystals)


def _rotation(rng) -> np.ndarray:
    """A uniformly random 3D rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _teardrop(length, width, n=96):
    """Teardrop loop outline in the loop plane: (s, r), the pointed neck (where the stem joins) at s=0, the round end at s=length."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = np.cos(t)
    y = np.sin(t) * np.sin(t / 2) ** 1.3
    s = (1 - x) / 2 * length
    r = y / np.abs(y).max() * width / 2
    return s, r


def _mesh_segments(a, r, centre, in_plane, pitch):
    """Fibre segments of a square mesh clipped to the loop outline ``(a, r)``, mm."""
    from matplotlib.path import Path

    outline = Path(np.column_stack([a, r]))
    segments = []
    for horizontal in (True, False):
        span = (r.min(), r.max()) if horizontal else (a.min(), a.max())
        for k in np.arange(span[0] + pitch / 2, span[1], pitch):
            t = np.linspace(a.min(), a.max(), 200) if horizontal else np.linspace(r.min(), r.max(), 200)
            pts = np.column_stack([t, np.full_like(t, k)]) if horizontal else np.column_stack([np.full_like(t, k), t])
            inside = pts[outline.contains_points(pts)]
            if len(inside) > 1:
                segments.append([inside[0], inside[-1]])
    segments = np.array(segments).reshape(-1, 2, 2)
    mesh = np.empty(segments.shape[:2] + (3,))
    mesh[..., 0] = segments[..., 0]
    mesh[..., 1:] = centre[1:] + segments[..., 1:2] * in_plane[1:]
    return mesh


def _crystal_shape(habit, size, rng) -> np.ndarray:
    """Corner points of an unrotated crystal of the given habit and largest size (mm)."""
    if habit == "cube":
        dims = size * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0)])
    elif habit == "plate":
        dims = size * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.12, 0.3)])
    elif habit == "rod":
        dims = size * np.array([1.0, rng.uniform(0.22, 0.4), rng.uniform(0.22, 0.4)])
    else:
        dims = size * np.array([1.0, rng.uniform(0.1, 0.18), rng.uniform(0.1, 0.18)])
    if habit in ("rod", "needle"):
        # Hexagonal prism with pointed or flat ends.
        ang = np.linspace(0, 2 * np.pi, 6, endpoint=False) + rng.uniform(0, np.pi / 3)
        ring = np.column_stack([np.cos(ang) * dims[1] / 2, np.sin(ang) * dims[2] / 2])
        body = dims[0] / 2 * rng.uniform(0.75, 1.0)
        pts = [np.column_stack([np.full(6, x), ring]) for x in (-body, body)]
        pts.append(np.array([[-dims[0] / 2, 0, 0], [dims[0] / 2, 0, 0]]))
        return np.concatenate(pts)
    corners = np.array([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)])
    pts = corners * dims
    # Bevel a few corners so facets differ, as real crystals do.
    cut = rng.uniform(0.05, 0.3, size=(8, 1))
    bevelled = []
    for p, c in zip(pts, cut):
        for axis in range(3):
            q = p.copy()
            q[axis] *= 1 - c[0]
            bevelled.append(q)
    return np.array(bevelled)


def _make_crystal(rng, habit, size, position, loop_normal) -> Crystal:
    shape = _crystal_shape(habit, size, rng)
    rot = _rotation(rng)
    if habit == "plate":
        # Plates settle flat in the film: align their thin axis with the loop normal.
        thin = rot[:, 2]
        axis = np.cross(thin, loop_normal)
        s = np.linalg.norm(axis)
        if s > 1e-9:
            axis /= s
            angle = np.arctan2(s, thin @ loop_normal) * rng.uniform(0.7, 1.0)
            k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            rot = (np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k) @ rot
    vertices = shape @ rot.T + position
    n_blobs = rng.integers(1, 4)
    blob_centres = position + rng.uniform(-0.4, 0.4, size=(n_blobs, 3)) * size
    blob_radii = rng.uniform(0.15, 0.4, size=(n_blobs, 1)) * size
    n_cracks = rng.choice([0, 0, 1, 2])
    normals = rng.normal(size=(n_cracks, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    offsets = np.einsum("ij,j->i", normals, position) + rng.uniform(-0.3, 0.3, n_cracks) * size
    return Crystal(
        vertices=vertices,
        habit=habit,
        capacity=float(np.exp(rng.normal(np.log(MEDIAN_CAPACITY), 0.5))),
        blobs=np.column_stack([blob_centres, blob_radii]),
        cracks=np.column_stack([normals, offsets]).reshape(-1, 4),
        crack_width=0.03 * size,
        tint=np.clip(np.array([0.95, 0.95, 0.9]) + rng.normal(0, 0.05, 3), 0.6, 1.0),
    )


def make_sample(
    seed: int,
    *,
    n_crystals: int | None = None,
    habits=CRYSTAL_HABITS,
    loop_kinds=LOOP_KINDS,
    loop_size_um: tuple[float, float] = (120.0, 700.0),
    crystal_size_um: tuple[float, float] = (20.0, 300.0),
    empty_fraction: float = 0.15,
    pin_side: str = "left",
    ice: bool | None = None,
    ice_fraction: float = 0.3,
) -> VirtualSample:
    """Make a random but reproducible sample.

    Parameters
    ----------
    seed : int
        Everything about the sample follows from it.
    n_crystals : int, optional
        Number of crystals; by default 0 with probability ``empty_fraction``,
        else mostly one and sometimes two or three.
    habits, loop_kinds : sequence of str
        The crystal habits and loop kinds to draw from.
    loop_size_um : (float, float)
        Range of the loop's length along the spindle, um.
    crystal_size_um : (float, float)
        Range of the crystals' largest dimension, um (capped by the loop size).
    empty_fraction : float
        Probability of an empty loop when ``n_crystals`` is not given.
    pin_side : {"left", "right"}
        Side from which the pin enters the view.
    ice : bool, optional
        Whether ice or dirt is present; by default with probability ``ice_fraction``.
    ice_fraction : float
        Probability of ice when ``ice`` is not given.

    Returns
    -------
    VirtualSample
    """
    if pin_side not in ("left", "right"):
        raise ValueError(f"pin_side must be 'left' or 'right', not {pin_side!r}")
    rng = np.random.default_rng(seed)
    mm = 1e-3
    loop_len = rng.uniform(*loop_size_um) * mm
    loop_width = loop_len * rng.uniform(0.55, 0.95)
    loop_kind = str(rng.choice(loop_kinds))
    theta = rng.uniform(0, 2 * np.pi)
    in_plane = np.array([0.0, np.cos(theta), np.sin(theta)])
    normal = np.array([0.0, -np.sin(theta), np.cos(theta)])
    # Mounted roughly, not centred: the loop centre is off the axis.
    centre = np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)])
    side = 1.0 if pin_side == "left" else -1.0
    s, r = _teardrop(loop_len, loop_width)
    bend = rng.uniform(-0.4, 0.4)  # loops are rarely flat
    a = centre[0] - side * (loop_len / 2 - s)
    offsets = (bend * (s / loop_len - 0.5) ** 2 * loop_len)[:, None] * normal
    outline = np.column_stack([a, np.zeros_like(a), np.zeros_like(a)])
    outline[:, 1:] = centre[1:] + r[:, None] * in_plane[1:] + offsets[:, 1:]

    neck = np.array([centre[0] - side * loop_len / 2, *centre[1:]])
    stem_len = rng.uniform(0.3, 0.9)
    twist = rng.uniform(0.005, 0.02)
    t = np.linspace(0, 1, 12)
    stem = np.column_stack(
        [
            neck[0] - side * stem_len * t,
            neck[1] * (1 - t) + twist * np.sin(t * 9) * in_plane[1],
            neck[2] * (1 - t) + twist * np.sin(t * 9) * in_plane[2],
        ]
    )
    fibre = rng.uniform(0.010, 0.025)
    film = rng.uniform(0.02, min(0.12, 0.5 * loop_width))

    mesh = np.zeros((0, 2, 3))
    if loop_kind == "mesh":
        mesh = _mesh_segments(a, r, centre, in_plane, rng.uniform(0.04, 0.08))

    if n_crystals is None:
        n_crystals = 0 if rng.random() < empty_fraction else int(rng.choice([1, 1, 1, 2, 3]))
    crystals = []
    max_size = min(crystal_size_um[1] * mm, 0.7 * loop_width)
    for _ in range(n_crystals):
        habit = str(rng.choice(habits))
        size = float(np.exp(rng.uniform(np.log(crystal_size_um[0] * mm), np.log(max(max_size, crystal_size_um[0] * mm)))))
        if habit == "needle":
            size = min(2 * size, max(max_size, size))  # needles are long for their volume
        # Somewhere in the wide part of the loop, clear of the rim, inside the film.
        along = side * loop_len * (0.5 - rng.uniform(0.3, 0.7))
        across = rng.uniform(-0.6, 0.6) * max(loop_width / 2 - size / 2, 0.0)
        pos = (
            np.array([centre[0] + along, *centre[1:]])
            + across * in_plane
            + rng.uniform(-0.3, 0.3) * film * normal
        )
        crystals.append(_make_crystal(rng, habit, size, pos, normal))

    has_ice = rng.random() < ice_fraction if ice is None else ice
    n_ice = int(rng.integers(1, 6)) if has_ice else 0
    ice_blobs = np.column_stack(
        [
            centre + rng.uniform(-0.5, 0.5, size=(n_ice, 3)) * np.array([loop_len, loop_width, loop_width]),
            rng.uniform(0.005, 0.03, size=(n_ice, 1)),
        ]
    ).reshape(-1, 4)

    return VirtualSample(
        seed=seed,
        pin_side=pin_side,
        loop_kind=loop_kind,
        loop_outline=outline,
        loop_normal=normal,
        fibre_diameter=fibre,
        film_thickness=film,
        mesh_lines=mesh,
        stem=stem,
        stem_diameter=rng.uniform(0.012, 0.03),
        pin_start=float(stem[-1, 0]),
        pin_diameter=rng.uniform(0.5, 0.7),
        crystals=crystals,
        ice=ice_blobs,
    )
