import hashlib
import json

from sd3fp8.miniature.training import TrainConfig, train_miniature

# the smallest run that exercises every stage (two trainings per test: the determinism check)
SMOKE = TrainConfig(pool=8, vae_steps=1, vae_batch=2, dit_steps=2, dit_batch=2, warmup=1)


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_training_is_deterministic_and_writes_a_loadable_model(tmp_path):
    a = train_miniature(tmp_path / "a", SMOKE, progress=False)
    b = train_miniature(tmp_path / "b", SMOKE, progress=False)
    assert digest(a) == digest(b) and len(digest(a)) == 5  # transformer, vae, three text encoders
    recipe = json.loads((a / "sd3fp8.json").read_text())
    assert recipe["world"] == "shapes-v1" and recipe["training"]["dit_steps"] == 2
    log = (a / "training_log.csv").read_text().splitlines()
    assert log[0] == "stage,step,loss,lr,seconds" and len(log) == 1 + 1 + 2

    from sd3fp8 import SD3FP8Pipeline

    result = SD3FP8Pipeline.from_pretrained(a)("a small red circle in the center on a white background", steps=2)
    assert result.images[0].size == (64, 64)
