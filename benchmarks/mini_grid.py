"""The bundled miniature model at work: a picture grid of plain and held-out prompts in both text
modes, and held-out adherence by caption kind (full / partial) and text mode (diffusers / comfy).

    # the README grid: plain prompts a new user would type, held-out partial and full captions;
    # seeds 0-3 in diffusers' text mode, then the same in ComfyUI's; the judge's adherence under each
    .venv/bin/python benchmarks/mini_grid.py --out docs/images/mini_grid.png

    # held-out adherence: N captions of each kind x S images, in each text mode (JSON beside --out)
    .venv/bin/python benchmarks/mini_grid.py --score --count 100 --seeds 2 --out docs/miniature_adherence.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
from sd3fp8._env import quiet_libraries
from sd3fp8.miniature.judge import adherence, analyze
from sd3fp8.miniature.world import BACKGROUNDS, family, heldout_prompts, is_heldout, parse_caption

PLAIN = ["a red circle on a blue background", "a yellow square on a green background", "a blue triangle on a white background",
         "a green circle at the top", "an orange triangle on a dark blue background"]
MODES = ("diffusers", "comfy")
KINDS = ("full", "partial")


def generate(engine, prompt: str, seeds: int, mode: str, **options) -> list[np.ndarray]:
    """``seeds`` images of one prompt: draws 0..seeds-1 of seed 0 (one sampler run, as ComfyUI's batch)."""
    return [np.asarray(im) for im in engine(prompt, seed=0, batch=seeds, text_mode=mode, **options).images]


def attributes(image: np.ndarray, prompt: str) -> dict[str, bool]:
    """For a one-shape caption: which stated attributes the image shows (its largest shape)."""
    caption, a = parse_caption(prompt), analyze(image)
    spec, blob = caption.shapes[0], (a.blobs[0] if a.blobs else None)
    out = {"count": len(a.blobs) == 1, "kind": bool(blob) and blob.kind == spec.kind,
           "colour": bool(blob) and blob.color == spec.color}
    if spec.size is not None:
        out["size"] = bool(blob) and blob.size == spec.size
    if spec.cell is not None:
        out["position"] = bool(blob) and blob.cell == spec.cell
    if caption.background is not None:
        out["background"] = (a.background == caption.background if caption.background in BACKGROUNDS
                             else family(a.background) == caption.background)
    return out


def score(engine, count: int, seeds: int, options: dict) -> dict:
    results = {}
    for kind in KINDS:
        prompts = heldout_prompts(count, kind=kind)
        for mode in MODES:
            start, scores, hits = time.perf_counter(), [], {}
            for prompt in prompts:
                for image in generate(engine, prompt, seeds, mode, **options):
                    scores.append(adherence(image, prompt))
                    for name, ok in attributes(image, prompt).items():
                        hits.setdefault(name, []).append(ok)
            results[f"{kind}/{mode}"] = {
                "captions": len(prompts), "images": len(scores), "mean_adherence": round(float(np.mean(scores)), 4),
                "perfect_share": round(float(np.mean(np.asarray(scores) == 1.0)), 4),
                "attribute_accuracy": {k: round(float(np.mean(v)), 4) for k, v in hits.items()},
                "seconds": round(time.perf_counter() - start, 1)}
            print(kind, mode, json.dumps(results[f"{kind}/{mode}"]), flush=True)
    return results


def grid(engine, rows: list[str], seeds: int, options: dict) -> tuple[Image.Image, list[dict]]:
    tile, label_w, head = 112, 360, 22
    columns = seeds * len(MODES)
    canvas = Image.new("RGB", (label_w + tile * columns + 8, head + tile * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for m, mode in enumerate(MODES):
        draw.text((label_w + m * (tile * seeds + 8) + 4, 5), f"{mode} text mode: seeds 0-{seeds - 1}", fill="black")
    summary = []
    for r, prompt in enumerate(rows):
        y = head + r * tile
        tag = "held-out" if is_heldout(parse_caption(prompt)) else "plain" if prompt in PLAIN else "training grammar"
        kind = "full" if parse_caption(prompt).full else "partial"
        lines = [prompt[i : i + 52] for i in range(0, len(prompt), 52)] + [f"({tag}, {kind})"]
        draw.text((6, y + 6), "\n".join(lines), fill="black")
        row = {"prompt": prompt, "tag": tag, "kind": kind}
        for m, mode in enumerate(MODES):
            images = generate(engine, prompt, seeds, mode, **options)
            scores = [adherence(im, prompt) for im in images]
            row[mode] = scores
            for c, (im, s) in enumerate(zip(images, scores)):
                x = label_w + m * (tile * seeds + 8) + c * tile
                canvas.paste(Image.fromarray(im).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
                draw.text((x + 4, y + tile - 14), f"{s:.2f}", fill="magenta")
        summary.append(row)
    return canvas, summary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/images/mini_grid.png"))
    parser.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--dtype", default="auto", help="compute dtype (auto, bf16, fp32)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--full-rows", type=int, default=3, help="held-out full captions in the grid")
    parser.add_argument("--partial-rows", type=int, default=2, help="held-out partial captions in the grid")
    parser.add_argument("--score", action="store_true", help="score held-out captions instead of drawing the grid")
    parser.add_argument("--count", type=int, default=100, help="held-out captions of each kind to score")
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    quiet_libraries()
    engine = SD3FP8Pipeline.from_pretrained(args.model, Policy(transformer=args.precision), RuntimeConfig(dtype=args.dtype))
    options = {k: v for k, v in (("cfg", args.cfg), ("steps", args.steps)) if v is not None}
    summary = {"model": str(engine.model_path), "precision": args.precision, "dtype": args.dtype, "seeds": args.seeds,
               "recipe": engine.recipe.__dict__, **options}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.score:
        summary["heldout"] = score(engine, args.count, args.seeds, options)
        path = args.out.with_suffix(".json")
    else:
        rows = PLAIN + heldout_prompts(args.partial_rows, kind="partial") + heldout_prompts(args.full_rows, kind="full")
        image, summary["rows"] = grid(engine, rows, args.seeds, options)
        image.save(args.out)
        path = args.out.with_suffix(".json")
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
