"""The hostile-input contract and the files it is tried on.

Every refusal must: exit non-zero, print exactly one line on stderr naming the problem, print no
traceback, leave no output or partial file behind, and leave every source byte-identical.
:func:`refused` drives the real CLI in-process and checks all five; :func:`refused_subprocess`
does the same through ``python -m sd3fp8.cli``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sd3fp8 import cli
from sd3fp8.io.detection import COMPONENT_PREFIXES
from sd3fp8.io.layouts import MMDIT_PREFIX, diffusers_state_to_original


def tree_digest(*roots) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (files or folders), hidden files included."""
    out = {}
    for root in map(Path, roots):
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def listing(*folders) -> set[str]:
    """Every path under ``folders`` (partial files are hidden: ``rglob`` sees them)."""
    return {str(p) for f in map(Path, folders) if f.is_dir() for p in f.rglob("*")}


def check_contract(code, out: str, err: str, expect, digest_before: dict, sources, listing_before: set, outputs) -> str:
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    lines = err.splitlines()
    assert code not in (0, None), f"exit code {code}; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert len(lines) == 1, f"expected one error line, got {len(lines)}: {err!r}"
    line = lines[0]
    assert line.startswith("sd3fp8") and ("error:" in line or "interrupted" in line), line
    for text in expect:
        assert text in line, f"{text!r} not in {line!r}"
    assert tree_digest(*sources) == digest_before, "a source changed"
    assert listing(*outputs) == listing_before, f"new files: {sorted(listing(*outputs) - listing_before)}"
    return line


def refused(capsys, argv, expect, sources=(), outputs=(), code: int | None = 2) -> str:
    """Run ``sd3fp8 argv`` in-process; assert the contract (and the exit code, unless None)."""
    digest, names = tree_digest(*sources), listing(*outputs)
    try:
        rc = cli.main([a if isinstance(a, str) else str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    line = check_contract(rc, out, err, expect, digest, sources, names, outputs)
    if code is not None:
        assert rc == code, line
    return line


def refused_subprocess(argv, expect, sources=(), outputs=(), cwd=None) -> str:
    digest, names = tree_digest(*sources), listing(*outputs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sd3fp8.cli", *[a if isinstance(a, (str, bytes)) else str(a) for a in argv]],
                          capture_output=True, timeout=600, env=env, cwd=cwd)
    err = proc.stderr.decode("utf-8", "backslashreplace")
    out = proc.stdout.decode("utf-8", "backslashreplace")
    line = check_contract(proc.returncode, out, err, expect, digest, sources, names, outputs)
    assert proc.returncode == 2, line
    return line


# --- files ----------------------------------------------------------------------------------------

def raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    """A file with any header: a JSON-able object, or raw bytes."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _bf16(state: dict) -> dict:
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def build_tiny_files(model: Path, root: Path) -> dict[str, Path]:
    """The tiny model's components as single files, the way users have them: an all-in-one
    checkpoint, the MMDiT alone, and standalone CLIP-L, CLIP-G, T5 and VAE files (bf16)."""
    layers = json.loads((model / "transformer" / "config.json").read_text())["num_layers"]
    mmdit = diffusers_state_to_original(load_file(model / "transformer" / "diffusion_pytorch_model.safetensors"), layers, MMDIT_PREFIX)
    parts = {"text_encoder": load_file(model / "text_encoder" / "model.safetensors"),
             "text_encoder_2": load_file(model / "text_encoder_2" / "model.safetensors"),
             "text_encoder_3": load_file(model / "text_encoder_3" / "model.safetensors"),
             "vae": load_file(model / "vae" / "diffusion_pytorch_model.safetensors")}
    parts["text_encoder_3"].pop("encoder.embed_tokens.weight", None)  # T5 files hold only the tied `shared`
    aio = dict(mmdit)
    for name, state in parts.items():
        aio |= _prefixed(state, COMPONENT_PREFIXES[name])
    files = {"aio": aio, "mmdit": mmdit, "clip_l": parts["text_encoder"], "clip_g": parts["text_encoder_2"],
             "t5": parts["text_encoder_3"], "vae": parts["vae"]}
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, state in files.items():
        out[name] = root / f"{name}.safetensors"
        save_file(_bf16(state), str(out[name]))
    return out


def wide_mmdit_file(path: Path, joint: int = 4096, pooled: int = 2048) -> Path:
    """An MMDiT whose text widths are SD3.5's (4096 / 2048): it does not fit the tiny text encoders."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64,
                                  num_attention_heads=1, joint_attention_dim=joint, caption_projection_dim=64,
                                  pooled_projection_dim=pooled, out_channels=16, pos_embed_max_size=8)
    save_file(_bf16(diffusers_state_to_original(model.state_dict(), 1, MMDIT_PREFIX)), str(path))
    return path


def copy_model(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
