"""`sd3fp8 eval` and `sd3fp8 bench`: quality and speed of precision configurations."""

from __future__ import annotations

import sys
from pathlib import Path

from sd3fp8.cli.common import parse_size
from sd3fp8.errors import ConfigError


def cmd_eval(args) -> int:
    from sd3fp8.engine.pipeline import check_model_folder
    from sd3fp8.evalkit.evaluation import (
        default_prompts,
        evaluate,
        markdown_table,
        parse_config,
        read_prompts,
        write_report,
    )
    from sd3fp8.miniature.bundled import default_model_path
    from sd3fp8.policy import Policy

    if args.seeds < 1 or args.seeds > 1000:
        raise ConfigError(f"--seeds must be in 1..1000, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    model = args.model if args.model is not None else default_model_path()
    check_model_folder(model)
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts(model, args.count, args.captions)
    candidates = tuple(c for c in args.candidates.split(",") if c.strip())
    for spec in (args.reference, *candidates):
        parse_config(spec)  # fail before any generation
    report = evaluate(model, prompts, list(range(args.seeds)), args.reference, candidates, args.steps,
                      Policy.load(args.policy) if args.policy else None, progress=not args.quiet, calibration=args.calibration,
                      text_mode=args.text_mode)
    print(markdown_table(report), end="")
    for path in write_report(report, args.out):
        print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    from sd3fp8.engine.pipeline import check_model_folder
    from sd3fp8.engine.request import check_request_numbers
    from sd3fp8.evalkit.bench import DEFAULT_CONFIGS, SYNTHETIC, BenchSpec, bench, parse_configs, write_report
    from sd3fp8.evalkit.evaluation import default_prompts, read_prompts
    from sd3fp8.miniature.bundled import default_model_path

    configs = parse_configs(args.configs or ",".join(DEFAULT_CONFIGS))
    width, height = parse_size(args.size)
    if args.repeats < 1 or args.repeats > 100:
        raise ConfigError(f"--repeats must be in 1..100, got {args.repeats}")
    check_request_numbers(args.steps, None, width, height, 1)
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


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed, memory and quality of BF16 and the FP8 routes, each in its own process")
    p.add_argument("--model", type=Path, help="model (default: the bundled model)")
    p.add_argument("--configs", default=None,
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
    p.add_argument("--text-mode", choices=("diffusers", "comfy"), default="diffusers",
                   help="how prompts become conditioning (engine/text.py; default diffusers)")
    p.add_argument("--captions", choices=("full", "partial"), default="full",
                   help="shape-world models: held-out captions stating everything, or leaving parts out (default full)")
    p.add_argument("--reference", default="bf16", help="reference configuration (default bf16)")
    p.add_argument("--candidates", default="fp8", help="comma-separated: fp8, fp8-tensor, fp8-e5m2, fp8-t5, fp8-scaled-mm, "
                   "fp8-scaled-mm-row, fp8-static, fp8-static-keepP (P %% kept 16-bit), fp8-cast, no-t5, bf16, fp16, fp32; "
                   "NAME@fp32 or @bf16 sets the compute dtype")
    p.add_argument("--policy", type=Path, help="base policy file the configurations modify")
    p.add_argument("--calibration", type=Path, help="calibration file for the fp8-static configurations")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output folder (eval.json, eval.md, eval_grid.png)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
