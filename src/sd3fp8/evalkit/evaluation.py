"""`sd3fp8 eval`: the same prompts and seeds under a reference and candidate configurations
(evalkit/configs.py); adherence and distribution distance (shape-world models), PSNR/SSIM against
the reference's images, model bytes and time. Writes JSON, a markdown table and a PNG grid."""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sd3fp8.engine.modelspec import ModelSpec
from sd3fp8.evalkit.configs import Configuration, check_configurations, load_configuration, parse_configurations
from sd3fp8.evalkit.metrics import compare_images, module_bytes, world_scores
from sd3fp8.evalkit.prompt_sets import SHAPE_WORLD
from sd3fp8.policy import COMPONENTS, Policy


@dataclasses.dataclass
class RunResult:
    config: Configuration
    images: list[np.ndarray]  # prompt-major, seed-minor
    seconds_per_image: float
    transformer_bytes: int
    total_bytes: int
    backend: str


def run_config(model: ModelSpec, config: Configuration, prompts: list[str], seeds: list[int], base_policy: Policy | None,
               steps: int | None, on_image: Callable[[], None], calibration: Path | None = None) -> RunResult:
    engine = load_configuration(model, config, base_policy, calibration)
    images, start = [], time.perf_counter()
    for prompt in prompts:
        for seed in seeds:
            result = engine(prompt, seed=seed, steps=steps)
            images.append(np.asarray(result.images[0]))
            on_image()
    seconds = (time.perf_counter() - start) / len(images)
    total = sum(module_bytes(engine.component(c)) for c in COMPONENTS)
    backend = config.route if config.route is not None else engine.transformer_backend()
    run = RunResult(config, images, seconds, module_bytes(engine.component("transformer")), total, backend)
    del engine
    gc.collect()
    return run


def evaluate(
    model: ModelSpec | str | Path | None,
    prompts: list[str],
    seeds: list[int],
    reference: str = "bf16",
    candidates: tuple[str, ...] = ("fp8",),
    steps: int | None = None,
    base_policy: Policy | None = None,
    progress: bool = True,
    calibration: Path | None = None,
) -> dict:
    """Run every configuration on the same prompts and seeds; return the report (and images).
    Every configuration and the calibration are checked before the first model loads."""
    from tqdm import tqdm

    model = model if isinstance(model, ModelSpec) else ModelSpec(None if model is None else str(model))
    configs = parse_configurations(candidates, reference)
    check_configurations(configs, calibration)
    judged = model.world() == SHAPE_WORLD
    bar = tqdm(total=len(configs) * len(prompts) * len(seeds), desc="eval", unit="img", disable=not progress)
    runs = []
    for config in configs:
        bar.set_postfix(config=config.name)
        runs.append(run_config(model, config, prompts, seeds, base_policy, steps, lambda: bar.update(1), calibration))
    bar.close()

    report: dict[str, Any] = {
        "model": str(model.resolved_path()), "prompts": prompts, "seeds": seeds, "steps": steps, "reference": configs[0].name,
        "judge": SHAPE_WORLD if judged else None,
        "note": None if judged else "adherence and distribution distance need the shape-world judge; this model is not "
        "a shape-world model, so only image metrics against the reference are reported",
        "configs": [],
    }
    captions = [p for p in prompts for _ in seeds]
    ref = runs[0]
    for run in runs:
        row = {
            "name": run.config.name, "policy": run.config.policy, "runtime": run.config.runtime, "backend": run.backend,
            "seconds_per_image": run.seconds_per_image, "transformer_bytes": run.transformer_bytes, "total_bytes": run.total_bytes,
            "transformer_bytes_vs_reference": run.transformer_bytes / ref.transformer_bytes,
            **compare_images(ref.images, run.images),
        }
        if judged:
            row.update(world_scores(run.images, captions))
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
