"""`sd3fp8 bench`: speed, memory and quality of BF16 and of the FP8 routes people use, side by side.

Every configuration runs in its own process (clean memory figures): load, one warm-up image, then
``repeats`` passes over the prompts; per-step latency (median of step-to-step times), end-to-end
time per image, load time, peak memory (CUDA max allocated on a GPU, peak RSS on a CPU),
transformer time per call and bytes per component. The parent compares each configuration's
images with the reference's (PSNR, SSIM; adherence and Frechet distance on shape-world models). A route that cannot
be installed or run is reported with its error, never dropped.

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
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sd3fp8.errors import ConfigError
from sd3fp8.evalkit.synthetic import SYNTHETIC_HEADS
from sd3fp8.policy import Policy

REFERENCE = "bf16"
# name -> (policy changes, runtime changes, route applied to the loaded transformer or None)
CONFIGS = {
    "bf16": ({"transformer": "bf16"}, {}, None),
    "fp16": ({"transformer": "fp16"}, {}, None),
    "fp32": ({"transformer": "fp32"}, {}, None),
    "sd3fp8": ({}, {}, None),  # weight-only (on GPUs with FP8 tensor cores: auto = scaled-mm)
    "sd3fp8-scaled-mm": ({}, {"force_fp8": True}, None),  # W8A8, dynamic per-tensor activation scales
    "sd3fp8-static": ({}, {"force_fp8": True}, "calibrated"),  # W8A8 with calibrated static scales
    # torch.compile'd transformers (the first step compiles: excluded by the warm-up image)
    "bf16-compile": ({"transformer": "bf16"}, {"compile": True}, None),
    "sd3fp8-compile": ({}, {"compile": True}, None),
    "sd3fp8-static-compile": ({}, {"force_fp8": True, "compile": True}, "calibrated"),
    "diffusers-layerwise": ({"transformer": "auto"}, {}, "layerwise"),
    "quanto-qfloat8": ({"transformer": "auto"}, {}, "quanto"),
    "torchao-float8-wo": ({"transformer": "auto"}, {}, "torchao-wo"),
    "torchao-float8-dq": ({"transformer": "auto"}, {}, "torchao-dq"),
    "plain-cast": ({"transformer": "auto"}, {}, "plain-cast"),
}
DEFAULT_CONFIGS = ("bf16", "fp32", "sd3fp8", "diffusers-layerwise", "quanto-qfloat8", "torchao-float8-wo", "plain-cast")
SYNTHETIC = SYNTHETIC_HEADS  # --synthetic kinds: attention heads (x 64 = width)
EXTRA_HINT = "pip install 'sd3fp8[bench]'"


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    model: str | None
    prompts: tuple[str, ...]
    steps: int | None  # None: the model's recipe
    width: int | None
    height: int | None
    repeats: int
    out: str
    calibration: str | None = None
    synthetic: str | None = None  # medium | large: transformer alone, random weights
    blocks: int = 2


# ---- routes: how each library stores a transformer's linears in FP8 -------------------------

class PlainCastLinear(nn.Module):
    """An FP8 weight cast without a scale and upcast on every call: how ComfyUI runs unscaled fp8
    files without its fast path."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clamp(-448, 448).to(torch.float8_e4m3fn), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def apply_route(route: str, transformer: nn.Module, keep, compute_dtype: torch.dtype) -> None:
    """Turn the linears ``keep`` selects into the route's FP8 form (the same layers for every route)."""
    names = [n for n, m in transformer.named_modules() if type(m) is nn.Linear and keep(n)]
    if route == "layerwise":
        skip = tuple(sorted({n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)} - set(names)))
        from diffusers.hooks import apply_layerwise_casting

        # ModelMixin.enable_layerwise_casting always adds SD3's own skip list ("pos_embed", "norm"),
        # which keeps the adaLN linears (a third of the weights) in 16 bit; diffusers' lower-level
        # hook takes exactly our layer set (it casts Linear and Conv layers only)
        apply_layerwise_casting(transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                skip_modules_pattern=tuple(f"^{n}$" for n in skip) + ("^pos_embed",))
    elif route == "quanto":
        try:
            from optimum.quanto import freeze, qfloat8, quantize
        except ImportError:
            raise ConfigError(f"optimum-quanto is not installed ({EXTRA_HINT})") from None
        quantize(transformer, weights=qfloat8, include=names)
        freeze(transformer)
    elif route in ("torchao-wo", "torchao-dq"):
        try:
            from torchao.quantization import (
                Float8DynamicActivationFloat8WeightConfig,
                Float8WeightOnlyConfig,
                quantize_,
            )
        except ImportError:
            raise ConfigError(f"torchao is not installed ({EXTRA_HINT})") from None
        config = Float8WeightOnlyConfig() if route == "torchao-wo" else Float8DynamicActivationFloat8WeightConfig()
        wanted = set(names)
        quantize_(transformer, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in wanted)
    elif route == "plain-cast":
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = transformer.get_submodule(parent)
            setattr(owner, child, PlainCastLinear(getattr(owner, child)))
    else:
        raise ConfigError(f"unknown route {route!r}")


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


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: tensor subclasses (quanto, torchao) through their inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        return sum(_storage_bytes(getattr(t, name)) for name in flatten()[0])
    return t.numel() * t.element_size()


