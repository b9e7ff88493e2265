"""One validated schema per kind of JSON file we read (beside safetensors headers, which
``checkpoint`` validates): model_index.json, the recipe sd3fp8.json, component configs, policy
fields, calibration files, safetensors ``__metadata__`` and ComfyUI's ``_quantization_metadata``.

A schema checks types and ranges and returns plain values; everything later may trust them.
Every refusal is one error naming the file, the field and what was wrong.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from sd3fp8.errors import ConfigError, ModelLoadError, SD3FP8Error
from sd3fp8.io.safe_read import parse_json, read_json

log = logging.getLogger(__name__)
REQUIRED = object()
MAX_DIM = 2**20  # widths, vocabularies, channels: far beyond any SD3 component
MAX_DEPTH_LAYERS = 1024  # blocks per model (SD3.5 Large has 38; T5-XXL 24): beyond is a typo or an attack
PIPELINE_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
                       "tokenizer", "tokenizer_2", "tokenizer_3", "feature_extractor", "image_encoder")


def kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def shown(value) -> str:
    """A value for an error message: short scalars as written, anything else by its kind."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and len(repr(value)) < 40:
        return repr(value)
    return kind(value)


class Fields:
    """Typed access to a JSON object's fields; every wrong value is one error naming its field."""

    def __init__(self, data, source: str, error: type[SD3FP8Error] = ModelLoadError, where: str = ""):
        self.source, self.error, self.where = source, error, where
        if not isinstance(data, dict):
            raise self.fail(f"expected a JSON object{' for ' + repr(where.rstrip('.')) if where else ''}, got {kind(data)}")
        self.data = data

    def fail(self, message: str) -> SD3FP8Error:
        return self.error(f"{self.source}: {message}")

    def _get(self, key: str, default):
        if key not in self.data or (self.data[key] is None and default is not REQUIRED):
            if default is REQUIRED:
                raise self.fail(f"missing field {self.where + key!r}")
            return default, False
        return self.data[key], True

    def _bad(self, key: str, value, expected: str) -> SD3FP8Error:
        return self.fail(f"field {self.where + key!r} must be {expected}, got {shown(value)}")

    def int(self, key: str, lo: int, hi: int, default=REQUIRED):
        value, given = self._get(key, default)
        if given and (not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi):
            raise self._bad(key, value, f"an integer in {lo}..{hi}")
        return value

    def number(self, key: str, lo: float, hi: float, default=REQUIRED):
        value, given = self._get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi
        if given and not ok:
            raise self._bad(key, value, f"a number in {lo:g}..{hi:g}")
        return float(value) if given else value

    def string(self, key: str, default=REQUIRED, choices: tuple[str, ...] | None = None):
        value, given = self._get(key, default)
        if given and (not isinstance(value, str) or (choices is not None and value not in choices)):
            raise self._bad(key, value, "one of " + ", ".join(choices) if choices else "a string")
        return value

    def list(self, key: str, default=REQUIRED, max_len: int = 2**20) -> list:
        value, given = self._get(key, default)
        if given and (not isinstance(value, list) or len(value) > max_len):
            raise self._bad(key, value, f"a list of at most {max_len} items")
        return value

    def ints(self, key: str, lo: int, hi: int, default=REQUIRED, max_len: int = 2**20) -> list[int]:
        values = self.list(key, default, max_len)
        if values is not default:
            for v in values:
                if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                    raise self._bad(key, v, f"a list of integers in {lo}..{hi}")
        return values

    def numbers(self, key: str, lo: float, hi: float, default=REQUIRED, max_len: int = 2**20) -> list[float]:
        values = self.list(key, default, max_len)
        if values is not default:
            for v in values:
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
                    raise self._bad(key, v, f"a list of numbers in {lo:g}..{hi:g}")
        return [float(v) for v in values] if values is not default else values

    def strings(self, key: str, default=REQUIRED, max_len: int = 2**20) -> list[str]:
        values = self.list(key, default, max_len)
        if values is not default and not all(isinstance(v, str) for v in values):
            raise self._bad(key, next(v for v in values if not isinstance(v, str)), "a list of strings")
        return values

    def object(self, key: str, default=REQUIRED) -> Fields | None:
        value, given = self._get(key, default)
        return Fields(value, self.source, self.error, f"{self.where}{key}.") if given else value


# --- diffusers folders -------------------------------------------------------------------------

def model_index(path: Path) -> dict:
    """model_index.json of a diffusers SD3 folder: the pipeline class and its component entries."""
    data = read_json(path, "model index")
    f = Fields(data, str(path))
    name = f.string("_class_name")
    if name != "StableDiffusion3Pipeline":
        raise ModelLoadError(f"{path.parent} holds a {name!r}, not a StableDiffusion3Pipeline")
    for component in PIPELINE_COMPONENTS:
        entry = data.get(component)
        if entry is not None and not (isinstance(entry, list) and len(entry) == 2
                                      and all(v is None or isinstance(v, str) for v in entry)):
            raise f.fail(f"field {component!r} must be [library, class], got {kind(entry)}")
    return data


