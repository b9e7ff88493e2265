"""Quality vs steps per sampler on the bundled miniature model: held-out adherence (the shape world's
judge) and PSNR against a 100-step euler reference, at steps 4, 8, 12, 20, 28, 40. Run by hand.

    nice .venv/bin/python benchmarks/sampler_quality.py --out docs/sampling/sampler_quality

Every held-out prompt (89) x one seed, cfg and size from the model's recipe, the `normal` schedule
at the model's shift (1.0), transformer and compute in float32 (so nothing depends on the CPU's bf16
support). The prompts run as one batch per sampler call: image i gets draw i of the seed's
generator (ComfyUI's noise rule), and the same noise for every sampler and step count. Writes
OUT.json (per-sampler means and per-prompt scores) and OUT.png (the plot).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
from sd3fp8._env import quiet_libraries
from sd3fp8.engine.denoise import Conditioning
from sd3fp8.engine.request import GenerationRequest
from sd3fp8.evalkit.metrics import psnr
from sd3fp8.miniature.judge import adherence
from sd3fp8.miniature.world import heldout_prompts
from sd3fp8.sampling import Cond, initial_noise

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde",
            "dpmpp_sde", "uni_pc", "ddim", "lcm")  # fmt: skip
STEPS = (4, 8, 12, 20, 28, 40)


def batched_conditioning(engine: SD3FP8Pipeline, prompts: list[str]) -> Conditioning:
    """One Cond per side holding every prompt's row (diffusers' text mode pads them all alike)."""
    encoded = [engine.encode(p, None) for p in prompts]

    def stack(side):
        conds = [getattr(c, side)[0] for c in encoded]
        return (Cond(torch.cat([c.context for c in conds]), torch.cat([c.pooled for c in conds])),)

    return Conditioning(stack("positive"), stack("negative"))


class Generator:
    """The engine's denoise + decode over a batch of prompts, counting transformer calls."""

    def __init__(self, engine: SD3FP8Pipeline, prompts: list[str], seed: int, scheduler: str):
        self.engine, self.prompts, self.seed, self.scheduler = engine, prompts, seed, scheduler
        self.conditioning = batched_conditioning(engine, prompts)
        recipe = engine.recipe
        f = engine.vae_scale_factor
        self.noise = initial_noise([len(prompts), engine.latent_channels, recipe.height // f, recipe.width // f], seed)
        self.calls = 0
        engine.component("transformer").register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def __call__(self, sampler: str, steps: int) -> tuple[list[np.ndarray], int]:
        request = GenerationRequest(self.prompts[0], steps=steps, seed=self.seed, sampler=sampler, scheduler=self.scheduler)
        before = self.calls
        with torch.inference_mode():
            latents = self.engine.denoise(request, self.conditioning, self.noise)
            images = [np.asarray(im) for im in self.engine.decode(latents)]
        return images, self.calls - before


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    styles = ["-", "--", "-.", ":"]
    reference_adherence = summary["reference"]["adherence"]
    for k, (name, rows) in enumerate(summary["samplers"].items()):
        steps = [r["steps"] for r in rows]
        style = dict(linestyle=styles[k % 4], marker="o", markersize=3.5, label=name, color=f"C{k % 10}")
        axes[0].plot(steps, [r["adherence"] for r in rows], **style)
        axes[1].plot(steps, [r["psnr"] for r in rows], **style)
        axes[2].plot([r["model_calls"] for r in rows], [r["psnr"] for r in rows], **style)
    if reference_adherence is not None:  # a run recovered from its log has none
        axes[0].axhline(reference_adherence, color="gray", linewidth=0.8)
    axes[0].set(xlabel="steps", ylabel="mean held-out adherence", title="adherence" + (" (gray: euler at 100 steps)" if reference_adherence is not None else ""))
    axes[1].set(xlabel="steps", ylabel="PSNR vs euler@100 (dB)", title="PSNR against the 100-step euler image")
    axes[2].set(xlabel="model evaluations (transformer calls)", ylabel="PSNR vs euler@100 (dB)", xscale="log",
                title="PSNR per model evaluation")  # fmt: skip
    for ax in axes[:2]:
        ax.set_xticks(summary["steps"])
    axes[2].set_xticks([4, 8, 16, 32, 64, 128])
    axes[2].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, ncol=2)
    fig.suptitle(f"sd3fp8 miniature model, {summary['prompts']} held-out prompts x seed {summary['seed']}, "
                 f"cfg {summary['cfg']}, scheduler {summary['scheduler']} (shift {summary['shift']:g}), fp32")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(summary: dict) -> str:
    """Adherence / PSNR (dB) per sampler and step count, model calls at 20 steps, as a markdown table."""
    steps = summary["steps"]
    head = "| sampler | " + " | ".join(f"{s} steps" for s in steps) + " | calls at 20 |"
    lines = [head, "|---" * (len(steps) + 2) + "|"]
    for name, rows in summary["samplers"].items():
        cells = [f"{r['adherence']:.3f} / {r['psnr']:.1f}" for r in rows]
        calls = next((r["model_calls"] for r in rows if r["steps"] == 20), "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {calls} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/sampling/sampler_quality"), help="writes OUT.json and OUT.png")
    parser.add_argument("--prompts", type=int, help="held-out prompts (default: all 89)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a second one mostly waits on a shared CPU)")
    parser.add_argument("--table", type=Path, metavar="JSON", help="a finished run: print its table, redraw its plot")
    args = parser.parse_args()
    if args.table is not None:
        summary = json.loads(args.table.read_text())
        plot(summary, args.table.with_suffix(".png"))
        print(markdown_table(summary))
        return
    torch.set_num_threads(args.threads)
    quiet_libraries()
    steps_list = [int(s) for s in args.steps.split(",")]
    samplers = args.samplers.split(",")

    engine = SD3FP8Pipeline.from_pretrained(None, Policy(transformer="fp32"), RuntimeConfig(dtype="fp32"))
    prompts = heldout_prompts(args.prompts)
    generate = Generator(engine, prompts, args.seed, args.scheduler)
    start = time.perf_counter()
    reference, ref_calls = generate("euler", args.reference_steps)
    ref_scores = [adherence(im, p) for im, p in zip(reference, prompts)]
    summary = {
        "model": "bundled miniature (mini-sd3-shapes)", "precision": "fp32", "prompts": len(prompts), "seed": args.seed,
        "cfg": engine.recipe.cfg, "size": [engine.recipe.width, engine.recipe.height], "scheduler": args.scheduler,
        "shift": engine.flow_sampling().shift, "steps": steps_list, "cpu": cpu_name(), "threads": args.threads,
        "torch": torch.__version__,
        "reference": {"sampler": "euler", "steps": args.reference_steps, "adherence": float(np.mean(ref_scores)),
                      "model_calls": ref_calls, "per_prompt": ref_scores},
        "samplers": {},
    }  # fmt: skip
    for name in samplers:
        rows = []
        for steps in steps_list:
            t = time.perf_counter()
            images, calls = generate(name, steps)
            scores = [adherence(im, p) for im, p in zip(images, prompts)]
            psnrs = [min(psnr(r, im), 100.0) for r, im in zip(reference, images)]  # identical images: capped at 100 dB
            rows.append({"steps": steps, "model_calls": calls, "adherence": float(np.mean(scores)),
                         "psnr": float(np.mean(psnrs)), "seconds": round(time.perf_counter() - t, 1),
                         "per_prompt": scores})  # fmt: skip
            print(f"{name:18s} {steps:3d} steps {calls:3d} calls  adherence {rows[-1]['adherence']:.3f}  "
                  f"PSNR {rows[-1]['psnr']:5.2f} dB  {rows[-1]['seconds']:6.1f} s", flush=True)  # fmt: skip
        summary["samplers"][name] = rows
    summary["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    print(markdown_table(summary))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
