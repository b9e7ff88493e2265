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
- :class:`LocalRunner` (Ray replicas) runs the same workflows with its own executor on its own
  thread, and batches: requests waiting together whose schedules match (same model, size, steps,
  cfg, deterministic sampler, scheduler; txt2img) share one sampler run when the backend offers
  ``sample_batch``.

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
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sd3fp8.workflow.types import Interrupted, InterruptFlag

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


# why a job failed -> what the API answers (see openai_api.STATUS)
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


# ---- a runner of its own (Ray replicas) -----------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    job: ImageJob
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    workflow: Workflow | None = None
    prompt: dict | None = None  # validated
    outputs: list | None = None
    init_name: str | None = None
    cancelled: bool = False

    def post(self, event) -> None:
        if not self.cancelled:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is gone: nobody to tell
                pass


@dataclass(eq=False)
class _Group:
    entries: list
    flag: InterruptFlag = field(default_factory=InterruptFlag)


class LocalRunner:
    """Runs jobs on a thread of its own with its own executor over ``backend``: folders under
    ``root``. Waiting txt2img jobs with matching schedules share a sampler run (up to
    ``max_batch_images`` images) when ``batching`` is on and the backend has ``sample_batch``."""

    def __init__(self, backend, root: Path, max_batch_images: int = 8, batching: bool = True, name: str | None = None):
        from sd3fp8.workflow import Executor, Folders, build_registry

        root = Path(root)
        self.folders = Folders(input=root / "input", output=root / "output", temp=root / "temp")
        for folder in (self.folders.input, self.folders.output, self.folders.temp):
            folder.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.registry = build_registry(backend, self.folders)
        self.executor = Executor(self.registry, backend, previews=True)
        self.max_batch_images = max(1, max_batch_images)
        self.batching = batching and callable(getattr(backend, "sample_batch", None))
        self.name = name
        self.batches_run = 0  # sampler runs that served more than one request
        self._pending: list[_Entry] = []
        self._running: _Group | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="sd3fp8-local-runner", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            pending, self._pending = self._pending, []
            if self._running is not None:
                self._running.flag.set()
            self._cond.notify_all()
        for entry in pending:
            entry.post(Failed(UNAVAILABLE, "the worker is shutting down"))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def remaining(self) -> int:
        with self._cond:
            return len(self._pending) + (len(self._running.entries) if self._running else 0)

    def interrupt(self) -> bool:
        """Interrupt what runs now (A1111's /interrupt)."""
        with self._cond:
            if self._running is None:
                return False
            self._running.flag.set()
            return True

    # -- submitting -------------------------------------------------------------------------------
    async def run(self, job: ImageJob) -> AsyncIterator:
        from sd3fp8.workflow import validate_prompt

        entry = _Entry(job, asyncio.get_running_loop(), asyncio.Queue())
        job_id = uuid.uuid4().hex
        if job.init_image is not None:
            entry.init_name = write_init_image(self.folders.input, job_id, job.init_image)
        done = False
        try:
            entry.workflow = to_workflow(job, entry.init_name)
            result = await asyncio.to_thread(validate_prompt, self.registry, entry.workflow.prompt)
            if not result.ok:
                done = True
                message, param = validation_message(result)
                yield Failed(INVALID, message, param)
                return
            entry.prompt, entry.outputs = result.prompt, result.outputs
            with self._cond:
                if self._stop:
                    done = True
                    yield Failed(UNAVAILABLE, "the worker is shutting down")
                    return
                self._pending.append(entry)
                self._cond.notify()
            while True:
                event = await entry.queue.get()
                done = isinstance(event, TERMINAL)
                yield event
                if done:
                    return
        finally:
            if not done:
                self._cancel(entry)
            remove_init_image(self.folders.input, entry.init_name)

    def _cancel(self, entry: _Entry) -> None:
        with self._cond:
            entry.cancelled = True
            if entry in self._pending:
                self._pending.remove(entry)
            elif self._running is not None and all(e.cancelled for e in self._running.entries):
                self._running.flag.set()

    # -- the thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop)
                if self._stop:
                    return
                group = _Group(self._take())
                self._running = group
            try:
                if len(group.entries) == 1:
                    self._run_single(group.entries[0], group.flag)
                else:
                    self._run_batch(group)
            except Exception as e:  # noqa: BLE001 - a bug must fail its jobs, not end the thread
                log.exception("image job failed")
                for entry in group.entries:
                    entry.post(Failed(EXECUTION, f"the generation failed: {e}"))
            finally:
                with self._cond:
                    self._running = None

    def _take(self) -> list[_Entry]:
        head = self._pending.pop(0)
        key = _job_key(head.job) if self.batching else None
        group, images = [head], head.job.n
        if key is None:
            return group
        for entry in list(self._pending):
            if _job_key(entry.job) == key and images + entry.job.n <= self.max_batch_images:
                self._pending.remove(entry)
                group.append(entry)
                images += entry.job.n
        return group

    def _run_single(self, entry: _Entry, flag: InterruptFlag) -> None:
        entry.post(Started())
        sink = _LocalSink(entry)
        outcome = self.executor.execute(uuid.uuid4().hex, entry.prompt, entry.outputs,
                                        {"preview_method": "auto" if entry.job.previews else "none"}, sink, flag)
        if outcome.success:
            job = entry.job
            if sum(len(b) for b in sink.images) != job.n:
                entry.post(Failed(EXECUTION, "the workflow produced the wrong number of images"))
                return
            entry.post(Finished(tuple(i for b in sink.images for i in b), tuple(job.seeds()), tuple(job.batch_indices()), self.name))
        elif outcome.interrupted:
            entry.post(Failed(INTERRUPTED, "the generation was interrupted"))
        else:
            errors = [data for event, data in outcome.messages if event == "execution_error"]
            entry.post(failure_from_error(errors[-1] if errors else {}))

    def _run_batch(self, group: _Group) -> None:
        """Jobs with one schedule: each text encoded and its latent made as the workflow's nodes
        would, sampled together (sub-batches by conditioning shape), each decoded."""
        import torch

        from sd3fp8.server.pipeline_backend import batch_key
        from sd3fp8.workflow import Latent, Model, SampleRequest, TextPrompts
        from sd3fp8.workflow.types import LATENT_CHANNELS, LATENT_DOWNSCALE

        backend, flag, entries = self.backend, group.flag, group.entries
        for entry in entries:
            entry.post(Started())
        unfinished = set(range(len(entries)))
        try:
            first = entries[0].job
            model, clip, vae = backend.load_checkpoint(first.model)
            buckets: dict = {}
            for index, entry in enumerate(entries):
                job = entry.job
                flag.check()
                latent = torch.zeros([job.n, LATENT_CHANNELS, job.height // LATENT_DOWNSCALE, job.width // LATENT_DOWNSCALE])
                request = SampleRequest(model=Model(model, job.model), positive=tuple(backend.encode_text(clip, TextPrompts.single(job.prompt))),
                                        negative=tuple(backend.encode_text(clip, TextPrompts.single(job.negative))), latent=Latent(latent),
                                        seed=job.seed, steps=job.steps, cfg=job.cfg, sampler_name=job.sampler, scheduler=job.scheduler,
                                        denoise=job.denoise)
                buckets.setdefault(batch_key(request), []).append((index, request))
            for bucket in buckets.values():
                live = [(i, r) for i, r in bucket if not entries[i].cancelled]
                if not live:
                    unfinished -= {i for i, _ in bucket}
                    continue
                samples = self._sample(backend, [entries[i] for i, _ in live], [r for _, r in live], flag)
                for (index, _), latents in zip(live, samples):
                    flag.check()
                    entry = entries[index]
                    images = tuple(_to_pils(backend.vae_decode(vae, latents)))
                    entry.post(Finished(images, tuple(entry.job.seeds()), tuple(entry.job.batch_indices()), self.name))
                    unfinished.discard(index)
                if len(live) > 1:
                    self.batches_run += 1
        except Interrupted:
            for index in unfinished:
                entries[index].post(Failed(INTERRUPTED, "the generation was interrupted"))
        except Exception as e:  # noqa: BLE001 - reported to each job, as execution_error would be
            log.exception("batched image jobs failed")
            failure = failure_from_error({"exception_type": type(e).__qualname__, "exception_message": str(e), "node_type": "KSampler"})
            for index in unfinished:
                entries[index].post(failure)

    @staticmethod
    def _sample(backend, entries: list[_Entry], requests: list, flag: InterruptFlag) -> list:
        from sd3fp8.workflow.preview import latent_to_rgb

        sizes = [r.latent.samples.shape[0] for r in requests]

        def callback(step: int, total: int, x0) -> None:
            flag.check()
            offset = 0
            for entry, size in zip(entries, sizes):
                entry.post(Progress(step, total))
                if entry.job.previews and x0 is not None:
                    image = latent_to_rgb(x0[offset: offset + size])
                    if image is not None:
                        entry.post(Preview(step, total, image))
                offset += size

        if len(requests) == 1:
            return [backend.sample(requests[0], callback, flag)]
        return backend.sample_batch(requests, callback, flag)


def _to_pils(images) -> list:
    from sd3fp8.workflow.images import to_pil
    from sd3fp8.workflow.types import check_image

    return [to_pil(image) for image in check_image(images, "decoded images")]


def _job_key(job: ImageJob) -> tuple | None:
    """Jobs that may share a sampler run (their conditioning shapes are checked once encoded)."""
    from sd3fp8.server.pipeline_backend import DETERMINISTIC_SAMPLERS

    if job.init_image is not None or job.sampler not in DETERMINISTIC_SAMPLERS or job.save_prefix or job.denoise != 1.0:
        return None
    return (job.model, job.width, job.height, job.steps, float(job.cfg), job.sampler, job.scheduler)


class _LocalSink:
    """The executor's events for one job, as job events."""

    def __init__(self, entry: _Entry):
        self.entry, self.workflow = entry, entry.workflow
        self.images: list[list] = [[] for _ in self.workflow.outputs]
        self.steps: dict[str, tuple[int, int]] = {}

    def send(self, event: str, data: dict, broadcast: bool = False) -> None:
        if event == "progress" and data.get("node") in self.workflow.samplers:
            node = data["node"]
            self.steps[node] = (int(data["value"]), int(data["max"]))
            self.entry.post(Progress(*self.steps[node], self.workflow.samplers.index(node)))

    def preview(self, node_id: str, preview) -> None:
        if node_id in self.workflow.outputs:
            self.images[self.workflow.outputs.index(node_id)].append(preview.image)
        elif node_id in self.workflow.samplers and node_id in self.steps:
            self.entry.post(Preview(*self.steps[node_id], preview.image, self.workflow.samplers.index(node_id)))
