"""A procedural, captioned picture world: one or two flat shapes on a plain background.

Every scene is deterministic from a seed and renders to a 64x64 RGB image. A caption states some
of a scene: always each shape's kind and colour, optionally its size and position and the
background (exactly, "on a light blue background", or only its colour, "on a blue background"),
in a few word orders ("a red circle at the top", "at the top, a red circle", "on a white
background, a red circle"). What a caption leaves out, the scene may have any valid value of.
:func:`parse_caption` reads a caption back into what it states (a :class:`Caption`).

A fixed share of single-shape captions is held out, full ones and partial ones: training never
sees them, in any word order, and never renders a scene whose full caption is held out.
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
TONES = ("light", "dark")
# Neutral backgrounds, and each shape colour in a light and a dark tone (never under a shape of its
# own colour). Chosen so that every shape colour is >= 85 RGB units from every background it can
# lie on and backgrounds are >= 50 apart from each other.
BACKGROUNDS = {
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
    "light red": (250, 160, 170), "dark red": (120, 20, 25),
    "light green": (165, 230, 165), "dark green": (20, 90, 35),
    "light blue": (165, 200, 250), "dark blue": (20, 35, 120),
    "light yellow": (250, 245, 160), "dark yellow": (120, 115, 0),
    "light purple": (215, 175, 240), "dark purple": (80, 25, 100),
    "light orange": (252, 200, 130), "dark orange": (150, 70, 0),
}
SIZES = {"small": 7.0, "large": 13.0}  # shape "radius" in pixels
# 3x3 grid: (column, row) -> phrase; cell centres at 14, 32, 50 px
POSITIONS = {
    (0, 0): "in the top left", (1, 0): "at the top", (2, 0): "in the top right",
    (0, 1): "on the left", (1, 1): "in the center", (2, 1): "on the right",
    (0, 2): "in the bottom left", (1, 2): "at the bottom", (2, 2): "in the bottom right",
}
CELL_CENTERS = (14.0, 32.0, 50.0)
HELDOUT_SHARE = 0.1  # of single-shape captions (full and partial), chosen by a hash of the caption
WORLD_WORDS = tuple(
    sorted({w for phrase in [*POSITIONS.values(), *BACKGROUNDS] for w in phrase.split()}
           | set(SHAPES) | set(COLORS) | set(SIZES) | {"a", "an", "and", "on", "background"})
)

# How training captions are drawn from a scene (each shape, then the background).
STATE_SIZE = 0.65  # the size is stated
STATE_POSITION = 0.65  # the position is stated
POSITION_FIRST = 0.35  # a stated position comes first: "at the top, a red circle"
BACKGROUND_EXACT, BACKGROUND_COLOR = 0.5, 0.25  # coloured background: "light blue" / "blue" / omitted
NEUTRAL_STATED = 0.75  # white, black, gray: stated / omitted
BACKGROUND_FIRST = 0.2  # a stated background comes first: "on a white background, a red circle"
FULL_STOP = 0.1  # the caption ends with "."


def family(background: str) -> str:
    """The colour a background name is a tone of ("light red" -> "red"); neutral ones are their own."""
    return background.split()[-1]


def fits(color: str, background: str) -> bool:
    """Whether a shape of ``color`` may lie on ``background`` (never on a tone of its own colour)."""
    return family(background) != color


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    cell: tuple[int, int]  # (column, row) in the 3x3 grid


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str  # a BACKGROUNDS name

    def statement(self) -> Caption:
        """The full caption: everything stated."""
        return Caption(tuple(ShapeSpec(s.kind, s.color, s.size, s.cell) for s in self.shapes), self.background)

    def caption(self) -> str:
        """The full caption in the canonical word order."""
        return self.statement().text()


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """What a caption states about one shape: kind and colour always, size and cell optionally."""

    kind: str
    color: str
    size: str | None = None
    cell: tuple[int, int] | None = None

    def phrase(self, position_first: bool = False) -> str:
        words = [w for w in (self.size, self.color, self.kind) if w]
        core = f"{_article(words[0])} {' '.join(words)}"
        if self.cell is None:
            return core
        return f"{POSITIONS[self.cell]}, {core}" if position_first else f"{core} {POSITIONS[self.cell]}"


@dataclasses.dataclass(frozen=True)
class Caption:
    """What a caption states (word order aside): the shapes, and the background as a BACKGROUNDS
    name ("light blue"), only a colour ("blue": its light or dark tone), or None (any)."""

    shapes: tuple[ShapeSpec, ...]
    background: str | None = None

    @property
    def full(self) -> bool:
        """Every size, position and the exact background stated."""
        return (self.background in BACKGROUNDS
                and all(s.size is not None and s.cell is not None for s in self.shapes))

    def text(self, position_first: tuple[bool, ...] | bool = False, background_first: bool = False) -> str:
        """The caption in a word order (default: the canonical one, positions and background last)."""
        if isinstance(position_first, bool):
            position_first = (position_first,) * len(self.shapes)
        objects = " and ".join(s.phrase(first) for s, first in zip(self.shapes, position_first))
        if self.background is None:
            return objects
        background = f"on {_article(self.background)} {self.background} background"
        return f"{background}, {objects}" if background_first else f"{objects} {background}"

    def key(self) -> str:
        """The canonical text: the same for every word order."""
        return self.text()

    def heldout_text(self) -> str:
        """This caption in a word order fixed by its hash (how the held-out prompts are written)."""
        digest = hashlib.sha256(("order:" + self.key()).encode()).digest()
        return self.text(tuple(b < 256 * POSITION_FIRST for b in digest[: len(self.shapes)]),
                         digest[4] < 256 * BACKGROUND_FIRST)


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_CORE = (rf"an? (?:(?P<size>{_alternatives(SIZES)}) )?(?P<color>{_alternatives(COLORS)}) "
         rf"(?P<kind>{_alternatives(SHAPES)})")
_POSITION = rf"(?P<pos>{_alternatives(POSITIONS.values())})"
_PHRASE_POSITION_LAST = re.compile(rf"{_CORE}(?: {_POSITION})?")
_PHRASE_POSITION_FIRST = re.compile(rf"{_POSITION}, {_CORE}")
_BACKGROUND = rf"on an? (?P<bg>{_alternatives([*BACKGROUNDS, *COLORS])}) background"
_BACKGROUND_LAST = re.compile(rf"(?P<objects>.+) {_BACKGROUND}")
_BACKGROUND_FIRST = re.compile(rf"{_BACKGROUND}, (?P<objects>.+)")
_CELL_OF = {phrase: cell for cell, phrase in POSITIONS.items()}


def parse_caption(text: str) -> Caption:
    """Read a caption of this world back into what it states; ValueError if it is not one.
    Case, surrounding spaces and a final full stop do not matter."""
    text = " ".join(text.strip().lower().removesuffix(".").split())
    background, objects = None, text
    match = _BACKGROUND_FIRST.fullmatch(text) or _BACKGROUND_LAST.fullmatch(text)
    if match:
        background, objects = match["bg"], match["objects"]
    shapes = []
    for part in objects.split(" and "):
        m = _PHRASE_POSITION_LAST.fullmatch(part) or _PHRASE_POSITION_FIRST.fullmatch(part)
        if not m:
            raise ValueError(f"not a caption of the shape world: {text!r} ({part!r} is no shape phrase)")
        shapes.append(ShapeSpec(m["kind"], m["color"], m["size"], _CELL_OF[m["pos"]] if m["pos"] else None))
    if len(shapes) > 2:
        raise ValueError(f"not a caption of the shape world: {text!r} (more than two shapes)")
    return Caption(tuple(shapes), background)


def is_heldout(caption: Caption | Scene) -> bool:
    """Held-out captions: a fixed ~10 % of the single-shape ones, full or partial, by a stable hash
    of what they state (every word order of a held-out caption is held out)."""
    if isinstance(caption, Scene):
        caption = caption.statement()
    if len(caption.shapes) != 1:
        return False
    digest = hashlib.sha256(caption.key().encode()).digest()
    return digest[0] < 256 * HELDOUT_SHARE


def _far_apart(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Two shapes need cells two apart in some direction so that large shapes never touch."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2


def realize(caption: Caption, rng: random.Random) -> Scene:
    """A scene that shows ``caption``: what it leaves out drawn at random among valid values."""
    shapes = []
    for spec in caption.shapes:
        taken = [s.cell for s in shapes]
        cells = [c for c in POSITIONS if all(_far_apart(c, t) for t in taken)] or list(POSITIONS)
        shapes.append(Shape(spec.kind, spec.color, spec.size or rng.choice(list(SIZES)),
                            spec.cell if spec.cell is not None else rng.choice(cells)))
    if caption.background in BACKGROUNDS:
        background = caption.background
    else:
        allowed = [b for b in BACKGROUNDS if all(fits(s.color, b) for s in shapes)]
        if caption.background is not None:  # only the colour stated: either tone
            allowed = [b for b in allowed if family(b) == caption.background] or [f"{t} {caption.background}" for t in TONES]
        background = rng.choice(allowed)
    return Scene(tuple(shapes), background)


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
    backgrounds = [b for b in BACKGROUNDS if all(fits(s.color, b) for s in shapes)]
    return Scene(tuple(shapes), rng.choice(backgrounds))


def describe(scene: Scene, rng: random.Random) -> str:
    """A random caption of ``scene`` as training sees them: parts left out, word order varied."""
    specs = tuple(ShapeSpec(s.kind, s.color, s.size if rng.random() < STATE_SIZE else None,
                            s.cell if rng.random() < STATE_POSITION else None) for s in scene.shapes)
    u = rng.random()
    if family(scene.background) in COLORS:
        background = (scene.background if u < BACKGROUND_EXACT
                      else family(scene.background) if u < BACKGROUND_EXACT + BACKGROUND_COLOR else None)
    else:
        background = scene.background if u < NEUTRAL_STATED else None
    order = tuple(rng.random() < POSITION_FIRST for _ in specs)
    text = Caption(specs, background).text(order, rng.random() < BACKGROUND_FIRST)
    return text + "." if rng.random() < FULL_STOP else text


def training_scene(rng: random.Random) -> Scene:
    """A random scene whose full caption is not held out."""
    while True:
        scene = random_scene(rng)
        if not is_heldout(scene):
            return scene


def training_caption(scene: Scene, rng: random.Random) -> str:
    """A random caption of ``scene`` that is not held out."""
    while True:
        text = describe(scene, rng)
        if not is_heldout(parse_caption(text)):
            return text


def single_shape_captions() -> list[Caption]:
    """Every single-shape caption (what it states), in a fixed order."""
    out = []
    for kind in SHAPES:
        for color in COLORS:
            backgrounds = [None, *(b for b in BACKGROUNDS if fits(color, b)), *(c for c in COLORS if c != color)]
            for size in (None, *SIZES):
                for cell in (None, *POSITIONS):
                    for background in backgrounds:
                        out.append(Caption((ShapeSpec(kind, color, size, cell),), background))
    return out


def heldout_captions(kind: str = "full") -> list[Caption]:
    """Every held-out caption of ``kind``: "full" (size, position and exact background stated),
    "partial" (something left out) or "all", in a fixed order."""
    if kind not in ("full", "partial", "all"):
        raise ValueError(f"kind must be full, partial or all, got {kind!r}")
    held = [c for c in single_shape_captions() if is_heldout(c)]
    return held if kind == "all" else [c for c in held if c.full == (kind == "full")]


def heldout_scenes() -> list[Scene]:
    """The scenes of every held-out full caption, in a fixed order: training never renders them."""
    return [Scene((Shape(s.kind, s.color, s.size, s.cell),), c.background) for c in heldout_captions("full")
            for s in c.shapes]


def heldout_prompts(n: int | None = None, seed: int = 0, kind: str = "full") -> list[str]:
    """``n`` held-out captions of ``kind`` (all of them when None), a deterministic sample, each in
    the word order its hash picks."""
    captions = heldout_captions(kind)
    if n is not None:
        captions = random.Random(seed).sample(captions, min(n, len(captions)))
    return [c.heldout_text() for c in captions]


def calibration_prompts(n: int = 32, seed: int = 1234) -> list[str]:
    """Captions as training sees them (never held-out ones) for calibration, deterministic."""
    rng = random.Random(seed)
    return [training_caption(training_scene(rng), rng) for _ in range(n)]


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | tuple[float, ...]:
    if kind == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if kind == "square":
        h = r * 0.9
        return (cx - h, cy - h, cx + h, cy + h)
    return [(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)]  # upright triangle


def render(scene: Scene | Caption, seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` at 4x and downsample (anti-aliased edges); a seed jitters positions and sizes
    slightly, and picks what a Caption leaves out."""
    rng = random.Random(seed)
    if isinstance(scene, Caption):
        scene = realize(scene, rng)
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


def example(index: int, base_seed: int = 0, captions: int = 1) -> tuple[np.ndarray, list[str]]:
    """Training example ``index``: (image [64, 64, 3] uint8, ``captions`` random captions of it),
    deterministic; never a held-out scene or caption."""
    rng = random.Random(f"{base_seed}:{index}")
    scene = training_scene(rng)
    image = np.asarray(render(scene, seed=rng.randrange(2**31)))
    return image, [training_caption(scene, rng) for _ in range(captions)]


def sample(index: int, base_seed: int = 0) -> tuple[np.ndarray, str]:
    """Training example ``index`` with one caption: (image [64, 64, 3] uint8, caption)."""
    image, (caption,) = example(index, base_seed)
    return image, caption
