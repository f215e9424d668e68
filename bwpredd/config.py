"""The daemon's one Config: typed defaults, validation, and ``load()``.

Precedence is flags > environment (``BWPREDD_*``) > TOML file > defaults.
This is the only module that reads the environment.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "ENV_PREFIX",
    "RECORD_NODE_RULE",
    "Config",
    "ConfigError",
    "check_record_node",
    "default_listen",
    "parse_listen",
]

ENV_PREFIX = "BWPREDD_"
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


RECORD_NODE_RULE = "must be 1-128 characters of [A-Za-z0-9._:@-]"
_RECORD_NODE_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
# record_max_bytes at least: room for a few files.
MIN_RECORD_BYTES = 64 * 1024


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key."""


def check_record_node(node: str) -> str | None:
    """Why ``node`` cannot name a node in its recordings (the trainer names
    a trace ``<node>/<peer>``, so no ``/``), or None when it can."""
    if _RECORD_NODE_RE.fullmatch(node):
        return None
    return f"record_node: {RECORD_NODE_RULE}, got {node[:40]!r}"


def default_listen(env: Mapping[str, str] | None = None) -> str:
    """Where the daemon listens and bwpredctl connects when nothing is set.

    Under systemd, ``$RUNTIME_DIRECTORY`` (``RuntimeDirectory=bwpredd``); as
    root ``/run/bwpredd``; otherwise ``$XDG_RUNTIME_DIR/bwpredd``, falling back
    to ``/tmp/bwpredd-<uid>``. The socket lives inside a directory of its own
    so the directory's permissions guard it.

    Args:
        env: the environment to read; ``os.environ`` when None.
    """
    env = os.environ if env is None else env
    if env.get("RUNTIME_DIRECTORY"):
        base = Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    elif os.geteuid() == 0:
        base = Path("/run/bwpredd")
    elif env.get("XDG_RUNTIME_DIR"):
        base = Path(env["XDG_RUNTIME_DIR"]) / "bwpredd"
    else:
        base = Path(f"/tmp/bwpredd-{os.geteuid()}")
    return f"unix:{base / 'bwpredd.sock'}"


def parse_listen(listen: str) -> tuple[Literal["unix", "tcp"], str, int]:
    """Split a listen address into (kind, host or path, port).

    Args:
        listen: ``unix:/path.sock`` or ``host:port`` (``[::1]:port`` for IPv6).

    Raises:
        ConfigError: the address has neither form.
    """
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        if not path.startswith("/"):
            raise ConfigError(f"listen: unix socket path must be absolute, got {path!r}")
        return "unix", path, 0
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen: expected 'unix:/path.sock' or 'host:port', got {listen!r}")
    return "tcp", host.strip("[]"), int(port)


