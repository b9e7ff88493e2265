"""Typed errors: every failure a user can cause names what was wrong and where."""


class SD3FP8Error(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(SD3FP8Error, ValueError):
    """An option, policy or argument has a value we do not accept."""


class NonFiniteWeightError(SD3FP8Error, ValueError):
    """A tensor to be quantized holds NaN or Inf."""


class ModelLoadError(SD3FP8Error):
    """A model path or file cannot be read as an SD3 model."""


class FileAccessError(SD3FP8Error):
    """The operating system refused a read or write (read-only disk, full disk, bad path); the
    message names the path and the cause."""


class ResourceError(SD3FP8Error):
    """A request that cannot fit this machine (memory), refused before anything is allocated."""
