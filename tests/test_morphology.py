"""Morphometrics on synthetic digits whose slant, thickness and width are known, on the extremes,
and on the bundled real MNIST test split."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage import draw, transform

from harness.data import bundled_mnist_folder, read_split_folder
from harness.metric_names import PROPERTIES
from harness.morphology import measure_digits

SIZE = 28
SUPERSAMPLE = 8  # shapes are drawn at 8x and averaged down: grey edges as in MNIST's anti-aliasing
SLANT, THICKNESS, WIDTH = (PROPERTIES.index(name) for name in ("slant", "thickness", "width"))
# Binarised at 2x, an axis-aligned edge moves in half-pixel steps: a rendered stroke measures up to
# ~0.6 px off its true thickness (strokes of 1.5-4.5 px); 0.75 px is the bound stated and tested.
PIXEL_TOLERANCE = 0.75


def render(vertices: list[tuple[float, float]]) -> np.ndarray:
    """A filled polygon, vertices (row, col) in pixel units (edges at integers) -> (28, 28) float
    in [0, 1], each pixel the fraction of it the polygon covers."""
    rows, cols = (np.array(axis) * SUPERSAMPLE for axis in zip(*vertices, strict=True))
    fine = np.zeros((SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE))
    fine[draw.polygon(rows, cols, shape=fine.shape)] = 1.0
    return transform.downscale_local_mean(fine, (SUPERSAMPLE, SUPERSAMPLE))


def sheared_box(width: float, height: float, angle: float) -> np.ndarray:
    """A width x height box centred in the image, sheared so that its top moves right by
    tan(angle) per unit of height: a digit slanted by `angle` (radians, positive leans right)."""
    top, bottom = SIZE / 2 - height / 2, SIZE / 2 + height / 2
    shift = math.tan(angle) * height / 2
    left, right = SIZE / 2 - width / 2, SIZE / 2 + width / 2
    return render([(top, left + shift), (top, right + shift), (bottom, right - shift), (bottom, left - shift)])


def stroke(start: tuple[float, float], end: tuple[float, float], thickness: float) -> np.ndarray:
    """A straight stroke of the given thickness (perpendicular to it) between two (row, col) points."""
    (r0, c0), (r1, c1) = start, end
    length = math.hypot(r1 - r0, c1 - c0)
    dr, dc = (c1 - c0) / length * thickness / 2, -(r1 - r0) / length * thickness / 2  # half the normal
    return render([(r0 + dr, c0 + dc), (r1 + dr, c1 + dc), (r1 - dr, c1 - dc), (r0 - dr, c0 - dc)])


def ring(radius: float, thickness: float) -> np.ndarray:
    """A '0' with no stroke ends: the ring between radius ± thickness/2 around the centre."""
    fine = np.zeros((SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE))
    centre = (SIZE * SUPERSAMPLE / 2, SIZE * SUPERSAMPLE / 2)
    fine[draw.disk(centre, (radius + thickness / 2) * SUPERSAMPLE, shape=fine.shape)] = 1.0
    fine[draw.disk(centre, (radius - thickness / 2) * SUPERSAMPLE, shape=fine.shape)] = 0.0
    return transform.downscale_local_mean(fine, (SUPERSAMPLE, SUPERSAMPLE))


def test_shape_and_column_order() -> None:
    assert PROPERTIES == ("slant", "thickness", "width")
    properties = measure_digits(np.stack([sheared_box(4, 18, 0.0)] * 3))
    assert properties.shape == (3, 3) and properties.dtype == np.float64
    assert measure_digits(np.zeros((0, SIZE, SIZE))).shape == (0, 3)


def test_slant_of_a_sheared_bar_recovers_the_angle() -> None:
    angles = np.radians([-40, -30, -20, -10, -5, 0, 5, 10, 20, 30, 40])
    slants = measure_digits(np.stack([sheared_box(3, 18, a) for a in angles]))[:, SLANT]
    assert np.sign(slants[angles != 0]).tolist() == np.sign(angles[angles != 0]).tolist()
    assert np.all(np.diff(slants) > 0)  # same order as the angles
    assert slants == pytest.approx(angles, abs=math.radians(1.0))


def test_a_forward_slash_leans_right_by_45_degrees() -> None:
    slash = stroke((22, 6), (6, 22), 2.0)  # bottom-left to top-right, like '/'
    backslash = stroke((6, 6), (22, 22), 2.0)
    slants = measure_digits(np.stack([slash, backslash]))[:, SLANT]
    assert slants == pytest.approx([math.pi / 4, -math.pi / 4], abs=math.radians(1.0))


@pytest.mark.parametrize("thickness", [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5])
def test_thickness_of_strokes_at_several_angles(thickness: float) -> None:
    shapes = [
        stroke((5, 14), (23, 14), thickness),  # vertical
        stroke((14, 4), (14, 24), thickness),  # horizontal
        stroke((6, 6), (22, 22), thickness),  # diagonal
        stroke((8, 4), (20, 24), thickness),  # shallow
        stroke((5, 11), (23, 17), thickness),  # a slanted '1'
        ring(8, thickness),  # a '0'
    ]
    measured = measure_digits(np.stack(shapes))[:, THICKNESS]
    assert measured == pytest.approx(np.full(len(shapes), thickness), abs=PIXEL_TOLERANCE)


def test_thickness_grows_with_the_stroke_in_quarter_pixel_steps() -> None:
    thicknesses = np.arange(1.5, 4.75, 0.25)
    measured = measure_digits(np.stack([ring(8, t) for t in thicknesses]))[:, THICKNESS]
    assert np.all(np.diff(measured) > 0)


@pytest.mark.parametrize("width", [4.0, 8.0, 12.0, 16.0])
def test_width_of_slanted_boxes_once_the_slant_is_removed(width: float) -> None:
    angles = np.radians([-25, -10, 0, 10, 25])
    measured = measure_digits(np.stack([sheared_box(width, 14, a) for a in angles]))
    assert measured[:, WIDTH] == pytest.approx(np.full(len(angles), width), abs=PIXEL_TOLERANCE)
    assert measured[:, SLANT] == pytest.approx(angles, abs=math.radians(1.0))


def test_width_ignores_a_stray_pixel() -> None:
    box = sheared_box(6, 18, 0.0)
    stray = box.copy()
    stray[14, 26] = 1.0  # one speck far right of the digit, level with its centre (no shear)
    widths = measure_digits(np.stack([box, stray]))[:, WIDTH]
    assert widths[1] == pytest.approx(widths[0], abs=0.25)  # untrimmed, it would span 15 px


def test_a_blank_image_measures_nan_and_leaves_the_others_alone() -> None:
    faint = np.full((SIZE, SIZE), 0.49)  # grey everywhere, but nowhere half of full scale
    images = np.stack([np.zeros((SIZE, SIZE)), faint, sheared_box(4, 18, 0.2)])
    properties = measure_digits(images)
    assert np.isnan(properties[:2]).all()
    assert np.isfinite(properties[2]).all()


def test_uint8_and_float_images_measure_alike() -> None:
    images = np.stack([sheared_box(5, 18, 0.3), ring(7, 2.5), stroke((6, 6), (22, 22), 3.0)])
    as_bytes = np.round(images * 255).astype(np.uint8)
    assert measure_digits(as_bytes) == pytest.approx(measure_digits(images), abs=1e-6)
    assert measure_digits(images.astype(np.float32)) == pytest.approx(measure_digits(images), abs=1e-6)


def test_a_single_pixel_of_ink_is_measured() -> None:
    dot = np.zeros((1, SIZE, SIZE), dtype=np.uint8)
    dot[0, 14, 14] = 255
    slant, thickness, width = measure_digits(dot)[0]
    assert slant == 0.0
    assert 0.5 <= thickness <= 1.5 and 0.5 <= width <= 1.5


def test_wrong_shapes_and_types_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        measure_digits(np.zeros((SIZE, SIZE)))
    with pytest.raises(TypeError, match="uint8 or float"):
        measure_digits(np.zeros((1, SIZE, SIZE), dtype=np.int64))


@pytest.fixture(scope="module")
def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled MNIST test split: (1996, 3) properties and (1996,) labels."""
    data = read_split_folder(bundled_mnist_folder(), "bundled-10k")
    assert data is not None
    return measure_digits(data.test_images.numpy()), data.test_labels.numpy()


def test_real_digits_fall_in_plausible_ranges(real_digits: tuple[np.ndarray, np.ndarray]) -> None:
    properties, _ = real_digits
    assert np.isfinite(properties).all()  # every MNIST digit has ink
    slant, thickness, width = properties.T
    assert np.mean(np.abs(slant) < math.radians(45)) > 0.98
    assert np.mean((thickness > 1.0) & (thickness < 6.0)) > 0.98  # pen strokes, 1-6 px on a 20x20 digit
    assert np.mean((width > 2.0) & (width < 24.0)) > 0.98


def test_real_ones_are_the_narrowest_digits(real_digits: tuple[np.ndarray, np.ndarray]) -> None:
    properties, labels = real_digits
    mean_width = [properties[labels == digit, WIDTH].mean() for digit in range(10)]
    assert mean_width[1] < 0.5 * mean_width[0]
    assert min(mean_width) == mean_width[1]  # a '1' is the narrowest digit
