"""Calibration runs: drive the engine over representative prompts to record activation statistics,
and rank layers by the error each causes alone in FP8.

- ``calibrate`` runs the pipeline (every step, the CFG batch included) with the transformer in high
  precision, recording for every Linear the amax and a few percentiles of |input| at each step.
- ``layer_sensitivity`` measures, for each layer the policy makes FP8, the error of the final
  latents when that layer alone runs W8A8 with its static scale and the rest stays high precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sd3fp8.errors import ConfigError
from sd3fp8.fp8.calibration import Calibration, StatsRecorder, model_fingerprint
from sd3fp8.fp8.linear import FP8Linear
from sd3fp8.fp8.swap import replace_module
from sd3fp8.policy import Policy


def calibrate(engine, prompts: list[str], seeds: list[int], steps: int | None = None, cfg: float | None = None,
              on_image: Callable[[], None] | None = None) -> Calibration:
    """Run ``engine`` (its transformer in high precision) over prompts x seeds and record statistics."""
    transformer = engine.component("transformer")
    if transformer is None:
        raise ConfigError("calibration needs the transformer resident: use --offload none")
    if any(isinstance(m, FP8Linear) for m in transformer.modules()):
        raise ConfigError("calibrate a high-precision transformer (precision bf16 or fp32), not an FP8 one")
    steps = engine.recipe.steps if steps is None else steps
    cfg = engine.recipe.cfg if cfg is None else cfg
    recorder = StatsRecorder(transformer)
    timesteps: list[float] = []

    def on_step(info):
        if len(timesteps) < info["total"]:
            timesteps.append(info["timestep"])
        recorder.step = info["step"] % info["total"]  # the next call belongs to the next step

    try:
        for prompt in prompts:
            for seed in seeds:
                recorder.step = 0
                engine(prompt, seed=seed, steps=steps, cfg=cfg, callback=on_step)
                if on_image:
                    on_image()
    finally:
        recorder.close()
    return Calibration(
        fingerprint=model_fingerprint(transformer), model=str(engine.model_path), prompts=tuple(prompts), seeds=tuple(seeds),
        steps=steps, cfg=cfg, size=(engine.recipe.width, engine.recipe.height), timesteps=tuple(timesteps), stats=recorder.stats,
        transformer_params=sum(p.numel() for p in transformer.parameters()),
    )



def layer_sensitivity(engine, calibration: Calibration, policy: Policy, prompts: list[str], seeds: list[int],
                      steps: int | None = None, on_layer: Callable[[str], None] | None = None) -> list[dict]:
    """Rank the layers ``policy`` makes FP8 by the final-latent error each causes alone (W8A8, static scale).

    error = ||latents_layer_fp8 - latents_ref||^2 / ||latents_ref||^2, averaged over prompts x seeds.
    Deterministic: same noise, same prompts, no randomness in the measurement.
    """
    transformer = engine.component("transformer")
    calibration.check_model(transformer)
    steps = calibration.steps if steps is None else steps
    scales = calibration.input_scales()
    keep = policy.layer_filter("transformer")
    candidates = [n for n, m in transformer.named_modules() if type(m) is nn.Linear and keep(n) and n in scales]

    def latents():
        out = []
        for prompt in prompts:
            for seed in seeds:
                out.append(engine.latents(prompt, seed=seed, steps=steps, cfg=calibration.cfg))
        return torch.stack(out)

    reference = latents()
    ranking = []
    for name in candidates:
        original = transformer.get_submodule(name)
        fp8 = FP8Linear.from_linear(original, policy.transformer.fp8_format, policy.granularity, "scaled-mm",
                                    force_fp8=True, input_scale=scales[name], name=name)
        replace_module(transformer, name, fp8)
        try:
            error = float((latents() - reference).float().pow(2).sum() / reference.float().pow(2).sum().clamp_min(1e-20))
        finally:
            replace_module(transformer, name, original)
        ranking.append({"name": name, "error": error, "params": original.weight.numel()})
        if on_layer:
            on_layer(name)
    ranking.sort(key=lambda r: (-r["error"], r["name"]))
    return ranking
