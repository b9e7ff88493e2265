"""`sd3fp8 generate`: prompt in, PNGs with their parameters out."""

from __future__ import annotations

from pathlib import Path

from sd3fp8.cli.common import _add_model_options, build_engine, check_model_path
from sd3fp8.errors import ConfigError

# request fields a PNG's parameters restore with --from-png (flags given on the command line win)
FROM_PNG_FIELDS = ("prompt", "negative_prompt", "steps", "cfg", "seed", "width", "height", "sampler", "scheduler", "shift",
                   "denoise", "batch_index", "text_mode")


def output_paths(out: Path | None, seed: int, batch_indices: list[int]) -> list[Path]:
    if out is None:
        return [Path(f"sd3fp8-{seed}-{i}.png" if i else f"sd3fp8-{seed}.png") for i in batch_indices]
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {out}")
    if len(batch_indices) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in batch_indices]


def apply_png_parameters(args) -> None:
    """--from-png: fill every request option the command line left unset from the PNG's metadata."""
    from sd3fp8.engine.pnginfo import read_parameters

    params = read_parameters(args.from_png)
    for field in FROM_PNG_FIELDS:
        attr = {"negative_prompt": "negative"}.get(field, field)
        if getattr(args, attr, None) is None and params.get(field) is not None:
            setattr(args, attr, params[field])
    if args.init_image is None and params.get("init_image"):
        args.init_image = Path(params["init_image"])
    if args.model is None and params.get("model") and Path(params["model"]).exists():
        args.model = Path(params["model"])


def request_from_args(args):
    from sd3fp8.engine.images import load_image
    from sd3fp8.engine.request import GenerationRequest

    options = {k: getattr(args, k) for k in ("steps", "cfg", "width", "height", "shift", "denoise", "sampler", "scheduler",
                                             "batch_index", "text_mode") if getattr(args, k) is not None}
    init = load_image(args.init_image) if args.init_image is not None else None
    if init is None and options.get("denoise", 1.0) < 1:
        raise ConfigError("--denoise below 1 needs --init-image (img2img)")
    return GenerationRequest(args.prompt, args.negative, seed=args.seed if args.seed is not None else 0, batch=args.batch,
                             init_image=init, **options)


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from sd3fp8.engine.pnginfo import save_png
    from sd3fp8.io.oserrors import check_output_file

    if args.from_png is not None:
        apply_png_parameters(args)
    if args.prompt is None:
        raise ConfigError("give a prompt (or --from-png FILE)")
    check_model_path(args)  # before the imports a request's checks need (torch)
    request = request_from_args(args)  # cheap checks first: a bad option should not cost a model load
    paths = output_paths(args.out, request.seed, [request.batch_index + i for i in range(request.batch)])
    for path in paths:  # minutes of generation must not end in "read-only file system"
        check_output_file(path, (request.width or 1024) * (request.height or 1024) * 3 + 2**16)  # a PNG is at most raw RGB
    engine = build_engine(args)
    bar = None

    def on_step(info):
        nonlocal bar
        bar = bar or tqdm(total=info["total"], desc="denoising", unit="step", disable=args.quiet)
        bar.update(1)

    result = engine.generate(request, on_step)
    if bar is not None:
        bar.close()
    for image, params, path in zip(result.images, result.parameters, paths):
        if args.init_image is not None:
            params["init_image"] = str(args.init_image.resolve())
        save_png(image, path, params)
        print(f"wrote {path} (seed {params['seed']}, batch index {params['batch_index']}, {params['sampler']}/"
              f"{params['scheduler']}, {params['precision']}, {params['backend']}, {result.seconds:.1f} s)")
    print_clipping(engine)
    return 0


def print_clipping(engine) -> None:
    rows = engine.clipping_report()
    if rows is None:
        return
    if not rows:
        print(f"clipping: none ({sum(engine.clip_counter.calls.values())} calls inside their calibrated ranges)")
        return
    print(f"clipping: {len(rows)} layer(s) saw activations beyond their calibrated range (worst first):")
    for r in rows[:20]:
        print(f"  {r['name']:<50} {r['clipped_calls']}/{r['calls']} calls, up to {r['worst_ratio']:.2f}x the range")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt (or an init image: img2img)")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's recipe)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's recipe; 1 skips the negative)")
    p.add_argument("--seed", type=int, help="noise seed (default 0); image i of a batch is draw i of this seed, as in ComfyUI")
    p.add_argument("--batch-index", type=int, help="first image's draw: --batch 1 --batch-index I regenerates image I of a batch")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--sampler", help="ComfyUI sampler name or A1111 alias (default euler): euler, euler_ancestral, heun, dpm_2, "
                   "dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, dpmpp_sde, uni_pc, ddim, lcm, ... or 'DPM++ 2M', 'Euler a'")
    p.add_argument("--scheduler", help="simple, normal (default), sgm_uniform, beta, karras, exponential, linear_quadratic, "
                   "kl_optimal, ddim_uniform")
    p.add_argument("--shift", type=float, help="flow shift of the sigma schedule (default: the model's scheduler config)")
    p.add_argument("--text-mode", choices=("diffusers", "comfy"), help="prompt encoding: diffusers (default: CLIP truncated at 77 "
                   "tokens, T5 to the model's length) or comfy (ComfyUI's: CLIP windows of 77, T5 never truncated, (word:1.2) weights)")
    p.add_argument("--init-image", type=Path, metavar="PATH", help="img2img: start from this image (scaled to cover the size, centre-cropped)")
    p.add_argument("--denoise", type=float, help="how much of the schedule runs: 1 = all (txt2img), 0.6 = keep 40%% of the init image")
    p.add_argument("--from-png", type=Path, metavar="FILE", help="regenerate from a PNG's stored parameters (flags given here override)")
    p.add_argument("--out", type=Path, help="output PNG (a batch gets -I suffixes, I the batch index)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(p)
    p.set_defaults(func=cmd_generate)
