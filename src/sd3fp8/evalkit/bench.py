"""`sd3fp8 bench`: speed, memory and quality of BF16 and of the FP8 routes people use, side by side.

Every configuration (evalkit/configs.py) runs in its own process (clean memory figures): load, one
warm-up image, then ``repeats`` passes over the prompts; per-step latency (median of step-to-step
times), end-to-end time per image, load time, peak memory (CUDA max allocated on a GPU, peak RSS on
a CPU), transformer time per call and bytes per component. The worker writes its outcome to a
result file (measurements, or the error) and exits non-zero on failure; the parent reads that file
and the exit status, so a route that cannot be installed or run is reported with its error, never
dropped. The parent compares each configuration's images with the reference's (evalkit/metrics.py).

With ``synthetic`` set ("medium" / "large"), the pipeline is replaced by a random-weight MMDiT of
that width (``blocks`` deep) timed alone on one input; quality is the output's SQNR vs the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sd3fp8.engine.modelspec import ModelSpec
from sd3fp8.errors import SD3FP8Error
from sd3fp8.evalkit.configs import parse_configuration, parse_configurations
from sd3fp8.evalkit.metrics import module_bytes
from sd3fp8.evalkit.synthetic import SYNTHETIC_HEADS
from sd3fp8.io.atomic import atomic_write
from sd3fp8.policy import COMPONENTS, Policy

REFERENCE = "bf16"
DEFAULT_CONFIGS = ("bf16", "fp32", "fp8", "diffusers-layerwise", "quanto-qfloat8", "torchao-float8-wo", "fp8-cast")
SYNTHETIC = SYNTHETIC_HEADS  # --synthetic kinds: attention heads (x 64 = width)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    model: ModelSpec
    prompts: tuple[str, ...]
    steps: int | None  # None: the model's recipe
    width: int | None
    height: int | None
    repeats: int
    out: str
    calibration: str | None = None
    synthetic: str | None = None  # medium | large: transformer alone, random weights
    blocks: int = 2
    policy: dict | None = None  # the base policy the configurations change (Policy.to_dict); None: the default

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchSpec:
        data = json.loads(text)
        return cls(**{**data, "model": ModelSpec(**data["model"]), "prompts": tuple(data["prompts"])})

    def base_policy(self) -> Policy | None:
        return Policy.from_dict(self.policy) if self.policy else None


# ---- one configuration, in its own process ---------------------------------------------------

def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the peak since the last :func:`reset_peak_memory` (one phase); CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a phase (load, run): CUDA's peak restarts from what is allocated now. (A CPU's peak RSS
    cannot be reset: there the run phase's figure includes loading.)"""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


