"""Turning off the progress bars and chatter of the libraries prefcore calls, for one block.

``--no_progress`` (``progress=False``) promises a quiet run: not only prefcore's own tqdm bars
but also 🤗 ``datasets``' "Generating train split", ``transformers``' "Loading weights" bar and
load report (logged as a warning), and ``huggingface_hub``'s bars. Each library keeps that
switch in global state, so :func:`library_output` sets it for the duration of a ``with`` block
and restores what was there before (a Python caller's own settings survive a quiet run).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def library_output(progress: bool) -> Iterator[None]:
    """Within the block, the third-party bars and info/warning logs are off unless ``progress``."""
    if progress:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            import datasets.utils.logging as ds_logging
        except ImportError:  # pragma: no cover - datasets is a dependency
            ds_logging = None
        if ds_logging is not None:
            bars, verbosity = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
            ds_logging.disable_progress_bar()
            ds_logging.set_verbosity_error()
            stack.callback(ds_logging.set_verbosity, verbosity)
            if bars:
                stack.callback(ds_logging.enable_progress_bar)
        try:
            from transformers.utils import logging as tf_logging
        except ImportError:  # pragma: no cover - transformers is a dependency
            tf_logging = None
        if tf_logging is not None:
            bars, verbosity = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
            tf_logging.disable_progress_bar()
            tf_logging.set_verbosity_error()
            stack.callback(tf_logging.set_verbosity, verbosity)
            if bars:
                stack.callback(tf_logging.enable_progress_bar)
        try:
            from huggingface_hub import utils as hub_utils
        except ImportError:  # pragma: no cover
            hub_utils = None
        if hub_utils is not None:
            was_disabled = hub_utils.are_progress_bars_disabled()
            hub_utils.disable_progress_bars()
            if not was_disabled:
                stack.callback(hub_utils.enable_progress_bars)
        yield
