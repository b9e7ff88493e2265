"""Image jobs without HTTP: the workflow a request becomes, and the LocalRunner of the Ray replicas
(events, batching of jobs with one schedule, cancelling, interrupting) over the fake backend."""

import asyncio
from contextlib import aclosing

import pytest

from sd3fp8.server.imageapi import aspect_size
from sd3fp8.server.imagejobs import INTERRUPTED, INVALID, Failed, Finished, ImageJob, Preview, Progress, Started, to_workflow
from sd3fp8.server.localrunner import LocalRunner
from sd3fp8.server.openai_api import partial_steps
from sd3fp8.workflow import build_registry, validate_prompt
from sd3fp8.workflow.spec import Folders
from tests.fake_backend import FakeBackend

MODEL = "sd3.5_medium.safetensors"


class BatchingFake(FakeBackend):
    """The fake backend with sample_batch: records each shared run, then samples each request."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches = []

    def sample_batch(self, requests, callback, interrupt):
        self.batches.append([r.seed for r in requests])
        return [self.sample(r, callback, interrupt) for r in requests]


def job(seed=1, **fields) -> ImageJob:
    return ImageJob(**{"model": MODEL, "prompt": "a red circle", "seed": seed, "width": 32, "height": 32, "steps": 3, **fields})


async def collect(runner: LocalRunner, image_job: ImageJob) -> list:
    async with aclosing(runner.run(image_job)) as events:
        return [event async for event in events]


@pytest.fixture
def runner(tmp_path):
    runners = []

    def make(backend=None, **options):
        runners.append(LocalRunner(backend or FakeBackend(), tmp_path / f"r{len(runners)}", name="w", **options))
        runners[-1].start()
        return runners[-1]

    yield make
    for r in runners:
        r.stop()


def test_the_workflows_validate(tmp_path):
    registry = build_registry(FakeBackend(), Folders.under(tmp_path))
    txt2img = to_workflow(job(n=3))
    assert validate_prompt(registry, txt2img.prompt).ok and txt2img.samplers == ("10",) and txt2img.outputs == ("12",)
    assert txt2img.prompt["4"]["inputs"] == {"width": 32, "height": 32, "batch_size": 3}
    img2img = to_workflow(job(n=2, init_image=b"png", denoise=0.5, save_prefix="x/y"), init_name="_api/a.png")
    assert [img2img.prompt[s]["inputs"]["seed"] for s in img2img.samplers] == [1, 2]
    assert img2img.prompt["23"]["class_type"] == "SaveImage" and img2img.prompt["4"]["inputs"]["image"] == "_api/a.png"
    assert job(seed=2**64 - 1, n=2, init_image=b"x").seeds() == [2**64 - 1, 0]


def test_partial_steps_and_sizes():
    assert partial_steps(20, 3) == {5, 10, 15} and partial_steps(2, 3) == {1, 2} and partial_steps(6, 1) == {3}
    assert aspect_size(1536, 1024, 1024, 1024) == (1248, 832) and aspect_size(64, 64, 64, 64) == (64, 64)


def test_events_of_a_job(runner):
    local = runner()
    events = asyncio.run(collect(local, job(n=2, previews=True)))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert [(e.step, e.total) for e in events if isinstance(e, Progress)] == [(1, 3), (2, 3), (3, 3)]
    assert [e.step for e in events if isinstance(e, Preview)] == [1, 2, 3]
    finished = events[-1]
    assert [im.size for im in finished.images] == [(32, 32)] * 2 and finished.seeds == (1, 1) and finished.batch_indices == (0, 1)
    assert finished.worker == "w"
    quiet = asyncio.run(collect(local, job()))
    assert not any(isinstance(e, Preview) for e in quiet)  # previews only when asked for


def test_an_invalid_job_fails_before_the_queue(runner):
    (failed,) = asyncio.run(collect(runner(), job(model="nope.safetensors")))
    assert isinstance(failed, Failed) and failed.kind == INVALID and "ckpt_name" in failed.message


def test_jobs_waiting_together_share_a_sampler_run(runner):
    backend = BatchingFake(step_delay=0.02)
    local = runner(backend, max_batch_images=4)

    async def scenario():
        blocker = asyncio.ensure_future(collect(local, job(seed=100, steps=20, sampler="euler_ancestral")))
        while not backend.sampling.is_set():
            await asyncio.sleep(0.01)
        waiting = [job(seed=s, n=2) for s in (1, 2, 3)] + [job(seed=4, steps=5)]
        results = await asyncio.gather(*[collect(local, j) for j in waiting])
        return await blocker, results

    blocker, results = asyncio.run(scenario())
    assert isinstance(blocker[-1], Finished) and all(isinstance(r[-1], Finished) for r in results)
    assert backend.batches == [[1, 2]]  # 4 images at most; seed 3 ran alone, and seed 4 (5 steps) and the blocker never batch
    assert [len(r[-1].images) for r in results] == [2, 2, 2, 1]
    assert local.batches_run == 1


def test_cancel_and_interrupt(runner):
    backend = FakeBackend(step_delay=0.05)
    local = runner(backend)

    async def scenario():
        running = asyncio.ensure_future(collect(local, job(seed=1, steps=400)))
        while not backend.sampling.is_set():
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(collect(local, job(seed=2)))
        while local.remaining() < 2:
            await asyncio.sleep(0.01)
        waiting.cancel()  # the client went away while its job waited
        await asyncio.gather(waiting, return_exceptions=True)
        assert local.remaining() == 1
        assert local.interrupt()
        return await running

    events = asyncio.run(scenario())
    assert isinstance(events[-1], Failed) and events[-1].kind == INTERRUPTED
    assert [r.seed for r in backend.requests] == [1]  # the cancelled job never ran
