"""Image jobs for the OpenAI and A1111 adapters: what a request asks for (:class:`ImageJob`), the
ComfyUI workflow it becomes, and the runners that execute it.

Every job is an API-format workflow over the SD3.5 node set (CheckpointLoaderSimple ->
CLIPTextEncode x2 -> EmptySD3LatentImage, or LoadImage -> VAEEncode -> KSampler -> VAEDecode ->
SaveImageWebsocket), validated by the same rules as POST /prompt:

- :class:`QueueRunner` (``sd3fp8 serve``) puts it into the server's own queue, so the one worker
  runs it between ComfyUI prompts and /queue, /history, /interrupt and /system_stats see it. It
  listens as an in-process WebSocket client of the hub: progress events, latent2rgb preview frames
  of the sampler, the PNG frames of SaveImageWebsocket (the images themselves: no files), and
  ``executing`` with node None (the end).
- :class:`~sd3fp8.server.localrunner.LocalRunner` (Ray replicas) runs the same workflows with its
  own executor on its own thread, and batches (server/localrunner.py).

Both yield the same events (:class:`Started`, :class:`Progress`, :class:`Preview`, then
:class:`Finished` or :class:`Failed`) from an async generator; closing it early (the client went
away) takes the job out of the queue or interrupts it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

API_INPUT_SUBFOLDER = "_api"  # init images of edits/img2img under input/, removed after the job
SEED_MODULUS = 2**64


@dataclass(frozen=True)
class ImageJob:
    """One generation request, resolved: every field has its final value."""

    model: str
    prompt: str
    negative: str = ""
    seed: int = 0
    n: int = 1
    width: int = 1024
    height: int = 1024
    steps: int = 28
    cfg: float = 4.5
    sampler: str = "euler"
    scheduler: str = "normal"
    denoise: float = 1.0
    init_image: bytes | None = None  # PNG bytes, exactly width x height (img2img / edits)
    previews: bool = False  # sampler previews wanted (partial images, A1111 progress)
    save_prefix: str | None = None  # also SaveImage into output/ with this prefix (A1111 save_images)
    source: str = "api"  # "openai" | "a1111": shown in the queue item's extra_data
    user: str | None = None  # OpenAI's `user`, kept in the queue item's extra_data

    @property
    def branches(self) -> int:
        """Sampler runs: one batch of n for txt2img; n runs (seeds seed..seed+n-1) from an init image."""
        return 1 if self.init_image is None else self.n

    def seeds(self) -> list[int]:
        """(seed, batch_index) of each image: txt2img images are draws 0..n-1 of one seed's noise
        (ComfyUI's batch rule), img2img images each have their own seed."""
        if self.init_image is None:
            return [self.seed] * self.n
        return [(self.seed + i) % SEED_MODULUS for i in range(self.n)]

    def batch_indices(self) -> list[int]:
        return list(range(self.n)) if self.init_image is None else [0] * self.n


# ---- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The job left the queue and runs."""


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    branch: int = 0


@dataclass(frozen=True)
class Preview:
    """A sampler preview (latent2rgb of the denoised prediction, latent-sized) after ``step``."""

    step: int
    total: int
    image: Image.Image
    branch: int = 0


@dataclass(frozen=True)
class Finished:
    images: tuple  # PIL images, n of them
    seeds: tuple[int, ...]
    batch_indices: tuple[int, ...]
    worker: str | None = None  # which replica ran it (Ray)


# why a job failed -> what the API answers (see openai_request.from_failure)
INVALID, QUEUE_FULL, INTERRUPTED, EXECUTION, OUT_OF_MEMORY, UNAVAILABLE = (
    "invalid", "queue_full", "interrupted", "execution", "out_of_memory", "unavailable")


@dataclass(frozen=True)
class Failed:
    kind: str
    message: str
    param: str | None = None


TERMINAL = (Finished, Failed)


# ---- the workflow ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workflow:
    prompt: dict
    samplers: tuple[str, ...]  # KSampler node of each branch
    outputs: tuple[str, ...]  # SaveImageWebsocket node of each branch


def to_workflow(job: ImageJob, init_name: str | None = None) -> Workflow:
    """The API-format ComfyUI prompt for ``job`` (``init_name``: its init image, as LoadImage names it)."""
    prompt: dict = {
        "1": _node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=job.model),
        "2": _node("CLIPTextEncode", "Positive Prompt", text=job.prompt, clip=["1", 1]),
        "3": _node("CLIPTextEncode", "Negative Prompt", text=job.negative, clip=["1", 1]),
    }
    if job.init_image is None:
        prompt["4"] = _node("EmptySD3LatentImage", "EmptySD3LatentImage", width=job.width, height=job.height, batch_size=job.n)
        latent = ["4", 0]
    else:
        if init_name is None:
            raise ValueError("an img2img job needs the name of its init image")
        prompt["4"] = _node("LoadImage", "Load Image", image=init_name)
        prompt["5"] = _node("VAEEncode", "VAE Encode", pixels=["4", 0], vae=["1", 2])
        latent = ["5", 0]
    samplers, outputs = [], []
    for branch, seed in enumerate(job.seeds()[: job.branches]):
        base = 10 * (branch + 1)
        s, d, o = str(base), str(base + 1), str(base + 2)
        prompt[s] = _node("KSampler", "KSampler", seed=seed, steps=job.steps, cfg=job.cfg, sampler_name=job.sampler,
                          scheduler=job.scheduler, denoise=job.denoise, model=["1", 0], positive=["2", 0], negative=["3", 0],
                          latent_image=latent)
        prompt[d] = _node("VAEDecode", "VAE Decode", samples=[s, 0], vae=["1", 2])
        prompt[o] = _node("SaveImageWebsocket", "SaveImageWebsocket", images=[d, 0])
        if job.save_prefix:
            prompt[str(base + 3)] = _node("SaveImage", "Save Image", images=[d, 0], filename_prefix=job.save_prefix)
        samplers.append(s)
        outputs.append(o)
    return Workflow(prompt, tuple(samplers), tuple(outputs))


