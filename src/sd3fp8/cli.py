"""`sd3fp8` command line: a thin adapter that builds configuration and calls the engine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .errors import ConfigError, SD3FP8Error
from .policy import Policy


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
    g.add_argument("--offload", default="none", help="none; model (diffusers model CPU offload, needs a GPU); stages (load the "
                   "text encoders, then the transformer, only while each runs: peak memory is the largest stage)")


def build_policy(args) -> Policy:
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
    from .pipeline import RuntimeConfig, SD3FP8Pipeline

    runtime = RuntimeConfig(
        device=args.device, dtype=args.dtype, backend=args.backend, force_fp8=args.force_fp8,
        activation=args.activation, offload=args.offload, watch_clipping=args.watch_clipping,
    )
    return SD3FP8Pipeline.from_pretrained(
        args.model, policy or build_policy(args), runtime, transformer_file=args.transformer, checkpoint=args.checkpoint,
        extra_files=tuple(args.text_encoders + args.vae), tokenizers=args.tokenizers, calibration=args.calibration,
    )


def output_paths(out: Path | None, seeds: list[int]) -> list[Path]:
    if out is None:
        return [Path(f"sd3fp8-{s}.png") for s in seeds]
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {out}")
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(seeds))]


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .pipeline import validate_request
    from .pnginfo import save_png

    # Cheap checks first: a bad size should not cost a model load (None = the model's default).
    def given(value, placeholder):
        return placeholder if value is None else value

    validate_request(given(args.steps, 1), given(args.cfg, 0.0), given(args.width, 16), given(args.height, 16), args.batch)
    paths = output_paths(args.out, [args.seed + i for i in range(args.batch)])
    engine = build_engine(args)
    bar = None

    def on_step(info):
        nonlocal bar
        bar = bar or tqdm(total=info["total"], desc="denoising", unit="step", disable=args.quiet)
        bar.update(1)

    result = engine(
        args.prompt, args.negative, steps=args.steps, cfg=args.cfg, seed=args.seed,
        width=args.width, height=args.height, batch=args.batch, callback=on_step,
    )
    if bar is not None:
        bar.close()
    for image, params, path in zip(result.images, result.parameters, paths):
        save_png(image, path, params)
        print(f"wrote {path} (seed {params['seed']}, {params['precision']}, {params['backend']}, {result.seconds:.1f} s)")
    print_clipping(engine)
    return 0


def print_clipping(engine) -> None:
    if engine.clip_counter is None:
        return
    rows = engine.clip_counter.report()
    if not rows:
        print(f"clipping: none ({sum(engine.clip_counter.calls.values())} calls inside their calibrated ranges)")
        return
    print(f"clipping: {len(rows)} layer(s) saw activations beyond their calibrated range (worst first):")
    for r in rows[:20]:
        print(f"  {r['name']:<50} {r['clipped_calls']}/{r['calls']} calls, up to {r['worst_ratio']:.2f}x the range")


def inspect_file(path: Path, as_json: bool) -> int:
    """A single checkpoint file: what it is, from its header alone (nothing is loaded)."""
    from .checkpoint import read_header
    from .detection import detect

    header = read_header(path)
    detection = detect(header)
    size = sum(t.nbytes for t in header.tensors.values())
    if as_json:
        print(json.dumps({"path": str(path), "kind": detection.kind, "variant": detection.variant, "fp8": detection.fp8,
                          "components": list(detection.components), "mmdit_config": detection.mmdit_config,
                          "dtypes": detection.dtypes, "tensors": len(header.tensors), "bytes": size}, indent=2))
    else:
        print(f"{path}\n  {detection.describe()}\n  {len(header.tensors)} tensors, {size / 2**20:.1f} MiB; "
              f"dtypes: {', '.join(f'{d} x{n}' for d, n in detection.dtypes.items())}")
        if detection.mmdit_config:
            c = detection.mmdit_config
            print(f"  MMDiT: depth {c['num_layers']}, width {c['num_attention_heads'] * c['attention_head_dim']}, "
                  f"dual-attention layers {list(c['dual_attention_layers'])}, qk-norm {c['qk_norm']}, pos-embed {c['pos_embed_max_size']}^2")
    return 0


def cmd_inspect(args) -> int:
    from .inspection import format_report, inspect_pipeline

    if args.path is not None and args.path.is_file():
        return inspect_file(args.path, args.json)
    if args.path is not None:
        args.model = args.path
    report = inspect_pipeline(build_engine(args), layers=args.layers)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_eval(args) -> int:
    from .evaluation import default_prompts, evaluate, markdown_table, parse_config, read_prompts, write_report
    from .models import default_model_path
    from .pipeline import check_model_folder

    if args.seeds < 1 or args.seeds > 1000:
        raise ConfigError(f"--seeds must be in 1..1000, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    model = args.model if args.model is not None else default_model_path()
    check_model_folder(model)
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts(model, args.count)
    candidates = tuple(c for c in args.candidates.split(",") if c.strip())
    for spec in (args.reference, *candidates):
        parse_config(spec)  # fail before any generation
    report = evaluate(model, prompts, list(range(args.seeds)), args.reference, candidates, args.steps,
                      Policy.load(args.policy) if args.policy else None, progress=not args.quiet, calibration=args.calibration)
    print(markdown_table(report), end="")
    for path in write_report(report, args.out):
        print(f"wrote {path}")
    return 0


def cmd_quantize(args) -> int:
    from tqdm import tqdm

    from .calibration import Calibration
    from .quantize import QuantizeOptions, quantize_file

    options = QuantizeOptions(
        format=args.format, granularity=args.granularity or ("tensor" if args.format == "comfy" else "channel"),
        fp8=args.fp8, t5=args.t5, policy=Policy.load(args.policy) if args.policy else Policy(), force=args.force,
        calibration=Calibration.load(args.calibration) if args.calibration else None,
    )
    if not args.src.is_file():
        raise ConfigError(f"{args.src} is not a file (quantize takes a single .safetensors checkpoint)")
    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize", disable=args.quiet)

    def on_progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        path = quantize_file(args.src, args.out, options, on_progress)
    finally:
        bar.close()
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, from {args.src.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_calibrate(args) -> int:
    from tqdm import tqdm

    from .calibration import calibrate, layer_sensitivity
    from .evaluation import calibration_prompts, read_prompts

    if not 1 <= args.samples <= 10000 or not 1 <= args.seeds <= 100:
        raise ConfigError("--samples must be in 1..10000 and --seeds in 1..100")
    if args.precision and not args.precision.startswith(("bf16", "fp16", "fp32", "auto")):
        raise ConfigError("calibrate records a high-precision transformer: --precision bf16, fp16 or fp32")
    if args.keep_budget is not None and not args.sensitivity:
        raise ConfigError("--keep-budget needs the sensitivity ranking: add --sensitivity")
    base = build_policy(args)  # the FP8 deployment policy the sensitivity and budget are about
    if not base.transformer.is_fp8:
        base = base.replace(transformer="fp8-e4m3")
    engine = build_engine(args, base.replace(transformer=args.precision or "auto"))
    prompts = read_prompts(args.prompts) if args.prompts else calibration_prompts(engine.model_path, args.samples)
    prompts = prompts[: args.samples]
    seeds = list(range(args.seeds))
    bar = tqdm(total=len(prompts) * len(seeds), desc="calibrate", unit="img", disable=args.quiet)
    cal = calibrate(engine, prompts, seeds, args.steps, args.cfg, on_image=lambda: bar.update(1))
    bar.close()
    cal = cal.with_method(args.method, args.percentile if args.method == "percentile" else None)
    if args.sensitivity:
        subset = prompts[: args.sensitivity_samples]
        layers = [n for n in cal.stats if base.layer_filter("transformer")(n)]
        bar = tqdm(total=len(layers), desc="sensitivity", unit="layer", disable=args.quiet)
        ranking = layer_sensitivity(engine, cal, base, subset, [0], on_layer=lambda _: bar.update(1))
        bar.close()
        cal = dataclasses.replace(cal, sensitivity=tuple(ranking))
    path = cal.save(args.out)
    print(f"wrote {path}: {len(cal.stats)} layers over {len(prompts)} prompts x {len(seeds)} seeds x {cal.steps} steps "
          f"({cal.method}{'' if cal.percentile is None else f' p{cal.percentile:g}'})")
    for row in cal.sensitivity[:10]:
        print(f"  sensitivity {row['error']:.3e}  {row['name']}")
    if args.keep_budget is not None:
        write_budget_policy(cal, base, args.keep_budget, args.policy_out or args.out.with_suffix(".policy.json"))
    return 0


def write_budget_policy(cal, base: Policy, budget: float, out: Path) -> None:
    from .calibration import budget_policy

    policy, kept = budget_policy(base, cal.sensitivity, cal.transformer_params, budget)
    policy.save(out)
    kept_params = sum(r["params"] for r in cal.sensitivity if r["name"] in kept)
    print(f"wrote {out}: keeps {len(kept)} layer(s) in 16 bit ({kept_params / cal.transformer_params:.2%} of the transformer's "
          f"parameters, budget {budget:g} %): {', '.join(kept) or 'none'}")


def cmd_policy(args) -> int:
    from .calibration import Calibration

    base = Policy.load(args.policy) if args.policy else Policy()
    if args.calibration is None:
        print(base)
        return 0
    if args.keep_budget is None or args.out is None:
        raise ConfigError("with --calibration, give --keep-budget P and --out FILE")
    write_budget_policy(Calibration.load(args.calibration), base, args.keep_budget, args.out)
    return 0


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must be WIDTHxHEIGHT (e.g. 512x512), got {text!r}") from None
    return width, height


def cmd_bench(args) -> int:
    from .bench import SYNTHETIC, BenchSpec, bench, parse_configs, write_report
    from .evaluation import default_prompts, read_prompts
    from .models import default_model_path
    from .pipeline import check_model_folder, validate_request

    configs = parse_configs(args.configs)
    width, height = parse_size(args.size)
    if args.repeats < 1 or args.repeats > 100:
        raise ConfigError(f"--repeats must be in 1..100, got {args.repeats}")
    validate_request(args.steps or 2, 1.0, width or 16, height or 16, 1)
    if args.synthetic is not None and args.synthetic not in SYNTHETIC:
        raise ConfigError(f"--synthetic must be one of {', '.join(SYNTHETIC)}")
    if args.steps is not None and args.steps < 2 and not args.synthetic:
        raise ConfigError("--steps must be >= 2: per-step latency is measured between steps")
    prompts = ()
    if not args.synthetic:
        model = args.model if args.model is not None else default_model_path()
        if model.is_dir() and (model / "model_index.json").is_file():
            check_model_folder(model)
        prompts = read_prompts(args.prompts) if args.prompts else default_prompts(model, args.count)
        prompts = tuple(prompts[: args.count])
    spec = BenchSpec(str(args.model) if args.model else None, prompts, args.steps, width, height, args.repeats, str(args.out),
                     str(args.calibration) if args.calibration else None, args.synthetic, args.blocks)
    report = bench(spec, configs, progress=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    for path in write_report(report, args.out, "sd3fp8 " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "sd3fp8 bench"):
        print(f"wrote {path}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from .bench import DEFAULT_CONFIGS as DEFAULT_BENCH_CONFIGS

    parser = _Parser(prog="sd3fp8", description="FP8 inference for Stable Diffusion 3.5")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="generate images from a prompt")
    p.add_argument("prompt")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recipe)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's recipe)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--out", type=Path, help="output PNG (a batch gets -0, -1, ... suffixes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="show components, dtypes and per-layer FP8 recipes")
    p.add_argument("path", nargs="?", type=Path, help="model folder, or a .safetensors file (default: the bundled model)")
    p.add_argument("--layers", action="store_true", help="list every weight-owning module")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_model_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("quantize", help="convert a 16/32-bit checkpoint to FP8, streaming")
    p.add_argument("src", type=Path, help="source .safetensors (original single-file layout or standalone T5)")
    p.add_argument("--out", type=Path, required=True, help="destination .safetensors (written atomically)")
    p.add_argument("--format", default="sd3fp8", help="sd3fp8 (FP8 + per-channel or per-tensor weight_scale) or comfy (ComfyUI scaled fp8)")
    p.add_argument("--granularity", help="tensor or channel (default: channel; comfy: tensor)")
    p.add_argument("--fp8", default="e4m3", help="e4m3 or e5m2")
    p.add_argument("--t5", default="keep", help="fp8 or keep: quantize a T5-XXL encoder found in the file")
    p.add_argument("--policy", type=Path, help="precision policy file: which MMDiT layers go FP8")
    p.add_argument("--calibration", type=Path, help="store its static input scales (sd3fp8: input_scale, comfy: scale_input)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("calibrate", help="record activation ranges over denoising runs: static FP8 input scales, layer sensitivity")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: the model's calibration set)")
    p.add_argument("--samples", type=int, default=32, help="how many prompts (default 32)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt: 0..N-1 (default 1)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recipe)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's recipe)")
    p.add_argument("--method", default="max", choices=("max", "percentile"), help="static scale: global max (default) or a percentile")
    p.add_argument("--percentile", type=float, default=99.99, help="with --method percentile: 99, 99.9 or 99.99")
    p.add_argument("--sensitivity", action="store_true", help="also rank layers by the final-latent error each causes alone")
    p.add_argument("--sensitivity-samples", type=int, default=4, help="prompts the sensitivity runs use (default 4)")
    p.add_argument("--keep-budget", type=float, metavar="P", help="write a policy keeping the most sensitive layers 16-bit within P %% of the parameters")
    p.add_argument("--policy-out", type=Path, help="where that policy goes (default: OUT with .policy.json)")
    p.add_argument("--out", type=Path, default=Path("calibration.json"), help="calibration file (default calibration.json)")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_model_options(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("policy", help="print a policy, or derive a budgeted selective-precision policy from a calibration")
    p.add_argument("--policy", type=Path, help="base policy file (default: the built-in policy)")
    p.add_argument("--calibration", type=Path, help="calibration file holding a sensitivity ranking")
    p.add_argument("--keep-budget", type=float, metavar="P", help="percentage of transformer parameters kept 16-bit")
    p.add_argument("--out", type=Path, help="policy file to write")
    p.set_defaults(func=cmd_policy)

    p = sub.add_parser("bench", help="speed, memory and quality of BF16 and the FP8 routes, each in its own process")
    p.add_argument("--model", type=Path, help="model (default: the bundled model)")
    p.add_argument("--configs", default=",".join(DEFAULT_BENCH_CONFIGS),
                   help="comma-separated: bf16, fp16, fp32, sd3fp8, sd3fp8-scaled-mm, sd3fp8-static, diffusers-layerwise, "
                        "quanto-qfloat8, torchao-float8-wo, torchao-float8-dq, plain-cast (bf16 is always the reference)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: the model's eval prompts)")
    p.add_argument("--count", type=int, default=4, help="how many prompts (default 4)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recipe)")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's recipe; synthetic: 512x512)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the prompts (default 2), after one warm-up image")
    p.add_argument("--calibration", type=Path, help="calibration file for sd3fp8-static")
    p.add_argument("--synthetic", help="time a random-weight transformer of this width alone: medium or large")
    p.add_argument("--blocks", type=int, default=2, help="depth of the synthetic transformer (default 2)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (bench.json, bench.md, plots, grid)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="compare precision configurations on the same prompts and seeds")
    p.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: held-out world prompts, or the SD3.5 set)")
    p.add_argument("--count", type=int, default=8, help="how many default prompts (default 8)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt: 0..N-1 (default 2)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recipe)")
    p.add_argument("--reference", default="bf16", help="reference configuration (default bf16)")
    p.add_argument("--candidates", default="fp8", help="comma-separated: fp8, fp8-tensor, fp8-e5m2, fp8-t5, fp8-scaled-mm, "
                   "fp8-scaled-mm-row, fp8-static, fp8-static-keepP (P %% kept 16-bit), fp8-cast, no-t5, bf16, fp16, fp32; "
                   "NAME@fp32 or @bf16 sets the compute dtype")
    p.add_argument("--policy", type=Path, help="base policy file the configurations modify")
    p.add_argument("--calibration", type=Path, help="calibration file for the fp8-static configurations")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output folder (eval.json, eval.md, eval_grid.png)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
    return parser


def quiet_libraries() -> None:
    """diffusers/transformers print loading bars and advice on every load: keep our output readable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    for name in ("torchao", "torch.utils._pytree"):  # optional bench extras log import-time warnings
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        return args.func(args)
    except SD3FP8Error as e:
        print(f"sd3fp8: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sd3fp8: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
