"""The DIALS dispersion spot finder on synthetic EIGER frames with known spots."""

import numpy as np
import pytest
from scipy import ndimage

from mxcube_autocenter.labelling import spotfinder
from mxcube_autocenter.labelling.eiger import open_master, overloaded_pixels, valid_pixels
from mxcube_autocenter.labelling.spotfinder import (
    SpotFinderParams,
    count_reflections,
    d_star_sq,
    find_spots,
    ice_ring_spacings,
    on_ice_ring,
    resolution_radius,
)
from mxcube_autocenter.simulation import eiger
from mxcube_autocenter.simulation.eiger import HOT, SMALL, FrameSimulator, write_eiger_collection


@pytest.fixture(scope="module")
def known_counts(tmp_path_factory):
    """40 frames of 0 to 150 spots, written as EIGER files and spot-found frame by frame."""
    counts = np.random.default_rng(11).integers(0, 151, size=40)
    counts[:4] = (0, 1, 2, 150)
    written = write_eiger_collection(
        tmp_path_factory.mktemp("rc"), "rc", counts, start_time=1.7e9, frame_time=0.1, count_time=0.1, seed=8
    )
    with open_master(written.master_path) as series:
        found = [find_spots(*series.frame(i)) for i in range(series.nimages)]
    return counts, written.spot_positions, found


def test_reflection_counts_match_the_truth(known_counts):
    counts, _, found = known_counts
    error = np.array([spots.count for spots in found]) - counts
    within = np.abs(error) <= np.maximum(3, 0.1 * counts)
    print(
        f"\nspot count within max(3, 10%) of the truth on {within.mean():.0%} of {counts.size} frames; "
        f"exact on {np.mean(error == 0):.0%}; mean |error| {np.abs(error).mean():.2f}, worst {error[np.argmax(np.abs(error))]:+d}"
    )
    assert within.mean() >= 0.95


def test_centroids_land_on_the_true_spot_centres(known_counts):
    _, positions, found = known_counts
    distances = [
        np.linalg.norm(spots.centroids[:, None] - truth[None], axis=2).min(axis=1)
        for spots, truth in zip(found, positions)
        if spots.count and len(truth)
    ]
    distances = np.concatenate(distances)
    print(f"\ncentroid to true centre: median {np.median(distances):.2f} px, 99% within {np.percentile(distances, 99):.2f} px")
    assert np.percentile(distances, 99) < 0.5


def test_spot_list_fields(known_counts):
    _, _, found = known_counts
    spots = found[3]
    assert spots.centroids.shape == (spots.count, 2)
    assert np.all(spots.sizes >= 3) and np.all(spots.intensities > 0)
    rows = spots.centroids[:, 1]
    assert np.all(np.diff(rows) >= 0)  # sorted by row


def test_background_only_frames_give_almost_no_spots():
    simulator = FrameSimulator(SMALL, seed=4)
    for _ in range(10):
        frame, _, _ = simulator.frame(0)
        assert count_reflections(frame, valid_pixels(frame, simulator.pixel_mask, simulator.count_cutoff)) <= 2


def _bright_blobs(shape, rng, n=30, size=5):
    """Boolean image with n bright square blobs away from the edges."""
    blobs = np.zeros(shape, bool)
    for row, column in zip(rng.integers(10, shape[0] - 10, n), rng.integers(10, shape[1] - 10, n)):
        blobs[row : row + size, column : column + size] = True
    return blobs


def test_masked_pixels_never_make_spots():
    simulator = FrameSimulator(SMALL, seed=5)
    frame, _, _ = simulator.frame(0)
    blobs = _bright_blobs(frame.shape, np.random.default_rng(0))
    frame[blobs] = 5000
    mask = simulator.pixel_mask | np.where(blobs, np.uint32(HOT), np.uint32(0))
    valid = valid_pixels(frame, mask, simulator.count_cutoff)
    # The flat blobs have their peak pixel in a corner: keep them whatever the peak-centroid separation.
    params = SpotFinderParams(max_separation=None)
    assert find_spots(frame, valid, params).count == 0
    # Unmasked, the same blobs are spots: the mask, not the data, kept them out.
    assert find_spots(frame, valid_pixels(frame, simulator.pixel_mask, simulator.count_cutoff), params).count > 20