class CallTimer:
    """Wall time of every call of a module: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: list[float] = []
        self._start = None
        module.register_forward_pre_hook(lambda m, a: self._begin())
        module.register_forward_hook(lambda m, a, o: self._end())

    def _begin(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _end(self):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.times.append(self._start.elapsed_time(end) / 1e3)
        else:
            self.times.append(time.perf_counter() - self._start)


def run_pipeline_config(name: str, spec: BenchSpec) -> dict:
    from sd3fp8.evalkit.configs import load_configuration, resident_transformer
    from sd3fp8.runtime import resolve_device

    config = parse_configuration(name)
    start = time.perf_counter()
    reset_peak_memory(resolve_device(config.runtime.get("device", "auto")))
    engine = load_configuration(spec.model, config, spec.base_policy(), spec.calibration)
    load_seconds = time.perf_counter() - start
    load_peak = peak_memory_bytes(engine.device)
    timer = CallTimer(resident_transformer(engine), engine.device)
    step_ends: list[float] = []

    def generate(prompt, seed):
        step_ends.clear()
        result = engine(prompt, seed=seed, steps=spec.steps, width=spec.width, height=spec.height,
                        callback=lambda info: step_ends.append(time.perf_counter()))
        steps = [b - a for a, b in zip(step_ends, step_ends[1:])]
        return result, steps

    generate(spec.prompts[0], 0)  # warm-up: allocator, kernels, decode tables
    timer.times.clear()
    reset_peak_memory(engine.device)
    seconds, step_times = [], []
    image_dir = Path(spec.out) / "raw" / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    for repeat in range(spec.repeats):
        for i, prompt in enumerate(spec.prompts):
            result, steps = generate(prompt, i)
            seconds.append(result.seconds)
            step_times += steps
            if repeat == 0:
                result.images[0].save(image_dir / f"{i:03d}.png")
    return {
        "load_seconds": load_seconds,
        "seconds_per_image": statistics.median(seconds),
        "seconds_per_step": statistics.median(step_times) if step_times else statistics.median(seconds) / spec.steps,
        "transformer_seconds_per_call": statistics.median(timer.times),
        "peak_memory_bytes": peak_memory_bytes(engine.device),
        "load_peak_memory_bytes": load_peak,
        "bytes": {c: module_bytes(engine.component(c)) for c in COMPONENTS},
        "compute_dtype": str(engine.compute_dtype).removeprefix("torch."),
        "device": str(engine.device),
    }


def worker(name: str, spec_json: str, result_path: str) -> int:
    """Run one configuration; write {"status": "ok", "result": ...} or {"status": "failed", "error":
    ..., "traceback": ...} to ``result_path``. Returns the exit status (0 only on success)."""
    try:
        from sd3fp8._env import quiet_libraries
        from sd3fp8.evalkit.configs import check_configurations

        spec = BenchSpec.from_json(spec_json)
        check_configurations([parse_configuration(name)], spec.calibration, synthetic=spec.synthetic is not None)  # before the imports
        quiet_libraries()
        from sd3fp8.evalkit.synthetic import run_synthetic_config

        outcome = {"status": "ok", "result": (run_synthetic_config if spec.synthetic else run_pipeline_config)(name, spec)}
    except Exception as e:  # any failure is this configuration's result: reported by the parent, never dropped
        message = str(e) if isinstance(e, SD3FP8Error) else f"{type(e).__name__}: {e}"
        outcome = {"status": "failed", "error": message.strip().splitlines()[0] if message.strip() else type(e).__name__,
                   "traceback": traceback.format_exc()}
    with atomic_write(result_path, "w") as f:
        json.dump(outcome, f)
    return 0 if outcome["status"] == "ok" else 1


def run_in_process(name: str, spec: BenchSpec) -> dict:
    """One configuration in a fresh interpreter: its measurements, or {"error": ..., "exit_status": ...}.
    Success is exit status 0 with an "ok" result file; anything else is a failure, described by the
    result file when the worker wrote one, else by its exit status (a crash or a kill)."""
    with tempfile.TemporaryDirectory(prefix="sd3fp8-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "sd3fp8.evalkit.bench", name, spec.to_json(), str(result_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        outcome = json.loads(result_path.read_text()) if result_path.is_file() else None
    if proc.returncode == 0 and outcome is not None and outcome.get("status") == "ok":
        return outcome["result"]
    if outcome is not None and outcome.get("status") == "failed":
        return {"error": outcome["error"], "exit_status": proc.returncode}
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with status {proc.returncode}"
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
    return {"error": f"worker {how} without a result", "exit_status": proc.returncode, "stderr_tail": tail}


# ---- the whole run ----------------------------------------------------------------------------

def environment() -> dict:
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "torchao", "optimum-quanto", "sd3fp8"):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return env


def parse_configs(text: str) -> list[str]:
    """Registry names (old bench spellings accepted), the bf16 reference first."""
    return [c.name for c in parse_configurations(text, REFERENCE)]


def bench(spec: BenchSpec, configs: list[str], progress=print) -> dict:
    rows = []
    for name in configs:
        progress(f"bench: {name} ...")
        result = run_in_process(name, spec)
        rows.append({"name": name, **result})
        progress(f"bench: {name}: " + (f"failed: {result['error']}" if "error" in result else f"{result['seconds_per_step']:.3f} s/step"))
    report = {"environment": environment(), "spec": dataclasses.asdict(spec), "reference": REFERENCE, "configs": rows}
    if "error" in rows[0]:
        report["note"] = f"the {REFERENCE} reference failed: no ratios or quality figures"
        return report
    ok = {r["name"] for r in rows if "error" not in r}
    # bf16 compute has its own error: the synthetic output is compared with fp32's when it ran
    report["quality_reference"] = "fp32" if spec.synthetic and "fp32" in ok else REFERENCE
    compare_rows(report, spec)
    return report


def compare_rows(report: dict, spec: BenchSpec) -> None:
    """Ratios against the reference and quality (SQNR, or PSNR/SSIM and shape-world scores), in place."""
    from PIL import Image

    from sd3fp8.evalkit.metrics import compare_images, sqnr, world_scores
    from sd3fp8.evalkit.prompt_sets import SHAPE_WORLD

    rows = report["configs"]
    ref = rows[0]
    images = {}
    judged = not spec.synthetic and spec.model.world() == SHAPE_WORLD
    for row in rows:
        if "error" in row:
            continue
        row["step_time_vs_reference"] = row["seconds_per_step"] / ref["seconds_per_step"]
        row["memory_vs_reference"] = row["peak_memory_bytes"] / ref["peak_memory_bytes"]
        row["transformer_bytes_vs_reference"] = row["bytes"]["transformer"] / ref["bytes"]["transformer"]
        if spec.synthetic:
            out = torch.load(Path(spec.out, "raw", f"{row['name']}.pt"))
            reference = torch.load(Path(spec.out, "raw", f"{report['quality_reference']}.pt"))
            quality = sqnr(reference, out)
            row["sqnr_db"] = quality if quality != float("inf") else None
            continue
        folder = Path(spec.out, "raw", "images", row["name"])
        images[row["name"]] = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
        row.update(compare_images(images[REFERENCE], images[row["name"]]))
        if judged:
            scores = world_scores(images[row["name"]], spec.prompts)
            row["adherence"], row["frechet_distance"] = scores["adherence"], scores["frechet_distance"]
    report["_images"] = images


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2], sys.argv[3]))