@dataclass
class Config:
    """Every option of the daemon with its default.

    ``deploy/bwpredd.toml`` documents each key; a TOML key or ``BWPREDD_*``
    variable is the field name (upper-cased for the environment).
    """

    # Where to serve: "unix:/path.sock" (default; mode 0660) or "host:port".
    listen: str = ""
    # Permission bits of the unix socket.
    socket_mode: int = 0o660
    # TLS for TCP: server certificate and key (PEM files); both or neither.
    tls_cert: str = ""
    tls_key: str = ""
    # Client CA (PEM): with require_client_auth, mutual TLS.
    tls_client_ca: str = ""
    require_client_auth: bool = False
    # Allow TCP without TLS (loopback included): anyone who can reach the
    # address can use the whole API.
    allow_insecure_tcp: bool = False
    # Model directory; empty = the embedded default model.
    model_dir: str = ""
    # Exit non-zero at start-up when the model directory fails verification.
    require_model: bool = False
    # onnxruntime intra-op threads per session.
    ort_threads: int = 1
    # Where window snapshots go; empty = no persistence.
    state_dir: str = ""
    snapshot_interval_s: float = 30.0
    # Windows older than this are dropped when a snapshot is restored.
    snapshot_max_age_s: float = 3600.0
    # Prometheus metrics "host:port"; empty disables them.
    metrics_addr: str = "127.0.0.1:9464"
    # Peers tracked at most; the least recently seen is evicted beyond it.
    max_peers: int = 100_000
    # Peers with no sample for this long are expired; 0 disables.
    idle_expiry_s: float = 3600.0
    # Samples in one ingest request at most.
    max_batch_samples: int = 10_000
    # Peers in one Forecast/Allocate/RankPeers request at most.
    max_batch_peers: int = 10_000
    # Largest request message, bytes.
    max_message_bytes: int = 8 * 1024 * 1024
    # Concurrent StreamSamples streams at most (WatchForecasts: max_watchers).
    max_concurrent_streams: int = 1024
    # WatchForecasts streams open at once, at most.
    max_watchers: int = 256
    # WatchForecasts streams following any one peer, at most; a watcher of
    # every peer (empty peer_ids) counts for each peer.
    max_watchers_per_peer: int = 32
    # Timestamps further ahead of the server's clock are rejected.
    max_future_skew_s: float = 300.0
    # Timestamps further in the past are rejected.
    max_sample_age_s: float = 86_400.0
    # SIGTERM: in-flight calls get this long to finish.
    grace_period_s: float = 10.0
    # gRPC server reflection (on the unix socket by default).
    reflection: bool = True
    # Live-accuracy guardrail: fall back to the baseline on a peer whose
    # model error exceeds the baseline's by `guardrail_margin` (relative)
    # over the last `guardrail_steps` scored steps.
    guardrail: bool = True
    guardrail_margin: float = 0.1
    guardrail_steps: int = 20
    # Compute a peer's forecast (and allocation) right after its new samples,
    # before the question about it arrives, when it was asked about on its
    # own after one of its last 2 updates (bwpredd.eager).
    eager_answers: bool = True
    # Watch the model directory's manifest and reload when it changes.
    watch_model_dir: bool = False
    # Record every accepted sample under <state_dir>/recordings/ (nothing is
    # recorded without a state_dir).
    record: bool = True
    # Recordings kept: the oldest files go first past this many bytes in all,
    record_max_bytes: int = 1 << 30
    # or past this age in seconds (0: no age limit).
    record_max_age_s: float = 7 * 86_400.0
    # Seconds between two recording files: what a kill -9 loses at most.
    record_flush_s: float = 5.0
    # The node's name in its recordings; empty = the host name.
    record_node: str = ""
    # One log line per RPC (errors are logged regardless).
    log_rpcs: bool = True
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"

    def __post_init__(self) -> None:
        if not self.listen:
            self.listen = default_listen()
        self.validate()

    def validate(self) -> None:
        """Check every rule.

        Raises:
            ConfigError: naming the key and the rule.
        """
        kind, _, _ = parse_listen(self.listen)
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError("socket_mode: must be permission bits 0..0o777")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert, tls_key: give both or neither")
        if self.require_client_auth and not (self.tls_client_ca and self.tls_cert):
            raise ConfigError("require_client_auth: needs tls_cert, tls_key and tls_client_ca")
        if kind == "tcp" and not self.tls_cert and not self.allow_insecure_tcp:
            # Loopback included: every local user and every process sharing the
            # network namespace could reach it, past the unix socket's group.
            raise ConfigError(
                f"listen: TCP without TLS ({self.listen!r}) needs tls_cert/tls_key, or "
                "allow_insecure_tcp = true: anyone who can reach it, every local user "
                "included, could use the whole API"
            )
        for name in (
            "ort_threads",
            "max_peers",
            "max_batch_samples",
            "max_batch_peers",
            "max_message_bytes",
            "max_concurrent_streams",
            "max_watchers",
            "max_watchers_per_peer",
            "guardrail_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        for name in (
            "snapshot_interval_s",
            "snapshot_max_age_s",
            "idle_expiry_s",
            "max_future_skew_s",
            "max_sample_age_s",
            "grace_period_s",
            "guardrail_margin",
            "record_max_age_s",
            "record_flush_s",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0")
        for name in ("snapshot_interval_s", "record_flush_s"):
            if getattr(self, name) == 0:
                raise ConfigError(f"{name}: must be > 0")
        if self.record_max_bytes < MIN_RECORD_BYTES:
            raise ConfigError(
                f"record_max_bytes: must be >= {MIN_RECORD_BYTES} (64 KiB), "
                f"got {self.record_max_bytes}"
            )
        if self.record_node:
            problem = check_record_node(self.record_node)
            if problem:
                raise ConfigError(problem)
        for name in ("log_format", "log_level"):
            allowed = get_args(_LITERALS[_FIELD_TYPES[name]])
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: must be one of {', '.join(allowed)}")
        if self.metrics_addr:
            _, sep, port = self.metrics_addr.rpartition(":")
            if not sep or not port.isdigit():
                raise ConfigError(
                    f"metrics_addr: expected 'host:port' or empty, got {self.metrics_addr!r}"
                )

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        file: str | Path | None = None,
    ) -> Config:
        """Build a Config from flags > environment > TOML file > defaults.

        Args:
            flags: values given on the command line (None values are unset).
            env: the environment; ``os.environ`` when None.
            file: a TOML file; else ``BWPREDD_CONFIG`` from ``env`` if set.

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or a rule
                broken; the message names the key and where it came from.
        """
        env = os.environ if env is None else env
        merged: dict[str, Any] = {}
        path = file or env.get(f"{ENV_PREFIX}CONFIG")
        if path:
            merged.update(_from_toml(Path(path)))
        merged.update(_from_env(env))
        for key, value in (flags or {}).items():
            if value is not None:
                _check_key(key, "flag")
                merged[key] = _coerce(key, value, "flag")
        if not merged.get("state_dir") and env.get("STATE_DIRECTORY"):
            merged["state_dir"] = env["STATE_DIRECTORY"].split(":")[0]
        if not merged.get("listen"):
            merged["listen"] = default_listen(env)
        try:
            return cls(**merged)
        except TypeError as exc:  # pragma: no cover - keys are checked above
            raise ConfigError(str(exc)) from None


# Annotations are strings under `from __future__ import annotations`.
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(Config)}
_LITERALS: dict[str, Any] = {"LogFormat": LogFormat, "LogLevel": LogLevel}


def _check_key(key: str, where: str) -> None:
    if key not in _FIELD_TYPES:
        raise ConfigError(f"{key}: unknown option ({where})")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Coerce ``value`` (a string from the environment, or a TOML value) to
    the field's type; reject what does not fit."""
    kind = _FIELD_TYPES[key]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, str):
                return int(value, 0)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc} ({where}), got {value!r}") from None


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        _check_key(key, f"environment {name}")
        out[key] = _coerce(key, raw, f"environment {name}")
    return out


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: unreadable: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        _check_key(key, f"config file {path}")
        out[key] = _coerce(key, value, f"config file {path}")
    return out
