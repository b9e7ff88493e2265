"""`sd3fp8 eval`: the same prompts and seeds under a reference and candidate precision
configurations; adherence and distribution distance (shape-world models), PSNR/SSIM against the
reference's images, model bytes and time. Writes JSON, a markdown table and a PNG grid."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from sd3fp8.engine.inspection import component_summary
from sd3fp8.engine.pipeline import RECIPE_FILE, SD3FP8Pipeline
from sd3fp8.errors import ConfigError
from sd3fp8.evalkit.metrics import frechet_distance, psnr, ssim
from sd3fp8.policy import Policy
from sd3fp8.runtime import RuntimeConfig

SHAPE_WORLD = "shapes-v1"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One configuration under test: a name, the policy changes and the runtime it runs with."""

    name: str
    policy: dict
    runtime: dict
    calibrated: bool = False  # static input scales from the eval's calibration file
    keep_budget: float | None = None  # selective precision: % of parameters kept 16-bit by sensitivity


# Named configurations, shared with `generate`'s options (precision / t5 / granularity / backend).
BASE_CONFIGS = {
    "fp32": ({"transformer": "fp32"}, {}),
    "bf16": ({"transformer": "bf16"}, {}),
    "fp16": ({"transformer": "fp16"}, {}),
    "fp8": ({}, {}),
    "fp8-tensor": ({"granularity": "tensor"}, {}),
    "fp8-e5m2": ({"transformer": "fp8-e5m2"}, {}),
    "fp8-t5": ({"text_encoder_3": "fp8"}, {}),
    "fp8-scaled-mm": ({}, {"force_fp8": True}),
    "fp8-scaled-mm-row": ({}, {"force_fp8": True, "activation": "row"}),
    "fp8-static": ({}, {"force_fp8": True}),  # W8A8 with calibrated static input scales (needs --calibration)
    "fp8-cast": ({"granularity": "none"}, {}),  # plain cast, no scales: what a naive fp8 checkpoint does
    "no-t5": ({"text_encoder_3": "off"}, {}),
}
KEEP = re.compile(r"fp8-static-keep(\d+(?:\.\d+)?)")  # fp8-static-keep2 = static + 2 % kept 16-bit


def parse_config(spec: str) -> EvalConfig:
    """``name`` or ``name@dtype`` (compute dtype bf16/fp16/fp32 for FP8 configurations)."""
    name, _, dtype = spec.strip().partition("@")
    keep = KEEP.fullmatch(name)
    if name not in BASE_CONFIGS and not keep:
        raise ConfigError(f"unknown configuration {name!r}: expected one of {', '.join(BASE_CONFIGS)}, fp8-static-keepP "
                          "(optionally @bf16/@fp32)")
    policy, runtime = BASE_CONFIGS["fp8-static" if keep else name]
    if dtype:
        if dtype not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"unknown compute dtype {dtype!r} in {spec!r}")
        runtime = {**runtime, "dtype": dtype}
    calibrated = bool(keep) or name == "fp8-static"
    return EvalConfig(spec.strip(), dict(policy), dict(runtime), calibrated, float(keep[1]) if keep else None)