def test_saturated_pixels_never_make_spots():
    simulator = FrameSimulator(SMALL, seed=6)
    frame, _, _ = simulator.frame(0)
    blobs = _bright_blobs(frame.shape, np.random.default_rng(1))
    frame[blobs] = simulator.count_cutoff + np.random.default_rng(2).integers(0, 1000, np.count_nonzero(blobs))
    assert find_spots(frame, valid_pixels(frame, simulator.pixel_mask, simulator.count_cutoff)).count == 0
    # Nor as spots' cores: saturated pixels without a spot's strong tail around them (an unmasked hot cluster).
    overloaded = overloaded_pixels(frame, simulator.pixel_mask, simulator.count_cutoff)
    assert overloaded.sum() > 20
    assert find_spots(frame, valid_pixels(frame, simulator.pixel_mask, simulator.count_cutoff),
                      overloaded=overloaded).count == 0


def test_masked_pixels_do_not_poison_their_neighbours():
    simulator = FrameSimulator(SMALL, seed=7)
    frame, positions, _ = simulator.frame(40)
    valid = valid_pixels(frame, simulator.pixel_mask, simulator.count_cutoff)
    # Huge values on masked pixels right beside every spot change nothing.
    columns, rows = np.floor(positions).astype(int).T
    frame[rows, columns + 3] = simulator.invalid
    valid[rows, columns + 3] = False
    spots = find_spots(frame, valid)
    assert spots.count == 40
    # A spot loses the masked pixel of its tail, which moves its centroid a little.
    assert np.linalg.norm(spots.centroids[:, None] - positions[None], axis=2).min(axis=1).max() < 1.0


def _gaussian_spot(shape, x, y, intensity, sigma):
    """Expected counts of a Gaussian spot of ``intensity`` counts centred at ``(x, y)``, pixels."""
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    r2 = (columns + 0.5 - x) ** 2 + (rows + 0.5 - y) ** 2
    return intensity / (2 * np.pi * sigma**2) * np.exp(-r2 / (2 * sigma**2))


def test_spots_whose_peak_is_far_from_their_centroid_are_dropped_as_in_dials():
    # A very strong low-resolution spot on a 16-bit EIGER: its core is saturated, hence
    # invalid, and its strong pixels are a ring whose brightest pixel lies beside the core,
    # more than 2 pixels from the centroid. DIALS' filter.max_separation (2) drops it.
    rng = np.random.default_rng(9)
    shape, cutoff = (64, 96), 0xFFFE
    expected = 1.0 + _gaussian_spot(shape, 20.5, 30.5, 3000, 1.0) + _gaussian_spot(shape, 60.5, 30.5, 3e6, 1.5)
    frame = np.minimum(rng.poisson(expected), 0xFFFF).astype(np.uint16)
    valid = valid_pixels(frame, np.zeros(shape, np.uint32), cutoff)
    assert not valid[30, 60]
    spots = find_spots(frame, valid)
    assert spots.count == 1 and np.linalg.norm(spots.centroids[0] - (20.5, 30.5)) < 0.5
    assert find_spots(frame, valid, SpotFinderParams(max_separation=None)).count == 2
    # On a tie the first pixel in row order is the peak, as DIALS' peak_coordinates: a flat
    # 5 x 5 square has it in its corner, 2.83 pixels from its centre.
    square = np.ones(shape, np.uint32)
    square[10:15, 40:45] = 500
    assert find_spots(square).count == 0
    assert find_spots(square, params=SpotFinderParams(max_separation=2.9)).count == 1


