"""The OpenAI and A1111 endpoints as a Ray Serve application.

Two deployments:

- ``ImageWorker`` (N replicas, or autoscaled): loads the engine once per replica (one GPU each
  where the cluster has GPUs) and runs jobs with a :class:`~sd3fp8.server.localrunner.LocalRunner`
  (the same workflows as ``sd3fp8 serve``, so the same seed gives the same pixels; jobs waiting
  together with the same model, size, steps, cfg and a deterministic sampler share one sampler
  run). Its ``run`` streams job events; ``check_health`` fails when the runner thread died, so
  Serve replaces the replica.
- ``ImageApi`` (one replica, no GPU): the FastAPI ingress with the routes of ``sd3fp8 serve``
  (same code, same guards), sending each job to a worker through a streaming DeploymentHandle
  (Serve routes to the replica with the fewest requests in flight). A worker that dies under a
  request turns into a clean 503 (OpenAI shape; the SDK retries it) instead of a hung request;
  Serve starts a replacement. It keeps the images of ``response_format=url`` and the progress of
  the jobs in flight (A1111 /progress); A1111 /interrupt cancels the jobs running now.

The stateful ComfyUI API (queue, history, WebSocket, files) is not part of this: see docs/api.md
for several ``sd3fp8 serve`` instances behind a proxy with client affinity.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from sd3fp8.errors import ConfigError
from sd3fp8.server.imagejobs import INTERRUPTED, TERMINAL, UNAVAILABLE, Failed, ImageJob, Started

log = logging.getLogger(__name__)
APP_NAME = "sd3fp8"


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Serve's autoscaler instead of a fixed count
    num_gpus: float | None = None  # per replica; None: 1 when the cluster has GPUs, else 0
    num_cpus: float = 1.0  # per replica
    threads: int | None = None  # torch threads per replica (default: num_cpus)
    max_batch_images: int = 8  # images one shared sampler run may hold
    max_ongoing_requests: int = 8  # per worker replica: accepted and queued there (what can batch)
    token: str | None = None
    max_body: int = 100 * 2**20

    def __post_init__(self):
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not (0 <= low <= high and high >= 1):
                raise ConfigError(f"--autoscale MIN,MAX needs 0 <= MIN <= MAX and MAX >= 1, got {low},{high}")


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--autoscale takes MIN,MAX (for example 1,4), got {text!r}") from None
    return low, high


# ---- the worker replica ---------------------------------------------------------------------------


class ImageWorker:
    """One engine per replica; jobs stream their events back to the ingress."""

    def __init__(self, backend_factory: Callable[[], object], max_batch_images: int = 8, threads: int | None = None):
        import torch
        from ray import serve

        from sd3fp8.server.localrunner import LocalRunner

        if threads:
            torch.set_num_threads(threads)
        self.backend = backend_factory()
        try:
            self.name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests calling the class directly)
            self.name = "local"
        self.root = Path(tempfile.mkdtemp(prefix="sd3fp8-replica-"))
        self.runner = LocalRunner(self.backend, self.root, max_batch_images=max_batch_images, name=self.name)
        models = self.backend.model_files("checkpoints")
        if models:  # load before taking requests: a replica is ready when its engine is
            self.backend.load_checkpoint(models[0])
        self.runner.start()

    def inventory(self) -> dict:
        from sd3fp8.server.imageapi import Inventory

        return Inventory.of_backend(self.backend).to_dict()

    async def run(self, job: ImageJob):
        async with aclosing(self.runner.run(job)) as events:
            async for event in events:
                yield event

    def interrupt(self) -> bool:
        return self.runner.interrupt()

    def check_health(self) -> None:
        if not self.runner.alive:
            raise RuntimeError("the job runner thread is not running")

    def __del__(self):
        try:
            self.runner.stop(timeout=5)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# ---- the ingress ------------------------------------------------------------------------------------


class RayRunner:
    """The ingress's runner: jobs go to worker replicas through a streaming handle."""

    def __init__(self, handle):
        self.handle = handle.options(stream=True)
        self.inflight = 0
        self._running: set = set()
        self._interrupted: set = set()

    def remaining(self) -> int:
        return self.inflight

    def interrupt(self) -> bool:
        """Cancel the jobs running now (queued ones go on)."""
        running = list(self._running)
        for response in running:
            self._interrupted.add(id(response))
            response.cancel()
        return bool(running)

    async def run(self, job: ImageJob):
        from ray.exceptions import RayError, TaskCancelledError

        response = self.handle.run.remote(job)
        self.inflight += 1
        done = False
        try:
            async for event in response:
                if isinstance(event, Started):
                    self._running.add(response)
                done = isinstance(event, TERMINAL)
                yield event
                if done:
                    return
            done = True
            yield Failed(UNAVAILABLE, "the worker ended the job without a result")
        except TaskCancelledError:
            done = True
            if id(response) in self._interrupted:
                yield Failed(INTERRUPTED, "the generation was interrupted")
            else:
                yield Failed(UNAVAILABLE, "the job was cancelled by the cluster")
        except RayError as e:
            done = True
            log.warning("a worker failed under a job: %s", e)
            yield Failed(UNAVAILABLE, f"the worker replica running this job failed ({type(e).__name__}); it is being replaced, "
                                      "retry the request")
        finally:
            self.inflight -= 1
            self._running.discard(response)
            self._interrupted.discard(id(response))
            if not done:
                response.cancel()