def _node(class_type: str, title: str, **inputs) -> dict:
    return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}


def validation_message(result) -> tuple[str, str | None]:
    """(message, offending input) of a failed ValidationResult, from its first node error."""
    for node in (result.node_errors or {}).values():
        for error in node.get("errors", []):
            name = (error.get("extra_info") or {}).get("input_name")
            return f"{error.get('message', 'invalid')}: {error.get('details', '')}".rstrip(": "), name
    error = result.error or {}
    return f"{error.get('message', 'invalid request')} {error.get('details', '')}".strip(), None


def failure_from_error(data: dict) -> Failed:
    """Failed for an execution_error event (ComfyUI's shape)."""
    kind, message = str(data.get("exception_type", "")), str(data.get("exception_message", "")) or "the generation failed"
    if "OutOfMemory" in kind or "out of memory" in message.lower():
        return Failed(OUT_OF_MEMORY, f"out of memory: {message}")
    return Failed(EXECUTION, f"{data.get('node_type', 'a node')} failed: {message}")


def write_init_image(input_folder: Path, job_id: str, png: bytes) -> str:
    """Store an init image where LoadImage finds it; returns the name LoadImage takes."""
    folder = Path(input_folder) / API_INPUT_SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job_id}.png").write_bytes(png)
    return f"{API_INPUT_SUBFOLDER}/{job_id}.png"


def remove_init_image(input_folder: Path, name: str | None) -> None:
    if name:
        (Path(input_folder) / name).unlink(missing_ok=True)


# ---- the shared queue (sd3fp8 serve) --------------------------------------------------------------