def read_prompts(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as e:
        raise ConfigError(f"cannot read prompts file {path}: {e.strerror}") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompts")
    return prompts


def default_prompts(model_path: Path, count: int = 8, captions: str = "full") -> list[str]:
    """Held-out captions for a shape-world model (``captions``: full or partial ones), else the
    shipped SD3.5 prompt set."""
    if model_world(model_path) == SHAPE_WORLD:
        from sd3fp8.miniature.world import heldout_prompts

        return heldout_prompts(count, kind=captions)
    return read_prompts(Path(__file__).parent / "prompts" / "sd35.txt")[:count]


def calibration_prompts(model_path: Path, count: int = 32) -> list[str]:
    """Training-distribution captions for a shape-world model (never the held-out ones eval uses),
    else the shipped SD3.5 calibration set."""
    if model_world(model_path) == SHAPE_WORLD:
        from sd3fp8.miniature.world import calibration_prompts as world_prompts

        return world_prompts(count)
    return read_prompts(Path(__file__).parent / "prompts" / "calibration.txt")[:count]


def model_world(model_path: Path) -> str | None:
    recipe = model_path / RECIPE_FILE
    return json.loads(recipe.read_text()).get("world") if recipe.is_file() else None


@dataclasses.dataclass
class RunResult:
    config: EvalConfig
    images: list[np.ndarray]  # prompt-major, seed-minor
    seconds_per_image: float
    transformer_bytes: int
    total_bytes: int
    backend: str


def run_config(model: Path | None, config: EvalConfig, prompts: list[str], seeds: list[int], base_policy: Policy,
               steps: int | None, on_image: Callable[[], None], calibration: Path | None = None,
               text_mode: str = "diffusers") -> RunResult:
    policy = base_policy.replace(**config.policy)
    if config.keep_budget is not None:
        from sd3fp8.fp8.calibration import Calibration
        from sd3fp8.policy import budget_policy

        cal = Calibration.load(calibration)
        policy, _ = budget_policy(policy, cal.sensitivity, cal.transformer_params, config.keep_budget)
    engine = SD3FP8Pipeline.from_pretrained(model, policy, RuntimeConfig(**config.runtime),
                                            calibration=calibration if config.calibrated else None)
    images, start = [], time.perf_counter()
    for prompt in prompts:
        for seed in seeds:
            result = engine(prompt, seed=seed, steps=steps, text_mode=text_mode)
            images.append(np.asarray(result.images[0]))
            on_image()
    seconds = (time.perf_counter() - start) / len(images)
    components = [engine.component(c) for c in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")]
    total = sum(component_summary(m)["bytes"] for m in components if m is not None)
    run = RunResult(config, images, seconds, component_summary(engine.component("transformer"))["bytes"], total, engine.transformer_backend())
    del engine
    gc.collect()
    return run


def evaluate(
    model: Path | None,
    prompts: list[str],
    seeds: list[int],
    reference: str = "bf16",
    candidates: tuple[str, ...] = ("fp8",),
    steps: int | None = None,
    base_policy: Policy | None = None,
    progress: bool = True,
    calibration: Path | None = None,
    text_mode: str = "diffusers",
) -> dict:
    """Run every configuration on the same prompts and seeds (prompts encoded in ``text_mode``:
    diffusers or comfy); return the report (and images)."""
    from tqdm import tqdm

    from sd3fp8.miniature.bundled import default_model_path

    model_path = Path(model) if model is not None else default_model_path()
    configs = [parse_config(reference)] + [parse_config(c) for c in candidates]
    if calibration is None and any(c.calibrated for c in configs):
        raise ConfigError("fp8-static configurations need a calibration file: --calibration FILE (from `sd3fp8 calibrate`)")
    base_policy = base_policy or Policy()
    judged = model_world(model_path) == SHAPE_WORLD
    bar = tqdm(total=len(configs) * len(prompts) * len(seeds), desc="eval", unit="img", disable=not progress)
    runs = []
    for config in configs:
        bar.set_postfix(config=config.name)
        runs.append(run_config(model_path, config, prompts, seeds, base_policy, steps, lambda: bar.update(1), calibration,
                               text_mode))
    bar.close()

    report = {
        "model": str(model_path), "prompts": prompts, "seeds": seeds, "steps": steps, "text_mode": text_mode,
        "reference": configs[0].name,
        "judge": SHAPE_WORLD if judged else None,
        "note": None if judged else "adherence and distribution distance need the shape-world judge; this model is not "
        "a shape-world model, so only image metrics against the reference are reported",
        "configs": [],
    }
    if judged:
        from sd3fp8.miniature.judge import adherence, features
        from sd3fp8.miniature.world import parse_caption, render

        captions = [p for p in prompts for _ in seeds]
        real = [np.asarray(render(parse_caption(c), seed=1000 + i)) for i, c in enumerate(captions)]
        real_features = np.stack([features(img) for img in real])
    ref = runs[0]
    for run in runs:
        row = {
            "name": run.config.name, "policy": run.config.policy, "runtime": run.config.runtime, "backend": run.backend,
            "seconds_per_image": run.seconds_per_image, "transformer_bytes": run.transformer_bytes, "total_bytes": run.total_bytes,
            "transformer_bytes_vs_reference": run.transformer_bytes / ref.transformer_bytes,
            "psnr": float(np.mean([min(psnr(a, b), 100.0) for a, b in zip(ref.images, run.images)])),
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(ref.images, run.images)])),
        }
        if judged:
            scores = [adherence(img, c) for img, c in zip(run.images, captions)]
            row["adherence"] = float(np.mean(scores))
            row["adherence_per_image"] = scores
            # a distribution distance needs two or more images
            row["frechet_distance"] = (frechet_distance(np.stack([features(img) for img in run.images]), real_features)
                                       if len(run.images) > 1 else None)
        report["configs"].append(row)
    report["_images"] = {run.config.name: run.images for run in runs}
    return report


