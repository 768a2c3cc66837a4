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


def _quiet(lib, stack: contextlib.ExitStack) -> None:
    """Bars off and verbosity ERROR for ``datasets``/``transformers``' logging module ``lib``;
    ``stack`` restores both."""
    bars, verbosity = lib.is_progress_bar_enabled(), lib.get_verbosity()
    lib.disable_progress_bar()
    lib.set_verbosity_error()
    stack.callback(lib.set_verbosity, verbosity)
    if bars:
        stack.callback(lib.enable_progress_bar)


@contextlib.contextmanager
def library_output(progress: bool) -> Iterator[None]:
    """Within the block, the third-party bars and info/warning logs are off unless ``progress``."""
    if progress:
        yield
        return
    with contextlib.ExitStack() as stack:
        import datasets.utils.logging as ds_logging  # both are prefcore dependencies
        from transformers.utils import logging as tf_logging

        for lib in (ds_logging, tf_logging):  # the two share one logging/progress-bar API
            _quiet(lib, stack)
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
