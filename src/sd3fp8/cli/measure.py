"""`sd3fp8 eval` and `sd3fp8 bench`: quality and speed of precision configurations."""

from __future__ import annotations

import sys
from pathlib import Path

from sd3fp8.cli.common import add_model_source_options, model_spec, parse_size
from sd3fp8.errors import ConfigError
from sd3fp8.io.oserrors import check_output_file

CONFIG_HELP = ("fp8, fp8-tensor, fp8-e5m2, fp8-t5, no-t5, fp8-scaled-mm, fp8-scaled-mm-row, fp8-static, fp8-static-keepP (P %% kept "
               "16-bit), fp8-cast, diffusers-layerwise, quanto-qfloat8, torchao-float8-wo, torchao-float8-dq, bf16, fp16, fp32; "
               "NAME@fp32, @bf16 or @fp16 sets the compute dtype")


def _prompts(args, model, count: int) -> list[str]:
    from sd3fp8.evalkit.prompt_sets import default_prompts, read_prompts

    return (read_prompts(args.prompts) if args.prompts else default_prompts(model.resolved_path(), count))[:count]


def _base_policy(args):
    from sd3fp8.policy import Policy

    return Policy.load(args.policy) if args.policy else None


def cmd_eval(args) -> int:
    from sd3fp8._env import quiet_libraries
    from sd3fp8.evalkit.configs import check_configurations, parse_configurations
    from sd3fp8.evalkit.evaluation import evaluate, markdown_table, write_report

    if not 1 <= args.seeds <= 1000:
        raise ConfigError(f"--seeds must be in 1..1000, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.count < 1:
        raise ConfigError(f"--count must be >= 1, got {args.count}")
    # every input checked before the first model loads
    check_output_file(args.out / "eval.json")  # the report folder, before the runs
    candidates = tuple(c for c in args.candidates.split(",") if c.strip())
    check_configurations(parse_configurations(candidates, args.reference), args.calibration)
    base = _base_policy(args)
    model = model_spec(args)
    model.check(base)
    prompts = _prompts(args, model, args.count)
    quiet_libraries()
    report = evaluate(model, prompts, list(range(args.seeds)), args.reference, candidates, args.steps, base,
                      progress=not args.quiet, calibration=args.calibration)
    print(markdown_table(report), end="")
    for path in write_report(report, args.out):
        print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    from sd3fp8.engine.request import check_request_numbers
    from sd3fp8.evalkit.bench import DEFAULT_CONFIGS, REFERENCE, BenchSpec, bench
    from sd3fp8.evalkit.bench_report import write_report
    from sd3fp8.evalkit.configs import check_configurations, parse_configurations

    configs = parse_configurations(args.configs or ",".join(DEFAULT_CONFIGS), REFERENCE)
    width, height = parse_size(args.size)
    if not 1 <= args.repeats <= 100:
        raise ConfigError(f"--repeats must be in 1..100, got {args.repeats}")
    if args.count < 1:
        raise ConfigError(f"--count must be >= 1, got {args.count}")
    check_request_numbers(args.steps, None, width, height, 1)
    if args.steps is not None and args.steps < 2 and not args.synthetic:
        raise ConfigError("--steps must be >= 2: per-step latency is measured between steps")
    check_output_file(args.out / "bench.json")  # the report folder, before the runs
    # every input checked here: the workers load models, and a bad input would fail each of them late
    check_configurations(configs, args.calibration, synthetic=args.synthetic is not None)
    base = _base_policy(args)
    model = model_spec(args)
    prompts: tuple[str, ...] = ()
    if not args.synthetic:
        model.check(base)
        prompts = tuple(_prompts(args, model, args.count))
    spec = BenchSpec(model, prompts, args.steps, width, height, args.repeats, str(args.out),
                     str(args.calibration) if args.calibration else None, args.synthetic, args.blocks,
                     base.to_dict() if base else None)
    report = bench(spec, [c.name for c in configs], progress=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    for path in write_report(report, args.out, "sd3fp8 " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "sd3fp8 bench"):
        print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed, memory and quality of BF16 and the FP8 routes, each in its own process")
    p.add_argument("--configs", default=None, help=f"comma-separated configurations (bf16 is always the reference): {CONFIG_HELP}")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: the model's eval prompts)")
    p.add_argument("--count", type=int, default=4, help="how many prompts (default 4); prompt i uses seed i")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recipe)")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's recipe; synthetic: 512x512)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the prompts (default 2), after one warm-up image")
    p.add_argument("--policy", type=Path, help="base policy file the configurations modify")
    p.add_argument("--calibration", type=Path, help="calibration file for the fp8-static configurations")
    p.add_argument("--synthetic", choices=("medium", "large"), help="time a random-weight transformer of this width alone")
    p.add_argument("--blocks", type=int, default=2, help="depth of the synthetic transformer (default 2)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (bench.json, bench.md, plots, grid)")
    p.add_argument("-q", "--quiet", action="store_true")
    add_model_source_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="compare precision configurations on the same prompts and seeds")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: held-out world prompts, or the SD3.5 set)")
    p.add_argument("--count", type=int, default=8, help="how many prompts (default 8)")
    p.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds per prompt: 0..N-1 (default 2)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recipe)")
    p.add_argument("--reference", default="bf16", help="reference configuration (default bf16)")
    p.add_argument("--candidates", default="fp8", help=f"comma-separated: {CONFIG_HELP}")
    p.add_argument("--policy", type=Path, help="base policy file the configurations modify")
    p.add_argument("--calibration", type=Path, help="calibration file for the fp8-static configurations")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output folder (eval.json, eval.md, eval_grid.png)")
    p.add_argument("-q", "--quiet", action="store_true")
    add_model_source_options(p)
    p.set_defaults(func=cmd_eval)
