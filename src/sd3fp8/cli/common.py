"""Options and builders every command shares: the parser class, model options (one set for every
command that loads a model), policy and engine."""

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


# The enums' spellings (tests check they match sd3fp8.enums' choices; literals here keep torch out of `--help`)
PRECISIONS = ("fp8", "fp8-e4m3", "fp8-e5m2", "bf16", "fp16", "fp32", "auto")
T5_PRECISIONS = PRECISIONS + ("off",)
HIGH_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
GRANULARITIES = ("channel", "tensor")
BACKENDS = ("auto", "scaled-mm", "weight-only", "emulated")
ACTIVATIONS = ("tensor", "row")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
OFFLOADS = ("none", "model", "stages")


def add_model_source_options(p: argparse.ArgumentParser) -> None:
    """What to load: the options every command that loads a model takes."""
    g = p.add_argument_group("model")
    g.add_argument("--model", type=Path, help="diffusers SD3/SD3.5 folder, single-file checkpoint (.safetensors), or ComfyUI "
                   "root / models folder (default: the bundled model)")
    g.add_argument("--checkpoint", help="which checkpoint of a ComfyUI tree (file name or stem) when it has several")
    g.add_argument("--text-encoders", type=Path, action="append", default=[], metavar="PATH",
                   help="CLIP-L / CLIP-G / T5-XXL files or folders for a single-file checkpoint (repeatable; recognised by content)")
    g.add_argument("--vae", type=Path, action="append", default=[], metavar="FILE", help="VAE file for a checkpoint that has none")
    g.add_argument("--tokenizers", type=Path, metavar="DIR",
                   help="tokenizer files for single files: a diffusers SD3.5 download or a ComfyUI root")
    g.add_argument("--transformer", type=Path, help="take the MMDiT from this single file (original/ComfyUI layout, any precision)")


def _add_model_options(p: argparse.ArgumentParser, precisions: tuple[str, ...] = PRECISIONS) -> None:
    """The model, how it is stored (policy) and how it runs (runtime)."""
    add_model_source_options(p)
    g = p.add_argument_group("precision")
    g.add_argument("--precision", choices=precisions, help="transformer storage: fp8 (= fp8-e4m3), fp8-e5m2, bf16, fp16, fp32 "
                   "(default fp8)")
    g.add_argument("--t5", choices=T5_PRECISIONS, help="T5-XXL encoder: fp8, bf16, fp16, fp32, auto or off (default auto: the compute "
                   "dtype, or FP8 as stored)")
    g.add_argument("--granularity", choices=GRANULARITIES, help="FP8 weight scales: channel (default) or tensor")
    g.add_argument("--policy", type=Path, help="precision policy file (JSON or TOML); the flags above override it")
    g.add_argument("--exclude", action="append", help="keep transformer modules matching this pattern in 16 bit (repeatable; adds to the policy)")
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="FP8 linears: auto, scaled-mm, weight-only, emulated (W8A8 numbers without FP8 GEMMs) (default auto)")
    g.add_argument("--force-fp8", action="store_true", help="run scaled-mm (FP8 GEMM) even without FP8 tensor cores")
    g.add_argument("--activation", default="tensor", choices=ACTIVATIONS, help="dynamic activation scales for scaled-mm: tensor or row")
    g.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="compute dtype: auto (bf16; fp32 on CPUs without bf16), bf16, fp16, fp32")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--calibration", type=Path, metavar="FILE", help="static FP8 input scales from `sd3fp8 calibrate` (used by scaled-mm)")
    g.add_argument("--watch-clipping", action="store_true", help="count activations clipped by the calibrated ranges, per layer")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer (fused FP8 quantization; first step compiles)")
    g.add_argument("--fast-accum", action=argparse.BooleanOptionalAction, default=True,
                   help="FP8 GEMMs with fast accumulation (default on; --no-fast-accum for full-precision accumulation)")
    g.add_argument("--fuse-qkv", default="auto", choices=("auto", "on", "off"), help="one FP8 layer for each attention's q/k/v: auto "
                   "(where activations are quantized), on, off")
    g.add_argument("--offload", default="none", choices=OFFLOADS, help="none; model (diffusers model CPU offload, needs a GPU); stages "
                   "(load the text encoders, then the transformer, only while each runs: peak memory is the largest stage)")


def model_spec(args):
    """The model the source options name (engine/modelspec.py)."""
    from sd3fp8.engine.modelspec import ModelSpec

    return ModelSpec(args.model, args.checkpoint, args.transformer, tuple(args.text_encoders + args.vae), args.tokenizers)


def check_model_path(args) -> None:
    """A named model path must exist (what it holds is checked when it loads, before any generation)."""
    from sd3fp8.errors import ModelLoadError

    for option, path in (("--model", args.model), ("--transformer", args.transformer), ("--tokenizers", args.tokenizers),
                         *(("--text-encoders", p) for p in args.text_encoders), *(("--vae", p) for p in args.vae)):
        if path is not None and not Path(path).exists():
            raise ModelLoadError(f"{option} {path} does not exist")


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
    from sd3fp8._env import quiet_libraries

    check_model_path(args)  # a mistyped path fails before the heavy imports
    quiet_libraries()
    from sd3fp8.runtime import RuntimeConfig


    runtime = RuntimeConfig(
        device=args.device, dtype=args.dtype, backend=args.backend, force_fp8=args.force_fp8,
        activation=args.activation, offload=args.offload, watch_clipping=args.watch_clipping,
        compile=args.compile, fast_accum=args.fast_accum, fuse_qkv=args.fuse_qkv,
    )
    return model_spec(args).load(policy or build_policy(args), runtime, calibration=args.calibration)


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must be WIDTHxHEIGHT (e.g. 512x512), got {text!r}") from None
    return width, height
