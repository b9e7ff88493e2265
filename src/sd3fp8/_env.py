"""The process environment: quiet third-party libraries, offline by default."""

from __future__ import annotations

import logging
import os


def quiet_environment() -> None:
    """Offline, and diffusers/transformers quiet from the moment they are imported (they read these
    variables then). Imports nothing: `sd3fp8 --help` and header-only commands stay fast."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree"):  # optional bench extras log import-time warnings
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """diffusers/transformers print loading bars and advice on every load: keep our output readable.
    Imports both (their progress bars follow no variable): call it before loading a model."""
    quiet_environment()
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
