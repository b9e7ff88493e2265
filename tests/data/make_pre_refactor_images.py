"""Record pre-refactor outputs: the bundled model (fp32 and FP8 weight-only), 2 prompts, batch 2, default sampler."""
import numpy as np

from sd3fp8 import Policy, RuntimeConfig, SD3FP8Pipeline
from sd3fp8._env import quiet_libraries

quiet_libraries()
out = {}
for name, policy in (("fp32", Policy(transformer="fp32")), ("fp8", Policy())):
    pipe = SD3FP8Pipeline.from_pretrained(None, policy, RuntimeConfig(dtype="fp32") if name == "fp8" else RuntimeConfig())
    r = pipe(["a small red circle in the top left on a white background", "a large blue square in the center on a black background"],
             "a green triangle", steps=8, cfg=3.0, seed=7, batch=2)
    out[name] = np.stack([np.asarray(im) for im in r.images])
    print(name, out[name].shape, r.parameters[1]["seed"])
np.savez_compressed("tests/data/pre_refactor_images.npz", **out)
