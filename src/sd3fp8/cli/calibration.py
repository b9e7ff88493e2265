"""`sd3fp8 calibrate` and `sd3fp8 policy`: static input scales, sensitivity, budgeted policies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from sd3fp8.cli.common import HIGH_PRECISIONS, _add_model_options, build_engine, build_policy, model_spec
from sd3fp8.errors import ConfigError
from sd3fp8.io.oserrors import check_output_file

if TYPE_CHECKING:
    from sd3fp8.policy import Policy


def cmd_calibrate(args) -> int:
    from tqdm import tqdm

    from sd3fp8.engine.calibrate import calibrate, layer_sensitivity
    from sd3fp8.evalkit.prompt_sets import calibration_prompts, read_prompts
    from sd3fp8.fp8.calibration import PERCENTILES

    # every input checked before the model loads
    if not 1 <= args.count <= 10000 or not 1 <= args.seeds <= 100 or not 1 <= args.sensitivity_count <= 10000:
        raise ConfigError("--count and --sensitivity-count must be in 1..10000, --seeds in 1..100")
    if args.keep_budget is not None and not args.sensitivity:
        raise ConfigError("--keep-budget needs the sensitivity ranking: add --sensitivity")
    if args.keep_budget is not None and not 0 <= args.keep_budget <= 100:
        raise ConfigError(f"--keep-budget must be a percentage in 0..100, got {args.keep_budget}")
    if args.method == "percentile" and args.percentile not in PERCENTILES:
        raise ConfigError(f"--percentile must be one of {', '.join(f'{p:g}' for p in PERCENTILES)}, got {args.percentile:g}")
    for out in (args.out, args.policy_out or args.out.with_suffix(".policy.json") if args.keep_budget is not None else None):
        if out is not None:
            check_output_file(out)  # before the calibration runs, not after
    base = build_policy(args)  # the FP8 deployment policy the sensitivity and budget are about
    if not base.transformer.is_fp8:
        base = base.replace(transformer="fp8-e4m3")
    model = model_spec(args)
    model.check(base)
    prompts = read_prompts(args.prompts) if args.prompts else calibration_prompts(model.resolved_path(), args.count)
    prompts = prompts[: args.count]
    seeds = list(range(args.seeds))
    engine = build_engine(args, base.replace(transformer=args.precision or "auto"))
    bar = tqdm(total=len(prompts) * len(seeds), desc="calibrate", unit="img", disable=args.quiet)
    cal = calibrate(engine, prompts, seeds, args.steps, args.cfg, on_image=lambda: bar.update(1))
    bar.close()
    cal = cal.with_method(args.method, args.percentile if args.method == "percentile" else None)
    if args.sensitivity:
        subset = prompts[: args.sensitivity_count]
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
    from sd3fp8.policy import budget_policy

    policy, kept = budget_policy(base, cal.sensitivity, cal.transformer_params, budget)
    policy.save(out)
    kept_params = sum(r["params"] for r in cal.sensitivity if r["name"] in kept)
    print(f"wrote {out}: keeps {len(kept)} layer(s) in 16 bit ({kept_params / cal.transformer_params:.2%} of the transformer's "
          f"parameters, budget {budget:g} %): {', '.join(kept) or 'none'}")


def cmd_policy(args) -> int:
    from sd3fp8.fp8.calibration import Calibration
    from sd3fp8.policy import Policy

    base = Policy.load(args.policy) if args.policy else Policy()
    if args.calibration is None:
        print(base)
        return 0
    if args.keep_budget is None or args.out is None:
        raise ConfigError("with --calibration, give --keep-budget P and --out FILE")
    check_output_file(args.out)
    write_budget_policy(Calibration.load(args.calibration), base, args.keep_budget, args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="record activation ranges over denoising runs: static FP8 input scales, layer sensitivity")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: the model's calibration set)")
    p.add_argument("--count", "--samples", type=int, default=32, dest="count", help="how many prompts (default 32)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt: 0..N-1 (default 1)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recipe)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's recipe)")
    p.add_argument("--method", default="max", choices=("max", "percentile"), help="static scale: global max (default) or a percentile")
    p.add_argument("--percentile", type=float, default=99.99, help="with --method percentile: 99, 99.9 or 99.99")
    p.add_argument("--sensitivity", action="store_true", help="also rank layers by the final-latent error each causes alone")
    p.add_argument("--sensitivity-count", "--sensitivity-samples", type=int, default=4, dest="sensitivity_count",
                   help="how many prompts the sensitivity runs use (default 4)")
    p.add_argument("--keep-budget", type=float, metavar="P", help="write a policy keeping the most sensitive layers 16-bit within P %% of the parameters")
    p.add_argument("--policy-out", type=Path, help="where that policy goes (default: OUT with .policy.json)")
    p.add_argument("--out", type=Path, default=Path("calibration.json"), help="calibration file (default calibration.json)")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_model_options(p, precisions=HIGH_PRECISIONS)  # calibrate records a high-precision transformer
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("policy", help="print a policy, or derive a budgeted selective-precision policy from a calibration")
    p.add_argument("--policy", type=Path, help="base policy file (default: the built-in policy)")
    p.add_argument("--calibration", type=Path, help="calibration file holding a sensitivity ranking")
    p.add_argument("--keep-budget", type=float, metavar="P", help="percentage of transformer parameters kept 16-bit")
    p.add_argument("--out", type=Path, help="policy file to write")
    p.set_defaults(func=cmd_policy)
