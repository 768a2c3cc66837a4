"""Settings of ``prefcore serve-rm`` (flags, or a JSON/YAML file with these keys)."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from prefcore.utility import Utility, parse_utility


@dataclass
class ServeConfig:
    """Configuration of ``prefcore serve-rm``; every value is checked when it is built, before
    the model loads."""

    reward_model: str = field(metadata={"help": "a prefcore train-rm run directory trained on text"})
    utility: str = field(default="mean", metadata={"help": "the served scalar: mean | ce:λ | mean-var:α | cvar:α | "
                                                            "quantile:τ (bt runs: mean)"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (default loopback only)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 = any free port, printed at start)"})
    device: str = field(default="cpu", metadata={"help": "device of the reward model"})
    max_batch_tokens: int = field(default=8192, metadata={"help": "most padded tokens (rows × longest) per model call"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "how long the first waiting sample waits for others"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per text (default: the run's max_length); "
                                                                    "longer texts keep their end"})
    max_body_mb: float = field(default=32.0, metadata={"help": "largest request body in MiB (larger: 413)"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' (else 401)"})
    graceful_timeout_s: float = field(default=30.0, metadata={"help": "on SIGTERM, how long in-flight requests may "
                                                                      "take to finish"})

    def __post_init__(self) -> None:
        self.parsed_utility: Utility = parse_utility(self.utility, setting="--utility")
        for f in ("heads.json", "config.json"):
            if not os.path.isfile(os.path.join(self.reward_model, f)):
                raise FileNotFoundError(f"--reward_model {self.reward_model!r} has no {f} (a finished "
                                        "`prefcore train-rm` run is needed)")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(f"--host must be an IP address or 'localhost', got {self.host!r}") from None
        if isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"--port must lie in [0, 65535], got {self.port}")
        if isinstance(self.max_batch_tokens, bool) or self.max_batch_tokens < 1:
            raise ValueError(f"--max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if not 0.0 <= self.max_wait_ms <= 60_000:
            raise ValueError(f"--max_wait_ms must lie in [0, 60000], got {self.max_wait_ms}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"--max_length must be >= 1, got {self.max_length}")
        if not self.max_body_mb > 0:
            raise ValueError(f"--max_body_mb must be > 0, got {self.max_body_mb}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api_key must not be empty")
        if not self.graceful_timeout_s >= 0:
            raise ValueError(f"--graceful_timeout_s must be >= 0, got {self.graceful_timeout_s}")