RECIPE_SECTIONS = ("name", "description", "defaults", "world", "captions", "text_modes", "training")
RECIPE_DEFAULTS = ("steps", "cfg", "width", "height", "max_sequence_length")


def recipe(path: Path) -> dict:
    """The optional sd3fp8.json beside model_index.json: generation defaults and the model's world."""
    f = Fields(read_json(path, "recipe", ConfigError), str(path), ConfigError)
    unknown_sections = sorted(set(f.data) - set(RECIPE_SECTIONS))
    if unknown_sections:  # a newer sd3fp8 may write more: said, not fatal
        log.warning("%s: ignoring unknown section(s) %s", path, ", ".join(unknown_sections))
    out = {"world": f.string("world", None), "defaults": {}}
    d = f.object("defaults", None)
    if d is not None:
        unknown = sorted(set(d.data) - set(RECIPE_DEFAULTS))
        if unknown:
            raise f.fail(f"unknown default(s) {', '.join(unknown)}: expected some of {', '.join(RECIPE_DEFAULTS)}")
        values = {"steps": d.int("steps", 1, 1000, None), "cfg": d.number("cfg", 0, 100, None),
                  "width": d.int("width", 16, 4096, None), "height": d.int("height", 16, 4096, None),
                  "max_sequence_length": d.int("max_sequence_length", 1, 512, None)}
        out["defaults"] = {k: v for k, v in values.items() if v is not None}
    return out


def transformer_config(path: Path) -> dict:
    """An SD3Transformer2DModel config.json: every field the model and our estimates use."""
    f = Fields(read_json(path, "config"), str(path))
    layers = f.int("num_layers", 1, MAX_DEPTH_LAYERS)
    c = {"num_layers": layers, "attention_head_dim": f.int("attention_head_dim", 1, 4096),
         "num_attention_heads": f.int("num_attention_heads", 1, 4096), "joint_attention_dim": f.int("joint_attention_dim", 1, MAX_DIM),
         "caption_projection_dim": f.int("caption_projection_dim", 1, MAX_DIM),
         "pooled_projection_dim": f.int("pooled_projection_dim", 1, MAX_DIM), "in_channels": f.int("in_channels", 1, 4096),
         "out_channels": f.int("out_channels", 1, 4096, None), "patch_size": f.int("patch_size", 1, 64),
         "sample_size": f.int("sample_size", 1, 2**16), "pos_embed_max_size": f.int("pos_embed_max_size", 1, 2**16, None),
         "dual_attention_layers": f.ints("dual_attention_layers", 0, layers - 1, [], max_len=layers),
         "qk_norm": f.string("qk_norm", None, ("rms_norm", "layer_norm", "rms_norm_across_heads"))}
    c["out_channels"] = c["out_channels"] or c["in_channels"]
    return c


def clip_config(path: Path) -> dict:
    f = Fields(read_json(path, "config"), str(path))
    hidden = f.int("hidden_size", 1, MAX_DIM)
    return {"hidden_size": hidden, "intermediate_size": f.int("intermediate_size", 1, MAX_DIM),
            "num_hidden_layers": f.int("num_hidden_layers", 1, MAX_DEPTH_LAYERS), "vocab_size": f.int("vocab_size", 1, 2**24),
            "max_position_embeddings": f.int("max_position_embeddings", 1, 2**20),
            "projection_dim": f.int("projection_dim", 1, MAX_DIM, 512)}  # transformers' default


def t5_config(path: Path) -> dict:
    f = Fields(read_json(path, "config"), str(path))
    return {"d_model": f.int("d_model", 1, MAX_DIM), "d_ff": f.int("d_ff", 1, MAX_DIM), "d_kv": f.int("d_kv", 1, MAX_DIM),
            "num_heads": f.int("num_heads", 1, 4096), "num_layers": f.int("num_layers", 1, MAX_DEPTH_LAYERS),
            "vocab_size": f.int("vocab_size", 1, 2**24), "relative_attention_num_buckets": f.int("relative_attention_num_buckets", 1, 2**16, 32),
            "feed_forward_proj": f.string("feed_forward_proj", "relu")}


def vae_config(path: Path) -> dict:
    f = Fields(read_json(path, "config"), str(path))
    return {"in_channels": f.int("in_channels", 1, 4096, 3), "out_channels": f.int("out_channels", 1, 4096, 3),
            "latent_channels": f.int("latent_channels", 1, 4096, 4),
            "block_out_channels": f.ints("block_out_channels", 1, 2**16, [64], max_len=16),
            "layers_per_block": f.int("layers_per_block", 1, 64, 1)}


def any_json(path: Path, what: str) -> None:
    """A JSON file a library reads after us (scheduler, tokenizer configs): within the safe reader's limits."""
    read_json(path, what)


# --- safetensors metadata ------------------------------------------------------------------------

