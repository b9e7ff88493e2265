"""img2img on the tiny model: init images read safely (one clear error, or converted as documented in
engine/images.py), ComfyUI's partial schedule at the edges (denoise 0 and 1), every sampler, sizes."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline, cli
from sd3fp8.engine.images import load_image, size_for, to_pixels
from sd3fp8.engine.pnginfo import read_parameters
from sd3fp8.engine.request import GenerationRequest
from sd3fp8.errors import ConfigError
from sd3fp8.sampling import SAMPLER_NAMES


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second thread
    mostly spin-waits (5-20x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return SD3FP8Pipeline.from_pretrained(tiny_model, Policy(transformer="fp32"), RuntimeConfig(dtype="fp32"))


def picture(width=32, height=32) -> Image.Image:
    """A deterministic RGB picture: a gradient with a red square."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 90)], -1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (230, 20, 20)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def png_bytes(width: int, height: int, rows: bytes = b"") -> bytes:
    """A PNG whose header claims width x height (RGB, 8 bit), with `rows` as its pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# ---- reading init images ----------------------------------------------------------------------


def write_bad(kind: str, folder):
    path = folder / f"{kind}.png"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a picture")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        picture(64, 64).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "zero":
        path.write_bytes(png_bytes(0, 0))
    elif kind == "oversized":  # 25 MP: over our 4096 x 4096, under PIL's own bomb limits
        path.write_bytes(png_bytes(5000, 5000))
    elif kind == "bomb":  # 10 GP claimed by a 60-byte file: PIL refuses it before we look
        path.write_bytes(png_bytes(100_000, 100_000))
    return path


BAD = {
    "missing": "is not a file",
    "directory": "is not a file",
    "text": "cannot be read as an image",
    "empty": "cannot be read as an image",
    "truncated": "cannot be read as an image: image file is truncated",
    "zero": "cannot be read as an image",
    "oversized": "is 5000x5000: more than 4096x4096 pixels",
    "bomb": "is more than 4096x4096 pixels",
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_init_images_are_one_clear_error(kind, tmp_path):
    path = write_bad(kind, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"init image {path} ") and BAD[kind] in message
    assert message.count("init image") == 1  # not wrapped twice


@pytest.mark.parametrize("kind", ["missing", "truncated", "bomb"])
def test_bad_init_image_on_the_command_line(kind, tiny_model, tmp_path, capsys):
    path = write_bad(kind, tmp_path)
    out = tmp_path / "out.png"
    code = cli.main(["generate", "x", "--model", str(tiny_model), "--init-image", str(path), "--denoise", "0.5",
                     "--out", str(out), "--dtype", "fp32", "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and BAD[kind] in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_too_small_init_image_without_a_size(engine):
    with pytest.raises(ConfigError, match="init image is 8x40: at least 16x16 pixels needed"):
        engine("x", init_image=picture(8, 40), denoise=0.5, steps=1)


MODES = {  # how each mode is written, and the RGB its pixel (0, 0) must read as
    "L": (lambda: Image.new("L", (40, 40), 128), (128, 128, 128)),
    "1": (lambda: Image.new("1", (40, 40), 1), (255, 255, 255)),
    "P": (lambda: _palette(None), (10, 200, 30)),
    "P+transparency": (lambda: _palette(3), (255, 255, 255)),
    "RGBA opaque": (lambda: Image.new("RGBA", (40, 40), (200, 10, 10, 255)), (200, 10, 10)),
    "RGBA transparent": (lambda: Image.new("RGBA", (40, 40), (200, 10, 10, 0)), (255, 255, 255)),
    "RGBA half": (lambda: Image.new("RGBA", (40, 40), (0, 0, 0, 128)), (127, 127, 127)),
    "LA": (lambda: Image.new("LA", (40, 40), (0, 0)), (255, 255, 255)),
    "I;16": (lambda: Image.fromarray(np.full((40, 40), 128 * 257, dtype=np.uint16)), (128, 128, 128)),
    "I": (lambda: Image.new("I", (40, 40), 65535), (255, 255, 255)),
    "CMYK": (lambda: Image.new("CMYK", (40, 40), (0, 255, 255, 0)), (255, 0, 0)),
}


def _palette(transparent: int | None):
    image = Image.new("P", (40, 40), 3)
    image.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


@pytest.mark.parametrize("mode", MODES)
def test_image_modes_are_converted_to_rgb(mode, tmp_path):
    make, rgb = MODES[mode]
    path = tmp_path / {"CMYK": "image.jpg", "I": "image.tiff"}.get(mode, "image.png")
    image = make()
    image.save(path, **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 40)
    assert np.abs(np.asarray(loaded, dtype=int)[0, 0] - rgb).max() <= 2  # JPEG and compositing rounding
    # the Python API takes PIL images in any mode the same way
    pixels = to_pixels(make(), 32, 32)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1, atol=2 / 127.5)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (48, 16), (250, 0, 0))
    image.paste((0, 0, 250), (0, 0, 16, 16))  # blue on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone held upright
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (16, 48)  # upright, as ComfyUI's LoadImage and every viewer show it
    top = np.asarray(loaded, dtype=int)[2, 8]
    assert top[2] > 200 and top[0] < 50  # the stored left edge is now the top


# ---- sizes ------------------------------------------------------------------------------------


def test_size_rules():
    # no size requested: the image's own, rounded down to multiples of 16 (capped at 4096)
    assert size_for(picture(50, 37)) == (48, 32)
    assert size_for(Image.new("RGB", (5000, 20))) == (4096, 16)
    # a requested size: scaled to cover it, then centre-cropped
    halves = Image.new("RGB", (64, 32), (255, 0, 0))
    halves.paste((0, 0, 255), (32, 0, 64, 32))
    pixels = to_pixels(halves, 32, 32)  # covers at scale 1: the middle 32 columns
    assert torch.equal(pixels[0, :, :, :16].amax(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(pixels[0, :, :, 16:].amax(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]))
    assert to_pixels(picture(8, 4), 48, 16).shape == (1, 3, 16, 48)  # upscaled to cover, cropped to 48 x 16


def test_engine_takes_the_init_images_size(engine):
    request = engine.resolve(GenerationRequest("x", init_image=picture(50, 37), denoise=0.5))
    assert (request.width, request.height) == (48, 32)
    result = engine("x", init_image=picture(50, 37), denoise=0.5, steps=2, seed=1)
    assert result.images[0].size == (48, 32) and (result.parameters[0]["width"], result.parameters[0]["height"]) == (48, 32)
    explicit = engine("x", init_image=picture(50, 37), denoise=0.5, steps=2, seed=1, width=32, height=64)
    assert explicit.images[0].size == (32, 64)


# ---- the partial schedule ---------------------------------------------------------------------


def test_denoise_zero_returns_the_vae_round_trip(engine):
    init = picture()
    result = engine("a red square", init_image=init, denoise=0.0, steps=4, seed=3, batch=2, width=32, height=32)
    with torch.inference_mode():
        round_trip = engine.decode(engine.encode_image(init, 32, 32))[0]
    for image in result.images:  # nothing sampled: every image is the init image through the VAE
        assert np.array_equal(np.asarray(image), np.asarray(round_trip))
    latent = engine.generate(GenerationRequest("x", init_image=init, denoise=0.0, width=32, height=32), output="latent")
    with torch.inference_mode():
        assert torch.equal(latent.images[0], engine.encode_image(init, 32, 32)[0])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "uni_pc"])
def test_denoise_one_is_txt2img(engine, sampler):
    options = dict(steps=3, seed=5, cfg=3.0, width=32, height=32, sampler=sampler)
    img2img = engine("a blue circle", init_image=picture(), denoise=1.0, **options)
    txt2img = engine("a blue circle", **options)
    # sigma0 = 1: x = 1 * noise + 0 * latent, the init image has no say
    assert np.array_equal(np.asarray(img2img.images[0]), np.asarray(txt2img.images[0]))


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_img2img_runs_for_every_sampler(engine, sampler):
    init = picture()
    request = GenerationRequest("a red square", steps=2, seed=2, width=32, height=32, sampler=sampler, denoise=0.5,
                                init_image=init)  # fmt: skip
    seen = []
    out = engine.generate(request, seen.append, output="latent").images[0]
    assert [s["step"] for s in seen] == [1, 2] and seen[0]["total"] == 2
    assert seen[0]["sigma"] < 1.0  # the partial schedule: it starts part-way down
    assert out.shape == (16, 16, 16) and torch.isfinite(out).all()
    with torch.inference_mode():
        start = engine.encode_image(init, 32, 32)[0]
    assert not torch.equal(out, start)


def test_img2img_on_the_command_line_and_from_png(tiny_model, tmp_path, capsys):
    init, a, b = tmp_path / "init.png", tmp_path / "a.png", tmp_path / "b.png"
    picture(40, 40).convert("P").save(init)  # a palette PNG, resized to cover 32 x 32
    common = ["--model", str(tiny_model), "--dtype", "fp32", "-q"]
    code = cli.main(["generate", "a red square", "--init-image", str(init), "--denoise", "0.6", "--steps", "3",
                     "--width", "32", "--height", "32", "--sampler", "Euler a", "--seed", "9", "--out", str(a), *common])  # fmt: skip
    assert code == 0
    params = read_parameters(a)
    assert (params["denoise"], params["sampler"], params["init_image"]) == (0.6, "euler_ancestral", str(init.resolve()))
    assert Image.open(a).size == (32, 32)
    assert cli.main(["generate", "--from-png", str(a), "--out", str(b), *common]) == 0  # init image and all
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    capsys.readouterr()
    assert cli.main(["generate", "x", "--denoise", "0.5", *common]) == 2
    assert "--denoise below 1 needs --init-image" in capsys.readouterr().err
