"""A procedural, captioned picture world: one or two flat shapes on a plain background.

Every scene is deterministic from a seed, renders to a 64x64 RGB image, and has a natural caption
("a small red circle in the top left on a white background") that :func:`parse_caption` reads
back. A fixed share of single-shape scenes is held out: training never sees them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": 7.0, "large": 13.0}  # shape "radius" in pixels
# 3x3 grid: (column, row) -> phrase; cell centres at 14, 32, 50 px
POSITIONS = {
    (0, 0): "in the top left", (1, 0): "at the top", (2, 0): "in the top right",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "in the bottom left", (1, 2): "at the bottom", (2, 2): "in the bottom right",
}
CELL_CENTERS = (14.0, 32.0, 50.0)
HELDOUT_SHARE = 0.1  # of single-shape scenes, chosen by a hash of the caption
WORLD_WORDS = tuple(
    sorted({w for phrase in POSITIONS.values() for w in phrase.split()}
           | set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(SIZES) | {"a", "and", "background"})
)


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    cell: tuple[int, int]  # (column, row) in the 3x3 grid

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.kind} {POSITIONS[self.cell]}"


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str

    def caption(self) -> str:
        return " and ".join(s.phrase() for s in self.shapes) + f" on a {self.background} background"


_PHRASE = re.compile(
    rf"a (?P<size>{'|'.join(SIZES)}) (?P<color>{'|'.join(COLORS)}) (?P<kind>{'|'.join(SHAPES)}) "
    rf"(?P<pos>{'|'.join(POSITIONS.values())})"
)
_CELL_OF = {phrase: cell for cell, phrase in POSITIONS.items()}


def parse_caption(text: str) -> Scene:
    """Read a caption of this world back into a Scene; ValueError if it is not one."""
    text = text.strip().lower()
    match = re.fullmatch(r"(?P<objects>.+) on a (?P<bg>\w+) background", text)
    if not match or match["bg"] not in BACKGROUNDS:
        raise ValueError(f"not a caption of the shape world: {text!r}")
    shapes = []
    for part in match["objects"].split(" and "):
        m = _PHRASE.fullmatch(part)
        if not m:
            raise ValueError(f"not a shape phrase of the shape world: {part!r}")
        shapes.append(Shape(m["kind"], m["color"], m["size"], _CELL_OF[m["pos"]]))
    return Scene(tuple(shapes), match["bg"])


def is_heldout(scene: Scene) -> bool:
    """Held-out scenes are a fixed ~10 % of single-shape captions (stable hash, not Python's)."""
    if len(scene.shapes) != 1:
        return False
    digest = hashlib.sha256(scene.caption().encode()).digest()
    return digest[0] < 256 * HELDOUT_SHARE


def _far_apart(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Two shapes need cells two apart in some direction so that large shapes never touch."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2


def random_scene(rng: random.Random, two_shape_share: float = 0.3) -> Scene:
    def shape(cell):
        return Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), cell)

    cells = list(POSITIONS)
    first = shape(rng.choice(cells))
    shapes = [first]
    far = [c for c in cells if _far_apart(c, first.cell)]  # none for the centre cell
    if rng.random() < two_shape_share and far:
        second = shape(rng.choice(far))
        while second.color == first.color:  # two shapes of one colour would be hard to tell apart
            second = dataclasses.replace(second, color=rng.choice(list(COLORS)))
        shapes.append(second)
    return Scene(tuple(shapes), rng.choice(list(BACKGROUNDS)))


def training_scene(rng: random.Random) -> Scene:
    """A random scene that is never a held-out one."""
    while True:
        scene = random_scene(rng)
        if not is_heldout(scene):
            return scene


def heldout_scenes() -> list[Scene]:
    """Every held-out single-shape scene, in a fixed order."""
    out = []
    for bg in BACKGROUNDS:
        for kind in SHAPES:
            for color in COLORS:
                for size in SIZES:
                    for cell in POSITIONS:
                        scene = Scene((Shape(kind, color, size, cell),), bg)
                        if is_heldout(scene):
                            out.append(scene)
    return out


def calibration_prompts(n: int = 32, seed: int = 1234) -> list[str]:
    """Captions of training-distribution scenes (never held-out ones) for calibration, deterministic."""
    rng = random.Random(seed)
    return [training_scene(rng).caption() for _ in range(n)]


def heldout_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` held-out captions (all of them when None), a deterministic sample."""
    scenes = heldout_scenes()
    if n is not None:
        scenes = random.Random(seed).sample(scenes, min(n, len(scenes)))
    return [s.caption() for s in scenes]


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | tuple[float, ...]:
    if kind == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if kind == "square":
        h = r * 0.9
        return (cx - h, cy - h, cx + h, cy + h)
    return [(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)]  # upright triangle


def render(scene: Scene, seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` at 4x and downsample (anti-aliased edges); a seed jitters positions and sizes slightly."""
    rng = random.Random(seed)
    ss = 4
    canvas = Image.new("RGB", (size * ss, size * ss), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    k = size / IMAGE_SIZE * ss
    for shape in scene.shapes:
        cx = CELL_CENTERS[shape.cell[0]] + rng.uniform(-2, 2)
        cy = CELL_CENTERS[shape.cell[1]] + rng.uniform(-2, 2)
        r = SIZES[shape.size] * rng.uniform(0.92, 1.08)
        outline = _outline(shape.kind, cx * k, cy * k, r * k)
        if shape.kind == "circle":
            draw.ellipse(outline, fill=COLORS[shape.color])
        elif shape.kind == "square":
            draw.rectangle(outline, fill=COLORS[shape.color])
        else:
            draw.polygon(outline, fill=COLORS[shape.color])
    return canvas.resize((size, size), Image.Resampling.BOX)


def sample(index: int, base_seed: int = 0) -> tuple[np.ndarray, str]:
    """Training example ``index``: (image [64, 64, 3] uint8, caption), deterministic."""
    rng = random.Random(f"{base_seed}:{index}")
    scene = training_scene(rng)
    return np.asarray(render(scene, seed=rng.randrange(2**31))), scene.caption()