def test_a_spot_with_a_saturated_core_counts_once():
    # Its strong pixels around the core (invalid: its count is unknown) form a ring that 4-connectivity broke
    # into 2 to 4 spots, or that max_separation dropped: the strongest crystals got erratic counts.
    rng = np.random.default_rng(3)
    shape, cutoff = (240, 240), 20000
    centres = [(40.2 + 80 * (k // 3), 40.7 + 80 * (k % 3)) for k in range(9)]
    expected = 1.0 + sum(_gaussian_spot(shape, x, y, 1e6, 1.0) for x, y in centres)
    frame = np.minimum(rng.poisson(expected), cutoff).astype(np.uint32)  # saturated pixels read the cutoff
    mask = np.zeros(shape, np.uint32)
    valid, overloaded = valid_pixels(frame, mask, cutoff), overloaded_pixels(frame, mask, cutoff)
    assert overloaded.sum() >= 9 * 9 and not (valid & overloaded).any()
    assert find_spots(frame, valid).count != 9
    spots = find_spots(frame, valid, overloaded=overloaded)
    assert spots.count == 9
    found = np.linalg.norm(spots.centroids[:, None] - np.array(centres)[None], axis=2).min(axis=1)
    assert found.max() < 0.5
    # Masked saturated pixels (a gap, a hot pixel) are no core: only the pixel mask's zeros count.
    mask[overloaded] = 1
    assert not overloaded_pixels(frame, mask, cutoff).any()


def _reference_strong_pixels(frame, valid, params):
    """DIALS' dispersion test written out pixel by pixel, for checking the vectorised one."""
    kx, ky = params.kernel_size
    strong = np.zeros(frame.shape, bool)
    for row in range(frame.shape[0]):
        for column in range(frame.shape[1]):
            if not valid[row, column]:
                continue
            box = (slice(max(0, row - ky), row + ky + 1), slice(max(0, column - kx), column + kx + 1))
            values = frame[box][valid[box]].astype(np.float64)
            n = values.size
            if n < params.min_count:
                continue
            mean, variance = values.mean(), values.var(ddof=1)
            value = frame[row, column]
            strong[row, column] = (
                mean > 0
                and variance / mean > params.gain * (1 + params.sigma_background * np.sqrt(2 / (n - 1)))
                and value > mean + params.sigma_strong * np.sqrt(params.gain * mean)
                and value > params.global_threshold
            )
    return strong


@pytest.mark.parametrize(
    "params",
    [SpotFinderParams(), SpotFinderParams(kernel_size=(2, 4), min_local=20, sigma_background=3, global_threshold=5)],
)
def test_vectorised_threshold_matches_the_definition(monkeypatch, params):
    # Strips of 7 rows, so that strip edges fall inside spots.
    monkeypatch.setattr(spotfinder, "_STRIP_PIXELS", 7 * 64)
    rng = np.random.default_rng(3)
    frame = rng.poisson(1.5, size=(61, 64)).astype(np.uint32)
    frame[ndimage.binary_dilation(_bright_blobs(frame.shape, rng, n=8, size=1), iterations=2)] += 40
    valid = rng.random(frame.shape) > 0.1
    strong = np.zeros(frame.size, bool)
    strong[spotfinder._strong_pixels(frame, valid, params, None)] = True
    expected = _reference_strong_pixels(frame, valid, params)
    assert expected.sum() > 20
    np.testing.assert_array_equal(strong.reshape(frame.shape), expected)


def test_spots_join_pixels_sharing_an_edge_not_a_corner():
    rng = np.random.default_rng(4)
    pixels = rng.random((80, 90)) < 0.2
    labels = spotfinder._label_4_connected(np.flatnonzero(pixels), pixels.shape[1])
    expected, n = ndimage.label(pixels)  # default structure: edge neighbours
    assert labels.max() + 1 == n
    # Same partition: each component maps to exactly one expected label.
    pairs = np.unique(np.column_stack([labels, expected[pixels]]), axis=0)
    assert len(pairs) == n


def test_resolution_radius():
    geometry = SMALL
    d = geometry.wavelength / (2 * np.sin(np.radians(15)))  # 2 theta = 30 degrees
    expected = geometry.distance * np.tan(np.radians(30)) / geometry.pixel_size
    assert resolution_radius(d, geometry) == pytest.approx(expected)
    assert resolution_radius(0.5 * geometry.wavelength, geometry) == np.inf


def test_resolution_limits_drop_spots_outside_the_shell():
    simulator = FrameSimulator(SMALL, seed=9)
    frame, positions, _ = simulator.frame(400)
    valid = valid_pixels(frame, simulator.pixel_mask, simulator.count_cutoff)
    params = SpotFinderParams(d_min=4.0, d_max=8.0)
    r_inner, r_outer = resolution_radius(8.0, SMALL), resolution_radius(4.0, SMALL)
    radius = np.hypot(positions[:, 0] - SMALL.beam_center_x, positions[:, 1] - SMALL.beam_center_y)
    surely_in = np.count_nonzero((radius > r_inner + 3) & (radius < r_outer - 3))
    maybe_in = np.count_nonzero((radius > r_inner - 3) & (radius < r_outer + 3))
    found = find_spots(frame, valid, params, geometry=SMALL)
    assert surely_in <= found.count <= maybe_in
    assert 0 < found.count < 400
    found_radius = np.hypot(*(found.centroids - [SMALL.beam_center_x, SMALL.beam_center_y]).T)
    assert np.all((found_radius > r_inner - 1) & (found_radius < r_outer + 1))
    with pytest.raises(ValueError, match="need the detector geometry"):
        find_spots(frame, valid, params)


def test_ice_ring_spacings_are_those_of_hexagonal_ice():
    # The rings DIALS' ice-ring filter lists for its default cell, Angstrom.
    expected = [3.895, 3.669, 3.441, 2.671, 2.249, 2.072, 1.948, 1.918, 1.883, 1.835, 1.721]
    np.testing.assert_allclose(ice_ring_spacings(d_min=1.7), expected, atol=0.002)
    assert ice_ring_spacings(d_min=3.5).size == 2  # (100) and (002); (001) is absent


@pytest.mark.parametrize("geometry", [SMALL, eiger.EIGER_4M])
def test_the_ice_ring_filter_drops_exactly_the_ice_spots(geometry):
    simulator = FrameSimulator(geometry, seed=12)
    frame, positions, ice_positions = simulator.frame(120, 15)
    assert on_ice_ring(ice_positions, geometry).all() and not on_ice_ring(positions, geometry).any()
    s2 = d_star_sq(ice_positions, geometry)
    rings = ice_ring_spacings(d_min=1.0) ** -2.0
    assert np.abs(s2[:, None] - rings[None]).min(axis=1).max() <= 0.0005
    valid = valid_pixels(frame, simulator.pixel_mask, simulator.count_cutoff)
    assert find_spots(frame, valid, geometry=geometry).count == 135
    filtered = find_spots(frame, valid, SpotFinderParams(ice_rings=True), geometry=geometry)
    assert filtered.count == 120
    assert np.linalg.norm(filtered.centroids[:, None] - positions[None], axis=2).min(axis=1).max() < 0.5
    with pytest.raises(ValueError, match="ice_rings=True needs the detector geometry"):
        find_spots(frame, valid, SpotFinderParams(ice_rings=True))


def test_frames_refuse_more_ice_spots_than_the_rings_hold():
    simulator = FrameSimulator(SMALL, seed=13)
    assert 0 < simulator.ice_capacity < simulator.capacity
    with pytest.raises(ValueError, match="ice spots do not fit on the ice rings"):
        simulator.frame(0, simulator.ice_capacity + 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ice_ring_width": 0.0},
        {"min_local": 1},
        {"min_local": 50},
        {"kernel_size": (0, 3)},
        {"gain": 0},
        {"min_spot_size": 5, "max_spot_size": 4},
        {"d_min": 3.0, "d_max": 2.0},
        {"max_separation": -1.0},
    ],
)
def test_parameters_are_checked(kwargs):
    with pytest.raises(ValueError):
        SpotFinderParams(**kwargs)


def test_min_local_zero_means_the_whole_box():
    assert SpotFinderParams(min_local=0).min_count == 49


def test_frame_and_mask_must_agree():
    with pytest.raises(ValueError, match="differ in shape"):
        find_spots(np.zeros((10, 10)), np.ones((10, 11), bool))
    with pytest.raises(ValueError, match="one 2D detector frame"):
        find_spots(np.zeros((2, 10, 10)))


def test_benchmarks_report_their_figures():
    figures = {**spotfinder.benchmark(quick=True), **eiger.benchmark(quick=True)}
    print("\n" + ", ".join(f"{key} = {value:.3g}" for key, value in figures.items()))
    assert set(figures) == {
        "spotfind_s_per_4m_frame",
        "spotfind_s_per_16m_frame",
        "eiger_write_ms_per_frame_small",
        "eiger_write_ms_per_frame_4m",
    }
    assert all(value > 0 for value in figures.values())
