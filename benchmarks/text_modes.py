"""Held-out adherence of the bundled miniature model under each text conditioning mode (diffusers'
and ComfyUI's), euler at the model's recipe: why the CLI defaults to diffusers' mode. Run by hand.

    nice .venv/bin/python benchmarks/text_modes.py --out docs/sampling/text_modes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
from sd3fp8._env import quiet_libraries
from sd3fp8.engine.denoise import Conditioning
from sd3fp8.engine.request import GenerationRequest
from sd3fp8.miniature.judge import adherence
from sd3fp8.miniature.world import heldout_prompts
from sd3fp8.sampling import Cond, initial_noise


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/sampling/text_modes.json"))
    parser.add_argument("--prompts", type=int, help="held-out prompts (default: all 89)")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a second thread mostly waits on a shared CPU
    quiet_libraries()
    engine = SD3FP8Pipeline.from_pretrained(None, Policy(transformer="fp32"), RuntimeConfig(dtype="fp32"))
    prompts = heldout_prompts(args.prompts)
    recipe, f = engine.recipe, engine.vae_scale_factor
    results, start = {}, time.perf_counter()
    for mode in ("diffusers", "comfy"):
        with torch.inference_mode():
            encoded = [engine.encode(p, None, mode) for p in prompts]
        sides = [
            (Cond(torch.cat([getattr(c, s)[0].context for c in encoded]), torch.cat([getattr(c, s)[0].pooled for c in encoded])),)
            for s in ("positive", "negative")
        ]
        conditioning = Conditioning(*sides)
        scores = []
        for seed in range(args.seeds):
            noise = initial_noise([len(prompts), engine.latent_channels, recipe.height // f, recipe.width // f], seed)
            request = GenerationRequest(prompts[0], seed=seed, text_mode=mode)
            with torch.inference_mode():
                images = engine.decode(engine.denoise(request, conditioning, noise))
            scores += [adherence(np.asarray(im), p) for im, p in zip(images, prompts)]
        tokens = list(encoded[0].positive[0].context.shape[1:])
        results[mode] = {"adherence": float(np.mean(scores)), "perfect_share": float(np.mean(np.array(scores) == 1.0)),
                         "context_shape": tokens}  # fmt: skip
        print(mode, results[mode], flush=True)
    summary = {"model": "bundled miniature", "precision": "fp32", "prompts": len(prompts), "seeds": args.seeds,
               "sampler": "euler", "scheduler": "normal", "steps": recipe.steps, "cfg": recipe.cfg,
               "t5_tokens_in_training": recipe.max_sequence_length, "modes": results,
               "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
