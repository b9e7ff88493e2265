"""ComfyUI's WebSocket binary frames (protocol.py, server.py v0.8.0): big-endian uint32 event type,
then the payload."""

from __future__ import annotations

import io
import json
import struct

from PIL import Image, ImageOps

from sd3fp8.workflow.spec import Preview

PREVIEW_IMAGE = 1  # uint32 image type (1 JPEG, 2 PNG) + image bytes
PREVIEW_IMAGE_WITH_METADATA = 4  # uint32 json length + JSON metadata + image bytes
_IMAGE_TYPES = {"JPEG": 1, "PNG": 2}
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}


def encode_image(preview: Preview) -> bytes:
    """The preview's picture as JPEG (quality 95) or PNG, shrunk to fit max_size. ComfyUI also
    enlarges smaller ones (a 128x128 latent preview to 512x512); the web UI scales previews to the
    node anyway, so the bytes are spared (per step: the JPEG of a 64x64 image's 8x8 latent preview
    took 15 ms at 512x512 here, a tenth of a miniature-model step)."""
    image = preview.image
    if preview.max_size is not None and max(image.size) > preview.max_size:
        image = ImageOps.contain(image, (preview.max_size, preview.max_size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    if preview.format == "PNG":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def preview_frame(preview: Preview, image_bytes: bytes) -> bytes:
    """Format 1, for clients that did not negotiate preview metadata (and script_examples,
    which strip the first 8 bytes)."""
    return struct.pack(">II", PREVIEW_IMAGE, _IMAGE_TYPES.get(preview.format, 1)) + image_bytes


def preview_frame_with_metadata(preview: Preview, image_bytes: bytes, node_id: str, prompt_id: str) -> bytes:
    """Format 4, for clients whose feature flags include supports_preview_metadata."""
    meta = json.dumps({"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id, "parent_node_id": None,
                       "real_node_id": node_id, "image_type": _MIME.get(preview.format, "image/jpeg")}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image_bytes
