"""The process environment: quiet third-party libraries, offline by default."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """diffusers/transformers print loading bars and advice on every load: keep our output readable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    for name in ("torchao", "torch.utils._pytree"):  # optional bench extras log import-time warnings
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
