"""`sd3fp8 serve`: the ComfyUI-compatible server over the engine (needs `pip install 'sd3fp8[server]'`)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from sd3fp8.cli.common import ACTIVATIONS, BACKENDS, COMPUTE_DTYPES, GRANULARITIES, OFFLOADS
from sd3fp8.errors import ConfigError


def build_backend(args):
    """The engine backend the server drives (tests inject their own through sd3fp8.server.make_server).
    Nothing is loaded here: models load when a prompt first asks for them."""
    from sd3fp8.cli.common import build_policy
    from sd3fp8.runtime import RuntimeConfig
    from sd3fp8.server.engine_backend import EngineBackend
    from sd3fp8.server.engine_models import Catalog, LoadOptions

    if args.models is not None and not args.models.is_dir():
        raise ConfigError(f"--models must be a folder (a ComfyUI root or its models/), got {args.models}")
    for path in args.model:
        if not path.exists():
            raise ConfigError(f"--model {path} does not exist")
    if args.keep_models < 1:
        raise ConfigError(f"--keep-models must be at least 1, got {args.keep_models}")
    runtime = RuntimeConfig(device=args.device, dtype=args.dtype, backend=args.backend, force_fp8=args.force_fp8,
                            activation=args.activation, offload=args.offload)
    options = LoadOptions(build_policy(args), runtime)
    options.settings()  # a device, dtype or backend this machine cannot run fails now, not at the first prompt
    catalog = Catalog(args.models, checkpoints=args.model)
    return EngineBackend(catalog, options, tokenizers=args.tokenizers, keep=args.keep_models)


def cmd_serve(args) -> int:
    from sd3fp8.scale.cli import check_args, serve_ray

    check_args(args)
    if args.ray:  # the OpenAI and A1111 APIs over engine replicas on Ray Serve (no ComfyUI API)
        return serve_ray(args)
    try:
        from sd3fp8.server import ServerConfig, installed_frontend, serve
    except ImportError as e:
        raise ConfigError(f"the server needs its extra: pip install 'sd3fp8[server]' ({e.name} is missing)") from e
    frontend = installed_frontend() if args.frontend is not False else None
    if args.frontend and frontend is None:
        raise ConfigError("--frontend needs the web UI package: pip install comfyui-frontend-package==1.35.9")
    backend = build_backend(args)
    temp = Path(tempfile.mkdtemp(prefix="sd3fp8-serve-"))
    try:
        config = ServerConfig(output=args.output, input=args.input, temp=temp, user=args.user_dir, host=args.host, port=args.port,
                              token=args.token, max_queue=args.max_queue, max_upload_size=args.max_upload_mb * 1024 * 1024,
                              frontend=frontend, previews=args.preview_method != "none")
        serve(config, backend)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve ComfyUI's API (and web UI) over the engine")
    p.add_argument("--models", type=Path, help="a ComfyUI models tree (checkpoints/, diffusion_models/, text_encoders/, vae/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8188, help="port (default 8188, ComfyUI's)")
    p.add_argument("--output", type=Path, default=Path("output"), help="where SaveImage writes (default ./output)")
    p.add_argument("--input", type=Path, default=Path("input"), help="LoadImage's folder and uploads (default ./input)")
    p.add_argument("--user-dir", type=Path, default=Path("user"), help="the web UI's settings and saved workflows (default ./user)")
    p.add_argument("--token", help="require `Authorization: Bearer TOKEN` (the web UI: open the printed URL once)")
    p.add_argument("--max-queue", type=int, default=100, help="pending prompts before POST /prompt answers 429 (default 100)")
    p.add_argument("--max-upload-mb", type=int, default=100, help="largest request body or upload in MiB (default 100)")
    p.add_argument("--preview-method", choices=("auto", "latent2rgb", "none"), default="auto",
                   help="sampler previews for clients that do not choose (default auto: latent2rgb)")
    p.add_argument("--frontend", action=argparse.BooleanOptionalAction, default=None,
                   help="serve the web UI (default: on when comfyui-frontend-package is installed)")
    _add_engine_options(p)
    p.add_argument("--ray", action="store_true",
                   help="serve the OpenAI and A1111 APIs on Ray Serve over engine replicas (pip install 'sd3fp8[scale]'; "
                        "RAY_ADDRESS joins a cluster); the ComfyUI API stays on plain `sd3fp8 serve`")
    p.add_argument("--replicas", type=int, help="with --ray: engine replicas (default 1; one GPU each where there are GPUs)")
    p.add_argument("--autoscale", metavar="MIN,MAX", help="with --ray: let Ray Serve scale the replicas between MIN and MAX")
    p.set_defaults(func=cmd_serve)


def _add_engine_options(p) -> None:
    g = p.add_argument_group("models and precision (the loader nodes list and load these)")
    g.add_argument("--model", type=Path, action="append", default=[], metavar="PATH",
                   help="also offer this diffusers folder or single-file checkpoint as a checkpoint (repeatable); without "
                   "--models or --model the bundled miniature model is offered as 'mini-sd3'")
    g.add_argument("--tokenizers", type=Path, metavar="DIR",
                   help="tokenizer files for single files: a diffusers SD3.5 download or a ComfyUI root (default: the "
                   "ComfyUI root above --models)")
    g.add_argument("--precision", help="transformer storage when UNETLoader says 'default' and for checkpoints: fp8 "
                   "(= fp8-e4m3), fp8-e5m2, bf16, fp16, fp32 (default fp8)")
    g.add_argument("--t5", help="T5-XXL encoder: fp8, bf16, fp16, fp32 or off (default: compute dtype)")
    g.add_argument("--granularity", choices=GRANULARITIES, help="FP8 weight scales: tensor or channel (default channel)")
    g.add_argument("--policy", type=Path, help="precision policy file (JSON or TOML); the flags above override it")
    g.add_argument("--exclude", action="append", help="keep transformer modules matching this pattern in 16 bit (repeatable)")
    g.add_argument("--keep-models", type=int, default=1, metavar="N",
                   help="loaded models kept per kind (checkpoint, diffusion model, text encoders, VAE) for later prompts (default 1)")
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="FP8 linears: auto, scaled-mm, weight-only, emulated (default auto)")
    g.add_argument("--force-fp8", action="store_true", help="run scaled-mm (FP8 GEMM) even without FP8 tensor cores")
    g.add_argument("--activation", default="tensor", choices=ACTIVATIONS, help="dynamic activation scales for scaled-mm: tensor or row")
    g.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES, help="compute dtype: auto (bf16; fp32 on CPUs without bf16), bf16, fp16, fp32")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--offload", default="none", choices=OFFLOADS, help="none; model (needs a GPU); stages (checkpoints only: text encoders, "
                   "then the transformer, loaded only while each runs)")
