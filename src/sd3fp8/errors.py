"""Typed errors: every failure a user can cause names what was wrong and where."""


class SD3FP8Error(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(SD3FP8Error, ValueError):
    """An option, policy or argument has a value we do not accept."""


class NonFiniteWeightError(SD3FP8Error, ValueError):
    """A tensor to be quantized holds NaN or Inf."""


class ModelLoadError(SD3FP8Error):
    """A model path or file cannot be read as an SD3 model."""
