"""Init images for img2img: read one safely, choose its size, turn it into VAE input.

Sizes follow the request: the image is scaled to cover width x height (Lanczos) and centre-cropped.
Without a requested size, the image's own size rounded down to multiples of 16 is used.
Files are turned upright by their EXIF orientation (as ComfyUI's LoadImage does); every mode becomes
RGB: transparency composited onto white, 16-bit and 32-bit integer modes scaled from 0..65535,
float ("F") images taken as 0..1.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from sd3fp8.engine.request import MAX_SIDE
from sd3fp8.errors import ConfigError

MAX_FILE_BYTES = 64 * 2**20  # an init image is a picture, not an archive
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # decoded size; PIL's own bomb guard warns only at 89 MP


def load_image(path: str | Path):
    """A PIL image in RGB from ``path``, or one clear error (missing, unreadable, absurd size)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"init image {path} is not a file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"init image {path} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 MP and refuses from 179 MP (a header can claim any size): ours is
            # the one limit, checked from the header before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ConfigError(f"init image {path} is {image.width}x{image.height}: more than {MAX_SIDE}x{MAX_SIDE} pixels")
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except ConfigError:  # ours (a ValueError too): not to be wrapped below
        raise
    except Image.DecompressionBombError:
        raise ConfigError(f"init image {path} is more than {MAX_SIDE}x{MAX_SIDE} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"init image {path} cannot be read as an image: {e}") from None


def to_rgb(image):
    """RGB, with transparency composited onto white (what a viewer shows); 16/32-bit integer
    grayscale scaled from 0..65535 and float grayscale from 0..1 (a plain convert would clip them)."""
    from PIL import Image

    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        scale = 255.0 if image.mode == "F" else 1 / 257  # 65535 -> 255
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def size_for(image) -> tuple[int, int]:
    """The generation size an init image implies: its own, rounded down to multiples of 16."""
    width, height = (min(MAX_SIDE, side) // 16 * 16 for side in image.size)
    if width < 16 or height < 16:
        raise ConfigError(f"init image is {image.size[0]}x{image.size[1]}: at least 16x16 pixels needed")
    return width, height


def to_pixels(image, width: int, height: int) -> torch.Tensor:
    """[1, 3, height, width] float32 in [-1, 1]: scaled to cover, centre-cropped."""
    from PIL import Image

    image = to_rgb(image)
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
