"""Morphometrics of digit images, after Morpho-MNIST (Castro et al. 2019): slant, thickness, width.

Pure functions on (N, H, W) image arrays, built on scikit-image. Each image is upsampled
UPSAMPLE times (bilinear) and binarised at half of full scale; all three properties are then
read from that ink mask:

- slant (radians): arctan(-shear), where shear = mu11 / mu02 is how many columns the ink's
  centre moves per row downwards (mu: central moments of the ink mask, x = column, y = row).
  Positive: the top of the digit leans right, as in italics; a vertical bar sheared so that
  its top moves right by tan(a) per unit of height has slant a.
- thickness (pixels of the input image): the mean stroke width, twice the mean Euclidean
  distance from the ink's skeleton (skimage's thinning) to the nearest background pixel, as
  Morpho-MNIST. Ink area over skeleton pixels would read a diagonal stroke up to √2 too thick
  and short strokes too thick (their skeleton stops short of their ends).
- width (pixels of the input image): the horizontal extent of the ink once the slant is
  sheared away (x - shear·(y - centre)), between its WIDTH_TRIM and 1 - WIDTH_TRIM quantiles
  so that a few stray pixels do not count, plus one pixel (a single column is 1 wide).

A blank image (no pixel reaches the threshold) has no morphology: its row is all NaN.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import measure, morphology, transform

from harness.metric_names import PROPERTIES  # the columns of `measure_digits`, in this order

INK_THRESHOLD = 0.5  # ink: intensity >= half of full scale (uint8: >= 127.5 / 255)
# Measured on a 2x bilinear upsampling: at 28x28 a binarised stroke is a whole number of pixels
# wide, so thickness and width would move in 1-pixel steps; 2x halves the step for ~0.5 ms an
# image (benchmarks/README.md). Morpho-MNIST upsamples 4x, which cost ~2.5x more in a trial here.
UPSAMPLE = 2
WIDTH_TRIM = 0.01  # the ink left out on each side of the width (Morpho-MNIST: 2 % in all)


def intensities(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 in [0, 255] or float in [0, 1] -> (N, H, W) float64 in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W), got {images.shape}")
    if images.dtype == np.uint8:
        return images / 255.0
    if np.issubdtype(images.dtype, np.floating):
        return images.astype(np.float64)
    raise TypeError(f"expected uint8 or float images, got {images.dtype}")


def ink_mask(intensity: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (UPSAMPLE·H, UPSAMPLE·W) bool, True where there is ink."""
    upsampled = transform.rescale(intensity, UPSAMPLE, order=1, mode="edge", anti_aliasing=False)
    return upsampled >= INK_THRESHOLD


def measure_ink(ink: np.ndarray) -> tuple[float, float, float]:
    """(h, w) bool ink mask at UPSAMPLE resolution -> (slant, thickness, width) as in PROPERTIES;
    all NaN when there is no ink."""
    if not ink.any():
        return (np.nan, np.nan, np.nan)
    mu = measure.moments_central(ink, order=2)  # mu[i, j] = sum of (row - r̄)^i (col - c̄)^j over ink
    # A single row of ink has no vertical extent to lean along: no shear.
    shear = mu[1, 1] / mu[2, 0] if mu[2, 0] > 0 else 0.0
    slant = float(np.arctan(-shear))  # rows grow downwards: leaning right is a negative shear

    skeleton = morphology.skeletonize(ink)  # never empty: thinning keeps every blob
    distance = ndimage.distance_transform_edt(ink)  # (h, w) to the nearest background pixel
    thickness = 2.0 * float(distance[skeleton].mean()) / UPSAMPLE

    rows, cols = np.nonzero(ink)
    upright = cols - shear * (rows - rows.mean())  # the column each ink pixel has once de-slanted
    left, right = np.quantile(upright, [WIDTH_TRIM, 1.0 - WIDTH_TRIM])
    width = float(right - left + 1.0) / UPSAMPLE
    return slant, thickness, width


def measure_digits(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 in [0, 255] or float in [0, 1] -> (N, 3) float64, columns PROPERTIES:
    slant in radians (positive leans right), thickness and width in input pixels; NaN rows for
    blank images."""
    rows = [measure_ink(ink_mask(intensity)) for intensity in intensities(images)]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(PROPERTIES))
