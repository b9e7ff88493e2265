"""Options and builders every command shares: the parser class, model options, policy and engine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sd3fp8.errors import ConfigError

if TYPE_CHECKING:
    from sd3fp8.policy import Policy


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (no usage dump) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and precision")
    g.add_argument("--model", type=Path, help="diffusers SD3/SD3.5 folder, single-file checkpoint (.safetensors), or ComfyUI "
                   "root / models folder (default: the bundled model)")
    g.add_argument("--checkpoint", help="which checkpoint of a ComfyUI tree (file name or stem) when it has several")
    g.add_argument("--text-encoders", type=Path, action="append", default=[], metavar="PATH",
                   help="CLIP-L / CLIP-G / T5-XXL files or folders for a single-file checkpoint (repeatable; recognised by content)")
    g.add_argument("--vae", type=Path, action="append", default=[], metavar="FILE", help="VAE file for a checkpoint that has none")
    g.add_argument("--tokenizers", type=Path, metavar="DIR",
                   help="tokenizer files for single files: a diffusers SD3.5 download or a ComfyUI root")
    g.add_argument("--transformer", type=Path, help="take the MMDiT from this single file (original/ComfyUI layout, any precision)")
    g.add_argument("--precision", help="transformer storage: fp8 (= fp8-e4m3), fp8-e5m2, bf16, fp16, fp32 (default fp8)")
    g.add_argument("--t5", help="T5-XXL encoder: fp8, bf16, fp16, fp32 or off (default: compute dtype)")
    g.add_argument("--granularity", help="FP8 weight scales: tensor or channel (default channel)")
    g.add_argument("--policy", type=Path, help="precision policy file (JSON or TOML); the flags above override it")
    g.add_argument("--exclude", action="append", help="keep transformer modules matching this pattern in 16 bit (repeatable; adds to the policy)")
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", default="auto", help="FP8 linears: auto, scaled-mm, weight-only (default auto)")
    g.add_argument("--force-fp8", action="store_true", help="run scaled-mm (FP8 GEMM) even without FP8 tensor cores")
    g.add_argument("--activation", default="tensor", help="dynamic activation scales for scaled-mm: tensor or row")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16; fp32 on CPUs without bf16), bf16, fp16, fp32")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--calibration", type=Path, metavar="FILE", help="static FP8 input scales from `sd3fp8 calibrate` (used by scaled-mm)")
    g.add_argument("--watch-clipping", action="store_true", help="count activations clipped by the calibrated ranges, per layer")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer (fused FP8 quantization; first step compiles)")
    g.add_argument("--fast-accum", action=argparse.BooleanOptionalAction, default=True,
                   help="FP8 GEMMs with fast accumulation (default on; --no-fast-accum for full-precision accumulation)")
    g.add_argument("--fuse-qkv", default="auto", help="one FP8 layer for each attention's q/k/v: auto (where activations are "
                   "quantized), on, off")
    g.add_argument("--offload", default="none", help="none; model (diffusers model CPU offload, needs a GPU); stages (load the "
                   "text encoders, then the transformer, only while each runs: peak memory is the largest stage)")


def build_policy(args) -> Policy:
    from sd3fp8.policy import Policy

    policy = Policy.load(args.policy) if args.policy else Policy()
    changes = {}
    if args.precision:
        changes["transformer"] = args.precision
    if args.t5:
        changes["text_encoder_3"] = args.t5
    if args.granularity:
        changes["granularity"] = args.granularity
    if args.exclude:
        changes["exclude"] = policy.exclude + tuple(args.exclude)
    return policy.replace(**changes) if changes else policy


def build_engine(args, policy: Policy | None = None):
    from sd3fp8.engine.pipeline import SD3FP8Pipeline
    from sd3fp8.runtime import RuntimeConfig

    runtime = RuntimeConfig(
        device=args.device, dtype=args.dtype, backend=args.backend, force_fp8=args.force_fp8,
        activation=args.activation, offload=args.offload, watch_clipping=args.watch_clipping,
        compile=args.compile, fast_accum=args.fast_accum, fuse_qkv=args.fuse_qkv,
    )
    return SD3FP8Pipeline.from_pretrained(
        args.model, policy or build_policy(args), runtime, transformer_file=args.transformer, checkpoint=args.checkpoint,
        extra_files=tuple(args.text_encoders + args.vae), tokenizers=args.tokenizers, calibration=args.calibration,
    )


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must be WIDTHxHEIGHT (e.g. 512x512), got {text!r}") from None
    return width, height