def _component_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    unique = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(_storage_bytes(t) for t in unique.values())


def run_pipeline_config(name: str, spec: BenchSpec) -> dict:
    from sd3fp8.engine.pipeline import SD3FP8Pipeline
    from sd3fp8.runtime import RuntimeConfig, resolve_device

    policy_changes, runtime_changes, route = CONFIGS[name]
    if route == "calibrated" and spec.calibration is None:
        raise ConfigError("sd3fp8-static needs a calibration file: --calibration FILE")
    start = time.perf_counter()
    reset_peak_memory(resolve_device("auto"))
    engine = SD3FP8Pipeline.from_pretrained(
        spec.model, Policy().replace(**policy_changes), RuntimeConfig(**runtime_changes),
        calibration=spec.calibration if route == "calibrated" else None,
    )
    if route not in (None, "calibrated"):
        apply_route(route, engine.component("transformer"), Policy().layer_filter("transformer"), engine.compute_dtype)
    load_seconds = time.perf_counter() - start
    load_peak = peak_memory_bytes(engine.device)
    timer = CallTimer(engine.component("transformer"), engine.device)
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
    components = {c: _component_bytes(engine.component(c)) for c in
                  ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")}
    return {
        "load_seconds": load_seconds,
        "seconds_per_image": statistics.median(seconds),
        "seconds_per_step": statistics.median(step_times) if step_times else statistics.median(seconds) / spec.steps,
        "transformer_seconds_per_call": statistics.median(timer.times),
        "peak_memory_bytes": peak_memory_bytes(engine.device),
        "load_peak_memory_bytes": load_peak,
        "bytes": components,
        "compute_dtype": str(engine.compute_dtype).removeprefix("torch."),
        "device": str(engine.device),
    }


def worker(name: str, spec_json: str) -> None:
    from sd3fp8._env import quiet_libraries

    quiet_libraries()
    spec = BenchSpec(**json.loads(spec_json))
    spec = dataclasses.replace(spec, prompts=tuple(spec.prompts))
    from sd3fp8.evalkit.synthetic import run_synthetic_config

    result = (run_synthetic_config if spec.synthetic else run_pipeline_config)(name, spec)
    print("SD3FP8-BENCH " + json.dumps(result))


def run_in_process(name: str, spec: BenchSpec) -> dict:
    """One configuration in a fresh interpreter; failures come back as {"error": ...}."""
    cmd = [sys.executable, "-m", "sd3fp8.evalkit.bench", name, json.dumps(dataclasses.asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("SD3FP8-BENCH "):
            return json.loads(line.removeprefix("SD3FP8-BENCH "))
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else f"exit code {proc.returncode}")
    return {"error": error.strip()}


# ---- the whole run and its report ------------------------------------------------------------

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
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ConfigError(f"unknown bench configuration(s) {unknown}: expected some of {', '.join(CONFIGS)}")
    return [REFERENCE] + [n for n in names if n != REFERENCE]


def bench(spec: BenchSpec, configs: list[str], progress=print) -> dict:
    from PIL import Image

    from sd3fp8.evalkit.evaluation import SHAPE_WORLD, model_world
    from sd3fp8.evalkit.metrics import psnr, ssim

    rows = []
    for name in configs:
        progress(f"bench: {name} ...")
        result = run_in_process(name, spec)
        rows.append({"name": name, **result})
        progress(f"bench: {name}: " + (f"failed: {result['error']}" if "error" in result else f"{result['seconds_per_step']:.3f} s/step"))
    report = {"environment": environment(), "spec": dataclasses.asdict(spec), "reference": REFERENCE, "configs": rows}
    ref = rows[0]
    if "error" in ref:
        report["note"] = f"the {REFERENCE} reference failed: no ratios or quality figures"
        return report
    images = {}
    # bf16 compute has its own error: the synthetic output is compared with fp32's when it ran
    ok = {r["name"] for r in rows if "error" not in r}
    report["quality_reference"] = "fp32" if spec.synthetic and "fp32" in ok else REFERENCE
    for row in rows:
        if "error" in row:
            continue
        row["step_time_vs_reference"] = row["seconds_per_step"] / ref["seconds_per_step"]
        row["memory_vs_reference"] = row["peak_memory_bytes"] / ref["peak_memory_bytes"]
        row["transformer_bytes_vs_reference"] = row["bytes"]["transformer"] / ref["bytes"]["transformer"]
        if spec.synthetic:
            out = torch.load(Path(spec.out, "raw", f"{row['name']}.pt"))
            reference = torch.load(Path(spec.out, "raw", f"{report['quality_reference']}.pt"))
            noise = (out - reference).pow(2).mean()
            row["sqnr_db"] = float(10 * torch.log10(reference.pow(2).mean() / noise)) if noise > 0 else None
            continue
        folder = Path(spec.out, "raw", "images", row["name"])
        images[row["name"]] = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
        pairs = list(zip(images[REFERENCE], images[row["name"]]))
        row["psnr"] = float(np.mean([min(psnr(a, b), 100.0) for a, b in pairs]))
        row["ssim"] = float(np.mean([ssim(a, b) for a, b in pairs]))
        if spec.model is None or model_world(Path(spec.model)) == SHAPE_WORLD:
            from sd3fp8.evalkit.metrics import frechet_distance
            from sd3fp8.miniature.judge import adherence, features
            from sd3fp8.miniature.world import parse_caption, render

            row["adherence"] = float(np.mean([adherence(img, p) for img, p in zip(images[row["name"]], spec.prompts)]))
            if len(spec.prompts) > 1:  # distribution distance to the world's own renders, as eval reports it
                real = np.stack([features(np.asarray(render(parse_caption(p), seed=1000 + i))) for i, p in enumerate(spec.prompts)])
                row["frechet_distance"] = frechet_distance(np.stack([features(img) for img in images[row["name"]]]), real)
    report["_images"] = images
    return report


def markdown_table(report: dict) -> str:
    synthetic = report["spec"]["synthetic"]
    qref = report.get("quality_reference", REFERENCE)
    quality = f"SQNR vs {qref} (dB)" if synthetic else "PSNR vs bf16 (dB) | SSIM | adherence | Frechet dist."
    lines = [f"| config | s / step | x bf16 | transformer s / call | load s | peak memory GB | x bf16 | transformer MB | x bf16 | {quality} |",
             "|---" * (10 + (0 if synthetic else 3)) + "|"]
    for r in report["configs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} |")
            continue
        if synthetic:
            q = "ref" if r["name"] == qref else (f"{r['sqnr_db']:.1f}" if r.get("sqnr_db") is not None else "exact")
        else:
            ref = r["name"] == report["reference"]
            judged = f"{r.get('adherence', float('nan')):.3f} | {r.get('frechet_distance', float('nan')):.3f}"
            q = f"ref | ref | {judged}" if ref else f"{r['psnr']:.1f} | {r['ssim']:.4f} | {judged}"
        lines.append(
            f"| {r['name']} | {r['seconds_per_step']:.3f} | {r.get('step_time_vs_reference', float('nan')):.2f} | "
            f"{r['transformer_seconds_per_call']:.3f} | {r['load_seconds']:.1f} | {r['peak_memory_bytes'] / 1e9:.2f} | "
            f"{r.get('memory_vs_reference', float('nan')):.2f} | {r['bytes']['transformer'] / 1e6:.1f} | "
            f"{r.get('transformer_bytes_vs_reference', float('nan')):.3f} | {q} |")
    return "\n".join(lines) + "\n"


def goals(report: dict) -> list[str]:
    """The issue's goals on this machine, each met or missed (with by how much)."""
    rows = {r["name"]: r for r in report["configs"] if "error" not in r}
    ours = rows.get("sd3fp8")
    if ours is None or REFERENCE not in rows:
        return ["goals not evaluated: sd3fp8 or bf16 did not run"]
    out = []
    ratio = ours["step_time_vs_reference"]
    out.append(f"sd3fp8 step time {ratio:.2f}x bf16 (goal <= 1.05x): {'met' if ratio <= 1.05 else 'missed'}")
    if "fp32" in rows:  # on CPUs without bf16 units, fp32 is the fast 16/32-bit baseline: say so too
        out.append(f"sd3fp8 step time {ours['seconds_per_step'] / rows['fp32']['seconds_per_step']:.2f}x fp32 "
                   f"(bf16 runs {rows[REFERENCE]['seconds_per_step'] / rows['fp32']['seconds_per_step']:.1f}x fp32's time on this device)")
    others = [r for n, r in rows.items() if n in ("diffusers-layerwise", "quanto-qfloat8", "torchao-float8-wo", "torchao-float8-dq", "plain-cast")]
    slower = [r["name"] for r in others if r["seconds_per_step"] < ours["seconds_per_step"]]
    out.append("faster than every other FP8 route: " + ("met" if not slower else f"missed (faster: {', '.join(slower)})"))
    key = "sqnr_db" if report["spec"]["synthetic"] else "psnr"
    if not report["spec"]["synthetic"]:
        out.append("quality is compared on " + str(len(report["spec"]["prompts"])) + " images: differences under ~0.5 dB PSNR are noise")
    better = [r["name"] for r in others if (r.get(key) or 0) > (ours.get(key) or 0) and r["bytes"]["transformer"] <= ours["bytes"]["transformer"]]
    out.append(f"quality ({key}) >= every other FP8 route at equal or fewer bytes: " + ("met" if not better else f"missed ({', '.join(better)})"))
    return out


def plots(report: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.setdefault("notes", []).append(f"plots skipped: matplotlib is not installed ({EXTRA_HINT})")
        return []
    rows = [r for r in report["configs"] if "error" not in r]
    key, label = (("sqnr_db", f"SQNR vs {report.get('quality_reference')} (dB)") if report["spec"]["synthetic"]
                  else ("psnr", "PSNR vs bf16 (dB)"))
    paths = []
    for name, y, ylabel in (("time_vs_memory.png", "seconds_per_step", "seconds per step"), ("quality_vs_memory.png", key, label)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            if r.get(y) is None or (y == key and r["name"] == (report.get("quality_reference") or REFERENCE)):
                continue  # the quality reference compares with itself: off the scale
            ax.scatter(r["peak_memory_bytes"] / 1e9, r[y])
            ax.annotate(r["name"], (r["peak_memory_bytes"] / 1e9, r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("peak memory (GB)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def write_report(report: dict, out: Path, command: str) -> list[Path]:
    from sd3fp8.evalkit.evaluation import image_grid

    out.mkdir(parents=True, exist_ok=True)
    paths = plots(report, out)
    report["goals"] = goals(report)
    if report.get("_images"):
        ok = [r for r in report["configs"] if r["name"] in report["_images"]]
        image_grid({"configs": ok, "_images": report["_images"]}).save(out / "bench_grid.png")
        paths.append(out / "bench_grid.png")
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["command"] = command
    (out / "bench.json").write_text(json.dumps(public, indent=2) + "\n")
    env = report["environment"]
    text = ["# sd3fp8 bench\n", f"`{command}`\n",
            f"{env['cpu']} ({env['cores']} cores){', ' + env['gpu'] + ' CC ' + env['compute_capability'] if 'gpu' in env else ''}; "
            f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, torchao {env['torchao']}, "
            f"optimum-quanto {env['optimum-quanto']}. Medians; ratios against bf16 from this run.\n", markdown_table(report),
            "\n" + "\n".join(f"- {g}" for g in report["goals"]) + "\n"]
    text += [f"- note: {n}\n" for n in report.get("notes", [])] + ([f"- note: {report['note']}\n"] if report.get("note") else [])
    (out / "bench.md").write_text("\n".join(text))
    return [out / "bench.json", out / "bench.md"] + paths


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
