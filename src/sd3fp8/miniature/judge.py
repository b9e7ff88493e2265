"""The shape world's judge: reads an image, finds its shapes, scores adherence to a caption.

Our analogue of CLIP score (adherence in [0, 1]) and, through :func:`features`, of FID (a
Frechet distance over the judge's per-image features). Pure numpy; deterministic.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque

import numpy as np

from sd3fp8.miniature.world import BACKGROUNDS, CELL_CENTERS, COLORS, IMAGE_SIZE, Scene, parse_caption

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as a shape pixel
MIN_AREA = 12  # pixels (at 64x64); smaller blobs are noise
SMALL_LARGE_EXTENT = 19.0  # bbox side separating small (~13 px) from large (~25 px) shapes


@dataclasses.dataclass(frozen=True)
class Blob:
    kind: str
    color: str
    size: str
    cell: tuple[int, int]
    area: int
    centroid: tuple[float, float]  # (x, y) in 64x64 pixels
    rgb: tuple[float, float, float]
    fill: float  # area / bbox area
    extent: tuple[int, int]  # bbox (width, height)


@dataclasses.dataclass(frozen=True)
class Analysis:
    background: str
    background_rgb: tuple[float, float, float]
    blobs: tuple[Blob, ...]  # largest first
    foreground_share: float


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [np.linalg.norm(rgb - np.asarray(palette[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(d))]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (row, col) pixel coordinates."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append(np.asarray(pixels))
    return out


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal square, circle and upright triangle filling a height x width box."""
    yy, xx = np.mgrid[0:height, 0:width]
    u = (xx + 0.5) / width  # 0..1 across
    v = (yy + 0.5) / height  # 0..1 down
    return {
        "square": np.ones((height, width), dtype=bool),
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(u - 0.5) <= 0.5 * v,
    }


def _classify_kind(local_mask: np.ndarray) -> str:
    best, best_iou = "square", -1.0
    for kind, template in _templates(*local_mask.shape).items():
        iou = (local_mask & template).sum() / max((local_mask | template).sum(), 1)
        if iou > best_iou:
            best, best_iou = kind, iou
    return best


def _cell(x: float, y: float) -> tuple[int, int]:
    centers = np.asarray(CELL_CENTERS)
    return int(np.argmin(np.abs(centers - x))), int(np.argmin(np.abs(centers - y)))


def analyze(image: np.ndarray) -> Analysis:
    """Find the background and the shapes of a 64x64 RGB image (uint8 [H, W, 3])."""
    img = np.asarray(image, dtype=np.float64)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        img = np.asarray(
            __import__("PIL.Image", fromlist=["Image"]).fromarray(np.asarray(image, dtype=np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE)),
            dtype=np.float64,
        )
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(img - bg_rgb, axis=-1)
    mask = distance > FOREGROUND_DISTANCE
    blobs = []
    for pixels in _components(mask):
        if len(pixels) < MIN_AREA:
            continue
        rows, cols = pixels[:, 0], pixels[:, 1]
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        local = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        local[rows - r0, cols - c0] = True
        strong = distance[rows, cols] >= 0.5 * distance[rows, cols].max()  # inner pixels: colour without edge blending
        rgb = img[rows[strong], cols[strong]].mean(axis=0)
        cx, cy = cols.mean() + 0.5, rows.mean() + 0.5
        extent = (int(c1 - c0), int(r1 - r0))
        blobs.append(Blob(
            kind=_classify_kind(local), color=_nearest(rgb, COLORS),
            size="large" if max(extent) >= SMALL_LARGE_EXTENT else "small",
            cell=_cell(float((c0 + c1) / 2), float((r0 + r1) / 2)), area=len(pixels), centroid=(float(cx), float(cy)),
            rgb=tuple(float(v) for v in rgb), fill=len(pixels) / local.size, extent=extent,
        ))
    blobs.sort(key=lambda b: -b.area)
    return Analysis(_nearest(bg_rgb, BACKGROUNDS), tuple(float(v) for v in bg_rgb), tuple(blobs), float(mask.mean()))


def score_scene(analysis: Analysis, scene: Scene) -> float:
    """Share of the caption's attributes the image shows: per shape kind, colour, size and
    position; plus the background and the number of shapes."""
    n = len(scene.shapes)
    candidates = analysis.blobs[: n + 1]
    best = 0
    for chosen in itertools.permutations(range(len(candidates)), min(n, len(candidates))):
        hits = 0
        for shape, i in zip(scene.shapes, chosen):
            b = candidates[i]
            hits += (b.kind == shape.kind) + (b.color == shape.color) + (b.size == shape.size) + (b.cell == shape.cell)
        best = max(best, hits)
    total = best + (analysis.background == scene.background) + (len(analysis.blobs) == n)
    return total / (4 * n + 2)


def adherence(image: np.ndarray, caption: str) -> float:
    """Adherence in [0, 1] of ``image`` to a shape-world ``caption``."""
    return score_scene(analyze(image), parse_caption(caption))


FEATURE_NAMES = ("bg_r", "bg_g", "bg_b", "foreground", "blobs", "r", "g", "b", "area", "x", "y", "fill", "w", "h", "area2")


def features(image: np.ndarray) -> np.ndarray:
    """A 15-number description of an image for distribution distances (scaled to ~unit range)."""
    a = analyze(image)
    first = a.blobs[0] if a.blobs else None
    second_area = a.blobs[1].area if len(a.blobs) > 1 else 0
    f = [*(v / 255 for v in a.background_rgb), a.foreground_share * 4, min(len(a.blobs), 4) / 2]
    if first:
        f += [*(v / 255 for v in first.rgb), first.area / 400, first.centroid[0] / 64, first.centroid[1] / 64, first.fill,
              first.extent[0] / 32, first.extent[1] / 32]
    else:
        f += [0.0] * 9
    f.append(second_area / 400)
    return np.asarray(f, dtype=np.float64)
