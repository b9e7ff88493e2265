"""Picture grid of the bundled miniature model: held-out prompts (rows) x seeds (columns), with the
judge's adherence per image, plus the mean adherence over all held-out prompts.

    .venv/bin/python benchmarks/mini_grid.py --out docs/images/mini_grid.png --precision bf16
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
from sd3fp8.miniature.judge import adherence
from sd3fp8.miniature.world import heldout_prompts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/images/mini_grid.png"))
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--all", action="store_true", help="score every held-out prompt (mean adherence), not only the grid rows")
    args = parser.parse_args()
    quiet_libraries()
    engine = SD3FP8Pipeline.from_pretrained(None, Policy(transformer=args.precision), RuntimeConfig())
    every = len(heldout_prompts())
    prompts = heldout_prompts(every if args.all else args.rows)  # a fixed shuffle: varied rows first
    scores, rows, start = [], [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        result = engine(prompt, seed=0, batch=args.seeds, cfg=args.cfg, steps=args.steps)
        images = [np.asarray(im) for im in result.images]
        row_scores = [adherence(im, prompt) for im in images]
        scores += row_scores
        if i < args.rows:
            rows.append((prompt, images, row_scores))
    tile, label_w = 128, 420
    grid = Image.new("RGB", (label_w + tile * args.seeds, tile * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images, row_scores) in enumerate(rows):
        draw.text((6, r * tile + 6), "\n".join([prompt[i : i + 60] for i in range(0, len(prompt), 60)]), fill="black")
        for c, (im, s) in enumerate(zip(images, row_scores)):
            grid.paste(Image.fromarray(im).resize((tile, tile), Image.Resampling.NEAREST), (label_w + c * tile, r * tile))
            draw.text((label_w + c * tile + 4, r * tile + tile - 14), f"{s:.2f}", fill="magenta")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    summary = {"precision": args.precision, "prompts": len(prompts), "seeds": args.seeds, "images": len(scores),
               "mean_adherence": float(np.mean(scores)), "perfect_share": float(np.mean(np.array(scores) == 1.0)),
               "seconds": round(time.perf_counter() - start, 1), "recipe": engine.recipe.__dict__}
    print(json.dumps(summary, indent=2))
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
