"""`sd3fp8 serve --ray [--replicas N | --autoscale MIN,MAX]`: the OpenAI and A1111 APIs on Ray Serve.

Each replica loads the engine through :class:`~sd3fp8.server.pipeline_backend.PipelineBackend`:
the bundled miniature model, or with ``--models`` every checkpoint of that ComfyUI tree (loaded the
way ``sd3fp8 generate --model ROOT --checkpoint NAME`` does). ``RAY_ADDRESS`` joins an existing
cluster; without it a local one is started.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sd3fp8.errors import ConfigError


def backend_factory(models: Path | None, threads: int | None = None):
    """A picklable zero-argument callable that builds each replica's backend."""
    from sd3fp8.server.pipeline_backend import Checkpoint, PipelineBackend

    checkpoints = None
    if models is not None:
        from sd3fp8.server.inventory import ModelTree

        tree = ModelTree(models)
        names = tree.files("checkpoints")
        if not names:
            raise ConfigError(f"no checkpoints under {tree.root}/checkpoints to serve")
        root = tree.root.parent if tree.root.name == "models" else tree.root
        checkpoints = {name: Checkpoint(root, {"checkpoint": name}) for name in names}
    return functools.partial(PipelineBackend, checkpoints, threads=threads)


def serve_ray(args) -> int:
    from sd3fp8.scale.ray_serve import RayOptions, parse_autoscale, serve_forever

    if args.models is not None and not args.models.is_dir():
        raise ConfigError(f"--models must be a folder (a ComfyUI root or its models/), got {args.models}")
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    options = RayOptions(replicas=args.replicas or 1, autoscale=autoscale, token=args.token,
                         max_body=args.max_upload_mb * 1024 * 1024)
    serve_forever(backend_factory(args.models, options.threads), options, args.host, args.port)
    return 0


def check_args(args) -> None:
    """--replicas / --autoscale only with --ray, and not both."""
    if not args.ray and (args.replicas is not None or args.autoscale is not None):
        raise ConfigError("--replicas and --autoscale need --ray")
    if args.replicas is not None and args.autoscale is not None:
        raise ConfigError("give either --replicas N or --autoscale MIN,MAX")
