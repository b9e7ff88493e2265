"""`sd3fp8 serve`: the ComfyUI-compatible server (needs `pip install 'sd3fp8[server]'`)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from sd3fp8.errors import ConfigError

ENGINE_PENDING = ("the engine backend is not wired into the server yet: the API, the web UI and validation work, "
                  "running a workflow's loader nodes does not")


class _UnwiredBackend:
    """Lists a models tree and names the samplers; refuses to load (until the engine backend lands)."""

    def __init__(self, models):
        self.models = models

    def model_files(self, folder):
        return self.models.files(folder) if self.models else []

    def sampler_names(self):
        return ["euler"]

    def scheduler_names(self):
        return ["simple", "sgm_uniform", "normal", "beta"]

    def _pending(self, *args, **kwargs):
        from sd3fp8.workflow.types import NodeError

        raise NodeError(ENGINE_PENDING)

    load_checkpoint = load_diffusion_model = load_text_encoders = load_vae = _pending
    encode_text = sample = vae_decode = vae_encode = _pending

    def free(self, unload_models, free_memory):
        pass


def build_backend(args):
    """The backend the server drives. Tests inject their own through sd3fp8.server.make_server."""
    from sd3fp8.server.inventory import ModelTree

    if args.models is not None and not args.models.is_dir():
        raise ConfigError(f"--models must be a folder (a ComfyUI root or its models/), got {args.models}")
    return _UnwiredBackend(ModelTree(args.models) if args.models else None)


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
    p.add_argument("--ray", action="store_true",
                   help="serve the OpenAI and A1111 APIs on Ray Serve over engine replicas (pip install 'sd3fp8[scale]'; "
                        "RAY_ADDRESS joins a cluster); the ComfyUI API stays on plain `sd3fp8 serve`")
    p.add_argument("--replicas", type=int, help="with --ray: engine replicas (default 1; one GPU each where there are GPUs)")
    p.add_argument("--autoscale", metavar="MIN,MAX", help="with --ray: let Ray Serve scale the replicas between MIN and MAX")
    p.set_defaults(func=cmd_serve)