class _HubListener:
    """Stands in for a WebSocket in the hub: what the hub sends arrives in an asyncio queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    async def send_json(self, data) -> None:
        self.queue.put_nowait(("json", data))

    async def send_bytes(self, data: bytes) -> None:
        self.queue.put_nowait(("bytes", data))

    async def close(self, code: int = 1000) -> None:
        self.queue.put_nowait(("closed", code))


def parse_preview_frame(frame: bytes) -> tuple[dict, bytes] | None:
    """(metadata, image bytes) of a format-4 binary frame (PREVIEW_IMAGE_WITH_METADATA), else None."""
    if len(frame) < 8:
        return None
    kind, length = struct.unpack(">II", frame[:8])
    if kind != 4 or len(frame) < 8 + length:
        return None
    try:
        return json.loads(frame[8: 8 + length]), frame[8 + length:]
    except ValueError:
        return None


class QueueRunner:
    """Runs jobs in ``sd3fp8 serve``'s queue (``state``: the app's ServerState)."""

    def __init__(self, state):
        self.state = state

    async def run(self, job: ImageJob) -> AsyncIterator:
        from starlette.concurrency import run_in_threadpool

        from sd3fp8.server.jobs import QueueFull

        state = self.state
        prompt_id = str(uuid.uuid4())
        sid = f"sd3fp8-{job.source}-{prompt_id}"
        init_name = write_init_image(state.config.input, prompt_id, job.init_image) if job.init_image is not None else None
        try:
            workflow = to_workflow(job, init_name)
            result = await run_in_threadpool(state.prepare, workflow.prompt)
            if not result.ok:
                message, param = validation_message(result)
                yield Failed(INVALID, message, param)
                return
            listener = _HubListener()
            state.hub.register(sid, listener)
            state.hub.set_features(sid, {"supports_preview_metadata": True})
            done = False
            try:
                extra = {"client_id": sid, "create_time": int(time.time() * 1000), "preview_method": "auto" if job.previews else "none",
                         "sd3fp8_api": job.source}
                if job.user:
                    extra["user"] = job.user
                try:
                    state.queue.put(prompt_id, state.queue.number_for(None, False), result.prompt, extra, result.outputs)
                except QueueFull as e:
                    done = True
                    yield Failed(QUEUE_FULL, f"the queue is full; try again later ({e})")
                    return
                async for event in self._events(listener, prompt_id, workflow, job):
                    done = done or isinstance(event, TERMINAL)
                    yield event
            finally:
                state.hub.unregister(sid, listener)
                if not done:  # the client went away: the job goes too
                    state.queue.delete([prompt_id])
                    state.worker.interrupt(prompt_id)
        finally:
            remove_init_image(state.config.input, init_name)

    @staticmethod
    async def _events(listener: _HubListener, prompt_id: str, workflow: Workflow, job: ImageJob) -> AsyncIterator:
        images: list[list] = [[] for _ in workflow.outputs]
        steps: dict[str, tuple[int, int]] = {}
        failure: Failed | None = None
        while True:
            kind, data = await listener.queue.get()
            if kind == "closed":
                yield Failed(UNAVAILABLE, "the server is shutting down")
                return
            if kind == "bytes":
                parsed = parse_preview_frame(data)
                if parsed is None or parsed[0].get("prompt_id") != prompt_id:
                    continue
                meta, payload = parsed
                node = meta.get("node_id")
                if node in workflow.outputs:
                    images[workflow.outputs.index(node)].append(_open(payload))
                elif node in workflow.samplers and node in steps:
                    step, total = steps[node]
                    yield Preview(step, total, _open(payload), workflow.samplers.index(node))
                continue
            event, body = data.get("type"), data.get("data") or {}
            if body.get("prompt_id") not in (None, prompt_id):
                continue
            if event == "execution_start":
                yield Started()
            elif event == "progress" and body.get("node") in workflow.samplers:
                step, total = int(body["value"]), int(body["max"])
                steps[body["node"]] = (step, total)
                yield Progress(step, total, workflow.samplers.index(body["node"]))
            elif event == "execution_error":
                failure = failure_from_error(body)
            elif event == "execution_interrupted":
                failure = Failed(INTERRUPTED, "the generation was interrupted")
            elif event == "executing" and body.get("node") is None and body.get("prompt_id") == prompt_id:
                if failure is None and sum(len(i) for i in images) != job.n:
                    failure = Failed(EXECUTION, f"the workflow ended with {sum(len(i) for i in images)} of {job.n} images")
                yield failure or Finished(tuple(i for branch in images for i in branch), tuple(job.seeds()), tuple(job.batch_indices()))
                return


def _open(payload: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(payload))
    image.load()
    return image