def markdown_table(report: dict) -> str:
    judged = report["judge"] is not None
    head = "| config | backend | adherence | Frechet dist. | PSNR vs ref (dB) | SSIM vs ref | transformer MiB | x ref | s / image |"
    lines = [head, "|---" * 9 + "|"]
    for r in report["configs"]:
        adh = f"{r['adherence']:.3f}" if judged else "n/a"
        fd = f"{r['frechet_distance']:.3f}" if judged and r["frechet_distance"] is not None else "n/a"
        p = "ref" if r["name"] == report["reference"] else f"{r['psnr']:.1f}"
        s = "ref" if r["name"] == report["reference"] else f"{r['ssim']:.4f}"
        lines.append(
            f"| {r['name']} | {r['backend']} | {adh} | {fd} | {p} | {s} | {r['transformer_bytes'] / 2**20:.2f} | "
            f"{r['transformer_bytes_vs_reference']:.3f} | {r['seconds_per_image']:.2f} |"
        )
    if report["note"]:
        lines += ["", f"Note: {report['note']}."]
    return "\n".join(lines) + "\n"


def _tile(image: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST)


def _heatmap(reference: np.ndarray, image: np.ndarray, size: int, gain: float = 4.0) -> Image.Image:
    """|difference| (max over channels) x gain, as a black-to-red-to-yellow map."""
    diff = np.abs(reference.astype(np.int16) - image.astype(np.int16)).max(axis=-1).astype(np.float64)
    v = np.clip(diff * gain / 255.0, 0, 1)
    rgb = np.stack([np.clip(v * 2, 0, 1), np.clip(v * 2 - 1, 0, 1), np.zeros_like(v)], axis=-1)
    return _tile((rgb * 255).astype(np.uint8), size)


def image_grid(report: dict, max_rows: int = 8, tile: int = 128) -> Image.Image:
    """Rows: prompt x seed; columns: reference, then each candidate and its difference heatmap."""
    images = report["_images"]
    names = [r["name"] for r in report["configs"]]
    ref = images[names[0]]
    rows = min(max_rows, len(ref))
    columns = 1 + 2 * (len(names) - 1)
    grid = Image.new("RGB", (columns * tile, rows * tile), (255, 255, 255))
    for r in range(rows):
        grid.paste(_tile(ref[r], tile), (0, r * tile))
        for c, name in enumerate(names[1:]):
            grid.paste(_tile(images[name][r], tile), ((1 + 2 * c) * tile, r * tile))
            grid.paste(_heatmap(ref[r], images[name][r], tile), ((2 + 2 * c) * tile, r * tile))
    return grid


def write_report(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    paths = [out / "eval.json", out / "eval.md", out / "eval_grid.png"]
    paths[0].write_text(json.dumps(public, indent=2) + "\n")
    names = ", ".join(r["name"] for r in report["configs"][1:])
    header = (f"# sd3fp8 eval\n\nModel `{report['model']}`; {len(report['prompts'])} prompts x {len(report['seeds'])} seeds; "
              f"reference {report['reference']}. Grid: reference, then each of {names} with its |difference| x4 heatmap.\n\n")
    paths[1].write_text(header + markdown_table(report))
    image_grid(report).save(paths[2])
    return paths
