"""`sd3fp8 inspect` and `sd3fp8 quantize`: what a model or file is, and FP8 conversion."""

from __future__ import annotations

import json
from pathlib import Path

from sd3fp8.cli.common import GRANULARITIES, _add_model_options, build_engine
from sd3fp8.errors import ConfigError

QUANTIZE_FORMATS = ("sd3fp8", "comfy-quant", "comfy")  # io/quantize.FORMATS (tests check they match)


def inspect_file(path: Path, as_json: bool) -> int:
    """A single checkpoint file: what it is, from its header and per-layer entries (no weight is loaded)."""
    from collections import Counter

    from sd3fp8.io.checkpoint import LazyTensors
    from sd3fp8.io.comfyquant import quant_layers
    from sd3fp8.io.detection import detect

    with LazyTensors(path) as files:
        header = files.header
        detection = detect(header)
        quant = quant_layers(files)  # every declared layer checked against its stored tensors
    size = sum(t.nbytes for t in header.tensors.values())
    per_layer = dict(Counter(q.format + (" (full precision matmul)" if q.full_precision else "") for q in quant.values()))
    if as_json:
        print(json.dumps({"path": str(path), "kind": detection.kind, "variant": detection.variant, "fp8": detection.fp8,
                          "components": list(detection.components), "mmdit_config": detection.mmdit_config,
                          "dtypes": detection.dtypes, "per_layer_formats": per_layer, "tensors": len(header.tensors),
                          "bytes": size}, indent=2))
    else:
        print(f"{path}\n  {detection.describe()}\n  {len(header.tensors)} tensors, {size / 2**20:.1f} MiB; "
              f"dtypes: {', '.join(f'{d} x{n}' for d, n in detection.dtypes.items())}")
        if per_layer:
            print(f"  per-layer formats: {', '.join(f'{f} x{n}' for f, n in per_layer.items())}")
        if detection.mmdit_config:
            c = detection.mmdit_config
            print(f"  MMDiT: depth {c['num_layers']}, width {c['num_attention_heads'] * c['attention_head_dim']}, "
                  f"dual-attention layers {list(c['dual_attention_layers'])}, qk-norm {c['qk_norm']}, pos-embed {c['pos_embed_max_size']}^2")
    return 0


def cmd_inspect(args) -> int:
    if args.path is not None and args.path.is_file():
        return inspect_file(args.path, args.json)  # the header alone: no torch, no diffusers
    from sd3fp8.engine.inspection import format_report, inspect_pipeline

    if args.path is not None:
        args.model = args.path
    report = inspect_pipeline(build_engine(args), layers=args.layers)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_quantize(args) -> int:
    from tqdm import tqdm

    from sd3fp8.fp8.calibration import Calibration
    from sd3fp8.io.quantize import QuantizeOptions, quantize_file
    from sd3fp8.policy import Policy

    options = QuantizeOptions(
        format=args.format, granularity=args.granularity or ("tensor" if args.format in ("comfy", "comfy-quant") else "channel"),
        fp8=args.fp8, t5="fp8" if args.t5 == "fp8" else "keep", policy=Policy.load(args.policy) if args.policy else Policy(), force=args.force,
        calibration=Calibration.load(args.calibration) if args.calibration else None,
    )
    if not args.src.is_file():
        raise ConfigError(f"{args.src} is not a file (quantize takes a single .safetensors checkpoint)")
    bar = None

    def on_progress(done, total):
        nonlocal bar  # created at the first byte written: a refusal before that prints one line only
        bar = bar or tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize", disable=args.quiet)
        bar.n = done
        bar.refresh()

    try:
        path = quantize_file(args.src, args.out, options, on_progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, from {args.src.stat().st_size / 2**20:.1f} MiB)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show components, dtypes and per-layer FP8 schemes")
    p.add_argument("path", nargs="?", type=Path, help="model folder, or a .safetensors file (default: the bundled model)")
    p.add_argument("--layers", action="store_true", help="list every weight-owning module")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_model_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("quantize", help="convert a 16/32-bit checkpoint to FP8, streaming")
    p.add_argument("src", type=Path, help="source .safetensors (original single-file layout or standalone T5)")
    p.add_argument("--out", type=Path, required=True, help="destination .safetensors (written atomically)")
    p.add_argument("--format", default="sd3fp8", choices=QUANTIZE_FORMATS, help="sd3fp8 (per-layer entries, per-channel or per-tensor weight_scale; "
                   "ComfyUI reads it per tensor, refuses it per channel), comfy-quant (ComfyUI's per-layer format) "
                   "or comfy (ComfyUI scaled fp8, e4m3 only)")
    p.add_argument("--granularity", choices=GRANULARITIES, help="channel or tensor (default: channel; comfy, comfy-quant: tensor)")
    p.add_argument("--fp8", default="e4m3", choices=("e4m3", "e5m2"), help="FP8 format of the weights (default e4m3)")
    p.add_argument("--t5", default="auto", choices=("fp8", "auto"), help="T5-XXL encoder found in the file: fp8 (quantize it) or "
                   "auto (default: as the file stores it) -- the same --t5 as generate's, which also takes bf16/fp16/fp32/off")
    p.add_argument("--policy", type=Path, help="precision policy file: which MMDiT layers go FP8")
    p.add_argument("--calibration", type=Path, help="store its static input scales (input_scale; comfy: scale_input)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)
