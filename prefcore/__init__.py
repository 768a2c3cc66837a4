"""prefcore: distributional preference learning for PyTorch.

Importing prefcore loads the native extension ``prefcore._C``, which registers the fused
operators as ``torch.ops.prefcore.*``. There is no pure-Python fallback: if the extension is
missing, the import fails and says how to build it.
"""
from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from prefcore import _C  # noqa: F401  (registers torch.ops.prefcore.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "prefcore's native extension (prefcore._C) is not built or does not match the installed "
        "torch. Build it from the repository root with `make build`, or "
        "`pip install --no-build-isolation -e .` (torch must already be installed). "
        f"Original error: {exc}"
    ) from exc

from prefcore import data, distributions, eval, losses, models, ops  # noqa: E402

__version__ = "0.1.0"
__all__ = ["data", "distributions", "eval", "losses", "models", "ops", "__version__"]
