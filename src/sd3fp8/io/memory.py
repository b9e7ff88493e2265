"""Memory a model will take, estimated from its configs before anything is allocated.

Configs are input like any other: a ``config.json`` saying ``num_layers: 100000`` made diffusers
allocate until the machine swapped. Parameter counts here follow the diffusers / transformers
architectures exactly for the transformer and the text encoders (tests compare them with built
models) and closely for the VAE; bytes are a lower bound (FP8 counted as 1 byte even where
loading passes through 16 bit), so a refusal is certain, never a guess.
"""

from __future__ import annotations

import os
from pathlib import Path

from sd3fp8.errors import ResourceError


def transformer_params(c: dict) -> int:
    """Parameters and buffers of diffusers' SD3Transformer2DModel for config ``c``."""
    d, hd, p = c["num_attention_heads"] * c["attention_head_dim"], c["attention_head_dim"], c["patch_size"]
    out_ch = c.get("out_channels") or c["in_channels"]
    lin = lambda i, o: i * o + o  # noqa: E731  (a linear with bias)
    norm = {"rms_norm": hd, "layer_norm": 2 * hd, "rms_norm_across_heads": d}.get(c.get("qk_norm"), 0)
    pos = (c.get("pos_embed_max_size") or c["sample_size"] // p) ** 2 * d  # the sin-cos buffer
    total = c["in_channels"] * d * p * p + d + pos
    total += lin(256, d) + lin(d, d) + lin(c["pooled_projection_dim"], d) + lin(d, d)  # time and pooled text
    total += lin(c["joint_attention_dim"], c["caption_projection_dim"]) + lin(d, 2 * d) + lin(d, p * p * out_ch)
    for i in range(c["num_layers"]):
        last, dual = i == c["num_layers"] - 1, i in c.get("dual_attention_layers", ())
        block = lin(d, (9 if dual else 6) * d) + (lin(d, 2 * d) if last else lin(d, 6 * d))  # adaLN
        block += 7 * lin(d, d) + (0 if last else lin(d, d)) + 4 * norm  # joint attention
        block += (4 * lin(d, d) + 2 * norm) if dual else 0  # MMDiT-X second attention
        block += (lin(d, 4 * d) + lin(4 * d, d)) * (1 if last else 2)  # feed-forwards
        total += block
    return total


def clip_params(c: dict) -> int:
    """CLIPTextModelWithProjection."""
    h, f = c["hidden_size"], c["intermediate_size"]
    layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    return (c["vocab_size"] + c["max_position_embeddings"]) * h + c["num_hidden_layers"] * layer + 2 * h + h * c["projection_dim"]


def t5_params(c: dict) -> int:
    """T5EncoderModel (gated feed-forward: wi_0, wi_1, wo)."""
    d, inner = c["d_model"], c["num_heads"] * c["d_kv"]
    ff = (3 if c["feed_forward_proj"].startswith("gated") else 2) * d * c["d_ff"]
    return c["vocab_size"] * d + c["num_layers"] * (4 * d * inner + ff + 2 * d) + c["relative_attention_num_buckets"] * c["num_heads"] + d


def vae_params(c: dict) -> int:
    """AutoencoderKL, to within a few percent (3x3 convolutions dominate)."""
    chans, layers = c["block_out_channels"], c["layers_per_block"]
    resnet = lambda a, b: 9 * a * b + 9 * b * b + (a * b if a != b else 0) + 6 * b  # noqa: E731
    mid = 2 * resnet(chans[-1], chans[-1]) + 4 * chans[-1] ** 2
    total = 9 * c["in_channels"] * chans[0] + 2 * mid + 9 * chans[-1] * 2 * c["latent_channels"] + 9 * c["latent_channels"] * chans[-1]
    prev = chans[0]
    for i, ch in enumerate(chans):
        total += resnet(prev, ch) + (layers - 1) * resnet(ch, ch) + (9 * ch * ch if i < len(chans) - 1 else 0)
        total += resnet(ch, ch) * (layers + 1) + 9 * ch * ch  # decoder level (and its upsampler)
        prev = ch
    return total + 9 * chans[0] * c["out_channels"]


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup (container) limit."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(needs: dict[str, int], at_once: list[list[str]], where: str, available: int | None, labels: dict[str, str]) -> None:
    """Refuse when the largest group of components resident at once needs more than ``available``.

    ``needs``: component -> bytes (lower bound); ``at_once``: groups resident together.
    """
    if available is None:
        return
    group = max(at_once, key=lambda g: sum(needs.get(n, 0) for n in g))
    total = sum(needs.get(n, 0) for n in group)
    if total > available:
        biggest = max(group, key=lambda n: needs.get(n, 0))
        raise ResourceError(f"this model needs at least {gib(total)} of {where} memory and {gib(available)} is available "
                            f"(the largest part: {labels.get(biggest, biggest)} at {gib(needs[biggest])}): refused before loading")
