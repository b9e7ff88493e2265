"""Checks before a pipeline loads anything heavy, from configs and headers alone:

- the components fit together (the transformer's text and pooled widths vs the text encoders',
  its latent channels vs the VAE's): a mismatch used to surface mid-generation as
  ``mat1 and mat2 shapes cannot be multiplied``, or silently (diffusers pads / truncates CLIP);
- the model fits in memory (a lower bound from the configs, see ``memory``).
"""

from __future__ import annotations

import dataclasses

import torch

from sd3fp8.errors import ModelLoadError
from sd3fp8.io import memory, schemas
from sd3fp8.io.checkpoint import read_header
from sd3fp8.io.components import FileSource
from sd3fp8.io.detection import detect
from sd3fp8.io.folders import check_component_folder
from sd3fp8.io.sources import ModelSources
from sd3fp8.policy import COMPONENT_LABELS, Policy, Precision

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a component will be, read without loading it."""

    label: str  # "T5-XXL (path)"
    params: int
    widths: dict[str, int]


def _folder_facts(name: str, folder) -> Facts:
    config = folder / name / "config.json"
    label = f"{COMPONENT_LABELS[name]} ({folder / name})"
    if name == "transformer":
        c = schemas.transformer_config(config)
        return Facts(label, memory.transformer_params(c), {"text": c["joint_attention_dim"], "pooled": c["pooled_projection_dim"],
                                                          "latent": c["in_channels"], "latent_out": c["out_channels"]})
    if name == "vae":
        c = schemas.vae_config(config)
        return Facts(label, memory.vae_params(c), {"latent": c["latent_channels"]})
    if name == "text_encoder_3":
        c = schemas.t5_config(config)
        return Facts(label, memory.t5_params(c), {"text": c["d_model"]})
    c = schemas.clip_config(config)
    return Facts(label, memory.clip_params(c), {"text": c["hidden_size"], "pooled": c["projection_dim"]})


def _file_facts(name: str, source: FileSource) -> Facts:
    header = read_header(source.path)
    label = f"{COMPONENT_LABELS[name]} ({source})"
    if name == "transformer":
        c = detect(header).mmdit_config
        if c is None:
            raise ModelLoadError(f"{source.path}: holds {detect(header).describe()}, not an original-layout SD3 MMDiT")
        return Facts(label, memory.transformer_params(c), {"text": c["joint_attention_dim"], "pooled": c["pooled_projection_dim"],
                                                          "latent": c["in_channels"], "latent_out": c["out_channels"]})
    shapes = {k[len(source.prefix):]: t.shape for k, t in header.tensors.items() if k.startswith(source.prefix)}
    params = sum(t.numel for k, t in header.tensors.items() if k.startswith(source.prefix))
    widths = {}
    if name == "vae" and len(shapes.get("decoder.conv_in.weight", ())) == 4:
        widths["latent"] = shapes["decoder.conv_in.weight"][1]
    elif name == "text_encoder_3" and len(shapes.get("shared.weight", ())) == 2:
        widths["text"] = shapes["shared.weight"][1]
    elif len(shapes.get("text_model.embeddings.token_embedding.weight", ())) == 2:
        width = shapes["text_model.embeddings.token_embedding.weight"][1]
        projection = shapes.get("text_projection.weight", (width, width))
        widths = {"text": width, "pooled": projection[0]}
    return Facts(label, params, widths)


def component_facts(sources: ModelSources, names) -> dict[str, Facts]:
    return {n: _file_facts(n, sources.files[n]) if n in sources.files else _folder_facts(n, sources.folder) for n in names}


def check_compatible(facts: dict[str, Facts]) -> None:
    """Say which components disagree, before loading them."""
    t = facts["transformer"]
    problems = []
    t5 = facts.get("text_encoder_3")
    if t5 is not None and "text" in t5.widths and t5.widths["text"] != t.widths["text"]:
        problems.append(f"{t.label} takes {t.widths['text']}-wide text embeddings (joint_attention_dim) but {t5.label} "
                        f"makes {t5.widths['text']}-wide ones")
    clips = [facts[n] for n in ("text_encoder", "text_encoder_2") if n in facts]
    if all("text" in c.widths for c in clips) and sum(c.widths["text"] for c in clips) > t.widths["text"]:
        problems.append(f"CLIP-L and CLIP-G hidden states ({' + '.join(str(c.widths['text']) for c in clips)}) are wider "
                        f"than the {t.widths['text']}-wide text input of {t.label}")
    if all("pooled" in c.widths for c in clips) and sum(c.widths["pooled"] for c in clips) != t.widths["pooled"]:
        problems.append(f"{t.label} takes {t.widths['pooled']}-wide pooled embeddings (pooled_projection_dim) but "
                        f"{' and '.join(c.label for c in clips)} make {' + '.join(str(c.widths['pooled']) for c in clips)}")
    vae = facts.get("vae")
    latent = vae.widths.get("latent") if vae is not None else None
    if latent is not None and latent not in {t.widths["latent"]} | {t.widths["latent_out"]}:
        problems.append(f"{t.label} works on {t.widths['latent']}-channel latents but {vae.label} has {latent}")
    elif latent is not None and t.widths["latent"] != t.widths["latent_out"]:
        problems.append(f"{t.label} takes {t.widths['latent']}-channel latents but returns {t.widths['latent_out']}")
    if problems:
        raise ModelLoadError("components do not fit together: " + "; ".join(problems))


def _bytes_per_param(precision: Precision, compute_dtype: torch.dtype) -> int:
    return 1 if precision.is_fp8 else precision.storage_dtype(compute_dtype).itemsize


def check_before_loading(sources: ModelSources, policy: Policy, device: torch.device, compute_dtype: torch.dtype,
                         offload: str) -> None:
    """Compatibility and memory, from configs and headers (nothing heavy is read)."""
    names = ["transformer", "vae"] + [n for n in TEXT_ENCODERS if n != "text_encoder_3" or policy.text_encoder_3 is not Precision.OFF]
    tokenizers = ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if "text_encoder_3" in names else [])
    folders = {n: sources.folder / n for n in names + tokenizers + ["scheduler"]} if sources.folder is not None else {}
    folders.update(sources.tokenizers)
    for name, folder in folders.items():  # all at once, before any library reads a file (stages load later)
        if name not in sources.files:
            check_component_folder(folder)
    facts = component_facts(sources, names)
    check_compatible(facts)
    needs = {n: f.params * _bytes_per_param(policy.precision(n), compute_dtype) for n, f in facts.items()}
    labels = {n: f.label for n, f in facts.items()}
    encoders = [n for n in TEXT_ENCODERS if n in facts]
    staged = [encoders + ["vae"], ["transformer", "vae"]]
    memory.check_fits(needs, staged if offload == "stages" else [names], "host", memory.available_memory(), labels)
    if device.type == "cuda" and offload != "model":
        free, _ = torch.cuda.mem_get_info(device)
        memory.check_fits(needs, staged if offload == "stages" else [names], f"{device}", free, labels)