class ApiIngress:
    """FastAPI ingress (built per replica by ``__serve_build_asgi_app__``)."""

    def __init__(self, worker, token: str | None = None, max_body: int = 100 * 2**20):
        self.worker, self.token, self.max_body = worker, token, max_body

    async def __serve_build_asgi_app__(self):
        from sd3fp8.server.imageapi import ImageApi, Inventory, build_app

        inventory = Inventory.from_dict(await self.worker.inventory.remote())
        runner = RayRunner(self.worker)
        api = ImageApi(runner=runner, inventory=lambda: inventory, interrupt=runner.interrupt, remaining=runner.remaining)
        return build_app(api, token=self.token, max_body=self.max_body)


def worker_options(options: RayOptions, has_gpus: bool) -> dict:
    """The ImageWorker deployment's options: one GPU per replica where the cluster has GPUs,
    a fixed replica count or Serve's autoscaler, health checks."""
    gpus = options.num_gpus if options.num_gpus is not None else (1 if has_gpus else 0)
    result = {"ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": gpus}, "max_ongoing_requests": options.max_ongoing_requests,
              "health_check_period_s": 5, "health_check_timeout_s": 60, "graceful_shutdown_timeout_s": 5}
    if options.autoscale is not None:
        low, high = options.autoscale
        result["autoscaling_config"] = {"min_replicas": low, "initial_replicas": max(low, 1), "max_replicas": high,
                                        "target_ongoing_requests": 2}
    else:
        result["num_replicas"] = options.replicas
    return result


def build_ray_app(backend_factory: Callable[[], object], options: RayOptions, has_gpus: bool = False):
    """The Serve application (``serve.run(app, route_prefix="/")``): ingress + worker deployments."""
    from ray import serve

    worker = serve.deployment(name="ImageWorker", **worker_options(options, has_gpus))(ImageWorker)
    ingress = serve.deployment(name="ImageApi", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                               health_check_period_s=5)(serve.ingress()(ApiIngress))
    threads = options.threads or max(1, int(options.num_cpus))
    return ingress.bind(worker.bind(backend_factory, options.max_batch_images, threads), options.token, options.max_body)


def start(backend_factory: Callable[[], object], options: RayOptions, host: str = "127.0.0.1", port: int = 8188,
          address: str | None = None, ray_init: dict | None = None) -> str:
    """Connect to (or start) a Ray cluster, deploy the app, return its URL (blocks until the
    replicas have loaded their engines)."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ConfigError(f"--ray needs Ray Serve: pip install 'sd3fp8[scale]' ({e.name} is missing)") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, **(ray_init or {}))
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_ray_app(backend_factory, options, has_gpus), name=APP_NAME, route_prefix="/", blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(backend_factory: Callable[[], object], options: RayOptions, host: str, port: int, address: str | None = None) -> None:
    """``sd3fp8 serve --ray``: deploy, print the URL, serve until Ctrl-C."""
    url = start(backend_factory, options, host, port, address)
    replicas = f"{options.autoscale[0]}-{options.autoscale[1]} (autoscaled)" if options.autoscale else str(options.replicas)
    print(f"sd3fp8 serve --ray: OpenAI and A1111 APIs at {url} over {replicas} engine replica(s) (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def replica_names() -> list[str]:
    """Actor names of the worker replicas (tests, operations)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "ImageWorker" in a["name"] and a["name"].startswith("SERVE_REPLICA"))


__all__ = ["APP_NAME", "ApiIngress", "ImageWorker", "RayOptions", "RayRunner", "build_ray_app", "parse_autoscale",
           "replica_names", "serve_forever", "start", "stop", "worker_options"]