def safetensors_metadata(value, source: str) -> dict[str, str]:
    """``__metadata__``: an object of strings (the safetensors format says so)."""
    f = Fields({} if value is None else value, source, ModelLoadError, "__metadata__.")
    bad = next((k for k, v in f.data.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise f.fail(f"__metadata__ values must be strings; {bad!r} is {kind(f.data[bad])}")
    if "_quantization_metadata" in f.data:
        quantization_metadata(f.data["_quantization_metadata"], source)
    return dict(f.data)


def quantization_metadata(text: str, source: str) -> dict:
    """ComfyUI's ``_quantization_metadata``: a string holding a JSON object whose ``layers`` maps
    layer names to objects (each with its ``format``)."""
    where = f"{source}: _quantization_metadata"
    f = Fields(parse_json(text, where, ModelLoadError), where)
    layers = f.object("layers", None)
    if layers is not None:
        for name, entry in layers.data.items():
            Fields(entry, where, ModelLoadError, f"layers.{name}.").string("format", None)
    return f.data


# --- policy and calibration ----------------------------------------------------------------------

POLICY_STRING_FIELDS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "granularity")
POLICY_LIST_FIELDS = ("include", "exclude", "encoder_exclude")


def policy(data, source: str) -> dict:
    """A policy file's fields: known names, strings or lists of strings (values checked by Policy)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a policy must be a mapping of fields, got {kind(data)}")
    f = Fields(data, source, ConfigError)
    unknown = sorted(set(f.data) - set(POLICY_STRING_FIELDS + POLICY_LIST_FIELDS))
    if unknown:
        raise f.fail(f"unknown policy field(s): {', '.join(map(repr, unknown))}")
    out = {k: f.string(k) for k in POLICY_STRING_FIELDS if k in f.data}
    for k in POLICY_LIST_FIELDS:
        value = f.data.get(k)
        if isinstance(value, str):
            value = [value]
        if k in f.data and not isinstance(value, list):
            raise f.fail(f"policy field {k!r} must be a list of name patterns, got {shown(value)}")
        odd = next((v for v in value or () if not isinstance(v, str)), "") if k in f.data else ""
        if not isinstance(odd, str):
            raise f.fail(f"policy field {k!r} must be a list of name patterns, got a list holding {shown(odd)}")
        if k in f.data:
            out[k] = value
    return out


CALIBRATION_FORMAT, CALIBRATION_VERSION = "sd3fp8-calibration", 1
STAT_KEYS = ("amax", "p99", "p99.9", "p99.99")


def calibration(data, source: str, error: type[SD3FP8Error] = ConfigError) -> dict:
    """A calibration file's values, every one checked: NaN, negative ranges and wrong types are
    refused here rather than written into checkpoints as scales."""
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise error(f"{source}: not an sd3fp8 calibration file (no \"format\": \"{CALIBRATION_FORMAT}\")")
    f = Fields(data, source, error)
    if f.data.get("version") != CALIBRATION_VERSION:
        raise f.fail(f"calibration format version {shown(f.data.get('version'))} is not supported (expected {CALIBRATION_VERSION})")
    steps = f.int("steps", 1, 1000)
    values = {
        "fingerprint": f.string("fingerprint"), "model": f.string("model"), "prompts": tuple(f.strings("prompts")),
        "seeds": tuple(f.ints("seeds", 0, 2**64 - 1)), "steps": steps, "cfg": f.number("cfg", 0, 100),
        "size": tuple(f.ints("size", 16, 4096)), "timesteps": tuple(f.numbers("timesteps", 0, 1e6, max_len=steps)),
        "method": f.string("method", "max", ("max", "percentile")),
        "percentile": f.number("percentile", 0, 100, None), "transformer_params": f.int("transformer_params", 0, 2**50, 0),
    }
    if len(values["size"]) != 2:
        raise f.fail("field 'size' must be [width, height]")
    if values["method"] == "percentile" and values["percentile"] not in (99.0, 99.9, 99.99):
        raise f.fail(f"field 'percentile' must be 99, 99.9 or 99.99 with method percentile, got {values['percentile']!r}")
    stats = f.object("stats")
    values["stats"] = {name: _layer_stats(stats.object(name), steps) for name in stats.data}
    key = "amax" if values["method"] == "max" else f"p{values['percentile']:g}"
    lacking = next((name for name, s in values["stats"].items() if not s.get(key)), None)
    if lacking is not None:
        raise f.fail(f"layer {lacking!r} has no {key!r} statistics, which method {values['method']} uses")
    values["sensitivity"] = tuple(_sensitivity_row(Fields(row, source, error, f"sensitivity[{i}]."))
                                  for i, row in enumerate(f.list("sensitivity", [])))
    return values


def _layer_stats(f: Fields, steps: int) -> dict[str, list[float]]:
    """One layer's per-step ranges: non-negative finite numbers, one per step at most."""
    unknown = sorted(set(f.data) - set(STAT_KEYS))
    if unknown:
        raise f.fail(f"unknown statistic(s) {', '.join(map(repr, unknown))} in {f.where[:-1]!r}")
    out = {k: f.numbers(k, 0, 3.4e38, max_len=steps) for k in STAT_KEYS if k in f.data}
    if not out.get("amax"):
        raise f.fail(f"field {f.where + 'amax'!r} must be a non-empty list of per-step ranges")
    return out


def _sensitivity_row(f: Fields) -> dict:
    return {"name": f.string("name"), "error": f.number("error", 0, 3.4e38), "params": f.int("params", 0, 2**50)}
