"""`sd3fp8 generate`: prompt in, PNGs with their parameters out."""

from __future__ import annotations

from pathlib import Path

from sd3fp8.cli.common import _add_model_options, build_engine
from sd3fp8.errors import ConfigError


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

    from sd3fp8.engine.pipeline import validate_request
    from sd3fp8.engine.pnginfo import save_png
    from sd3fp8.engine.requests import check_prompt, check_seed
    from sd3fp8.io.oserrors import check_output_file

    # Cheap checks first: a bad size should not cost a model load (None = the model's default).
    def given(value, placeholder):
        return placeholder if value is None else value

    validate_request(given(args.steps, 1), given(args.cfg, 0.0), given(args.width, 16), given(args.height, 16), args.batch)
    check_seed(args.seed, args.batch)
    check_prompt(args.prompt)
    check_prompt(args.negative, "negative prompt")
    paths = output_paths(args.out, [args.seed + i for i in range(args.batch)])
    for path in paths:  # minutes of generation must not end in "read-only file system"
        check_output_file(path, given(args.width, 1024) * given(args.height, 1024) * 3 + 2**16)  # a PNG is at most raw RGB
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


def register(sub) -> None:
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
