"""LocalRunner: image jobs on a runner of its own (each Ray Serve replica has one), with its own
executor on its own thread, and batching: txt2img requests waiting together whose schedules match
(same model, size, steps, cfg, deterministic sampler, scheduler) share one sampler run when the
backend offers ``sample_batch``. It yields the same events as the shared queue's runner
(server/imagejobs.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from sd3fp8.server.imagejobs import (
    EXECUTION,
    INTERRUPTED,
    INVALID,
    TERMINAL,
    UNAVAILABLE,
    Failed,
    Finished,
    ImageJob,
    Preview,
    Progress,
    Started,
    Workflow,
    failure_from_error,
    remove_init_image,
    to_workflow,
    validation_message,
    write_init_image,
)
from sd3fp8.workflow.types import Interrupted, InterruptFlag

log = logging.getLogger(__name__)


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
