"""Data augmentation on the fly in ``tf.data``: dihedral flips and rotations, jitter.

The thesis multiplied its data eightfold with the flips and rotations of the
square (the dihedral group D4). Here they are drawn at random for each
example as it streams, so nothing is materialised.

A caveat: the beam is not round (20 x 5 um by default, wider than high), so
only the flips (left-right, up-down and both, i.e. the 180 degree
rotation) are exact symmetries of the label; the 90 degree rotations turn
the footprint of the beam on the crystal by 90 degrees, which changes the
count at crystal edges. ``"flips"`` keeps the exact four; ``"dihedral"``
(the thesis, default) uses all eight.

Element ``k`` of the group (0-7) is ``rot90(image, k % 4)`` followed, for
``k >= 4``, by a left-right flip.

Jitter (optional, after normalisation): contrast ``x * c`` with
``c`` in ``[1 - s, 1 + s]``, brightness ``+ b`` with ``b`` in
``[-s / 2, s / 2]``, and a Gaussian blur of sigma in ``[0, 2 s]`` model
pixels (``s`` the strength, default 0.2). Randomness is stateless, seeded
per example from ``tf.data.Dataset.random(seed)``, so parallel mapping stays
reproducible.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

AUGMENTATIONS = ("dihedral", "flips", "none")
# The group elements each mode draws from; "flips" holds the exact symmetries of a
# rectangular beam: identity, 180 degrees, left-right flip, up-down flip.
GROUP_ELEMENTS = {"dihedral": tuple(range(8)), "flips": (0, 2, 4, 6), "none": (0,)}


def dihedral_np(image, k: int) -> np.ndarray:
    """Element ``k`` (0-7) of the dihedral group applied to an (H, W, ...) array."""
    if not 0 <= int(k) < 8:
        raise ValueError(f"k must be 0-7, not {k}")
    out = np.rot90(image, int(k) % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def inverse_element(k: int) -> int:
    """The element that undoes element ``k``: turns back, and every flip undoes itself."""
    return (-int(k)) % 4 if k < 4 else int(k)


def dihedral_tf(image, k):
    """Element ``k`` (0-7, a scalar tensor) of the dihedral group applied to an (H, W, C) tensor."""
    k = tf.cast(k, tf.int32)
    out = tf.image.rot90(image, k=k % 4)
    return tf.cond(k >= 4, lambda: tf.image.flip_left_right(out), lambda: out)


def group_element(mode: str, u):
    """The group element for a uniform random ``u`` in [0, 1) under ``mode``."""
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {mode!r}")
    elements = GROUP_ELEMENTS[mode]
    i = tf.minimum(tf.cast(tf.floor(u * len(elements)), tf.int32), len(elements) - 1)
    return tf.gather(tf.constant(elements, tf.int32), i)


def _gaussian_blur(image, sigma, radius=4):
    """Separable Gaussian blur of an (H, W, C) float tensor with a scalar sigma tensor."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / tf.maximum(sigma, 1e-3)))
    kernel = kernel / tf.reduce_sum(kernel)
    channels = tf.shape(image)[-1]
    kx = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    ky = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    batch = image[None]
    # Reflect-pad so the borders do not darken towards zero.
    batch = tf.pad(batch, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    batch = tf.nn.depthwise_conv2d(batch, kx, [1, 1, 1, 1], "VALID")
    batch = tf.nn.depthwise_conv2d(batch, ky, [1, 1, 1, 1], "VALID")
    return batch[0]


def jitter(image, seed, strength: float = 0.2):
    """Random contrast, brightness and blur of a normalised (H, W, C) image (stateless, seeded)."""
    s = float(strength)
    u = tf.random.stateless_uniform([3], seed=seed)
    contrast = 1.0 - s + 2.0 * s * u[0]
    brightness = s * (u[1] - 0.5)
    image = image * contrast + brightness
    sigma = 2.0 * s * u[2]
    return tf.cond(sigma > 0.3, lambda: _gaussian_blur(image, sigma), lambda: image)


def augmenter(mode: str = "dihedral", *, jitter_strength: float = 0.0):
    """A ``tf.data`` map function ``(image, label, seed) -> (image, label)``.

    ``seed`` is a shape-(2,) int64 tensor, e.g. from
    ``tf.data.Dataset.random(seed).batch(2)`` zipped with the examples.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {mode!r}")

    def fn(image, label, seed):
        seed = tf.cast(seed, tf.int64)
        if mode != "none":
            u = tf.random.stateless_uniform([], seed=seed)
            image = dihedral_tf(image, group_element(mode, u))
        if jitter_strength > 0:
            image = jitter(image, seed + 1, jitter_strength)
        return image, label

    return fn
