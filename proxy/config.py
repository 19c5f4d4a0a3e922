"""One typed, frozen configuration object per process.

Every setting is a field of :class:`Config` with a one-line help text. Values come from, in rising order of
precedence: the defaults below, an optional TOML file (``--config FILE``), ``LIGHTWIRE_<NAME>`` environment
variables, and command-line flags. The README's configuration table lists every field; a test fails when it
misses one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError

ENV_PREFIX = "LIGHTWIRE_"


def setting(default: Any, help: str, *, secret: bool = False, flag: str | None = None) -> Any:
    """A config field with its help line; ``secret`` values are never logged or stored."""
    metadata = {"help": help, "secret": secret, "flag": flag}
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class Config:
    # Serving
    host: str = setting("127.0.0.1", "Address the proxy listens on.")
    port: int = setting(8400, "Port the proxy listens on.")
    upstream: str | None = setting(None, "OpenAI-compatible base URL to forward to, e.g. http://127.0.0.1:8000/v1.")
    vllm: tuple[str, ...] = setting(
        (), "Base URL of a vLLM server to serve the policy from (repeatable, one per replica).", flag="--vllm"
    )
    routes: tuple[str, ...] = setting(
        (),
        "MODEL=TARGET: calls for MODEL go to TARGET (policy, upstream, or a provider model) (repeatable).",
        flag="--route",
    )
    provider_models: tuple[str, ...] = setting(
        (),
        "litellm model (e.g. openai/gpt-4o-mini) agents may call, keys from the environment (repeatable).",
        flag="--provider-model",
    )
    model_dir: Path | None = setting(None, "Hugging Face model folder to serve instead of the embedded default.")
    cache_dir: Path = setting(Path.home() / ".cache" / "lightwire", "Where the embedded model and vLLM's log live.")
    adapters_dir: Path = setting(Path("lightwire-adapters"), "Where adapter versions and merged weights are kept.")
    swap_mode: str = setting("auto", "How versions are served: lora, merged, or auto (merged on CPU, else lora).")
    swap_drain_timeout: float = setting(10.0, "Seconds a merged-mode swap waits for running calls to finish.")
    max_lora_rank: int = setting(16, "Largest LoRA rank vLLM accepts (--max-lora-rank).")
    vllm_kv_cache_gib: int = setting(2, "GiB of memory for the managed vLLM's KV cache (CPU).")
    upstream_api_key: str | None = setting(
        None,
        "Bearer token sent to the backend (--upstream, --vllm); without it an --upstream gets the client's own "
        "Authorization header unless it is a Lightwire key, and vLLM none.",
        secret=True,
    )
    api_keys: tuple[str, ...] = setting(
        (),
        "Client API key the proxy accepts (repeatable); none set = no client auth.",
        secret=True,
        flag="--api-key",
    )
    admin_key: str | None = setting(
        None,
        "Key guarding /feedback, /sessions and the admin API; none set = the client keys guard them, and the "
        "admin API is off (403) unless host is a loopback address.",
        secret=True,
    )
    session_idle_timeout: float = setting(300.0, "Seconds without a call after which a session is closed.")
    session_index_size: int = setting(
        50_000, "Recent calls remembered for session linking and early feedback (~1 KB each); older ones are not."
    )
    capture_tokens: str = setting(
        "auto",
        "Ask the backend for token ids and logprobs: auto (when it is vLLM), always or never.",
    )
    max_body_mb: float = setting(32.0, "Largest request body accepted, in MiB (larger: 413).")
    # Upstream timeouts, seconds
    connect_timeout: float = setting(10.0, "Seconds to open a connection to the upstream.")
    first_byte_timeout: float = setting(600.0, "Seconds to wait for the upstream's response headers.")
    chunk_timeout: float = setting(120.0, "Seconds allowed between two chunks of an upstream body.")
    upstream_connections: int = setting(256, "Most pooled connections to the upstream.")
    shutdown_timeout: float = setting(30.0, "Seconds in-flight calls get to finish on SIGTERM.")
    # Store
    db: Path = setting(Path("lightwire.duckdb"), "DuckDB file holding spans and feedback.")
    flush_interval_ms: float = setting(
        200.0, "Most milliseconds from a span reaching the store's writer to its commit (what SIGKILL can lose)."
    )
    max_pending_spans: int = setting(
        10_000, "Spans that may wait for the store; past this new calls wait (backpressure)."
    )
    store_wait_timeout: float = setting(
        10.0, "Most seconds a call waits for a place in the store's queue (full, or the store failing); then 503."
    )
    db_memory_limit_mb: int = setting(
        2048,
        "Most MiB DuckDB may use (its default: 80% of RAM); the indexes it loads (~75 B a client-chosen id) must fit.",
    )
    db_cache_mb: int = setting(
        32, "MiB of table blocks DuckDB keeps cached beyond its indexes (trimmed to it every 10 s)."
    )
    db_threads: int = setting(1, "DuckDB's worker threads; 1 keeps the store's work on its one (nice) writer thread.")
    # Rewards and datasets
    span_hooks: tuple[str, ...] = setting(
        (), "Reward hook scoring each call, as module:function (repeatable).", flag="--span-hook"
    )
    session_hooks: tuple[str, ...] = setting(
        (), "Reward hook scoring each ended session, as module:function (repeatable).", flag="--session-hook"
    )
    group_hooks: tuple[str, ...] = setting(
        (),
        "Reward hook ranking ended sessions of the same task together, as module:function (repeatable).",
        flag="--group-hook",
    )
    group_size: int = setting(4, "Ended sessions of one task a group hook waits for.")
    group_timeout: float = setting(
        600.0, "Seconds after a task's first session ended that a partial group (2 or more) is scored."
    )
    judge_model: str = setting(
        "openai/gpt-4o-mini", "litellm model name the LLM-as-judge hook asks (keys from the environment)."
    )
    hook_retries: int = setting(3, "Attempts for a failing reward hook before it is given up (logged).")
    credit_policy: str = setting(
        "discounted", "Session reward to turns: last, broadcast or discounted; per-turn feedback wins."
    )
    discount: float = setting(0.9, "Discount per turn from the end, for credit_policy=discounted.")
    group_samples: int = setting(
        0,
        "Answers per prompt served by the policy: the sidecar samples the missing ones in the background, "
        "unseen by the client, for GRPO groups (0: off).",
    )
    explore_samples: int = setting(
        0,
        "Extra background samples for a policy call whose task failed in every recent attempt, so that a first "
        "success can appear (needs span hooks to score them; 0: off).",
    )
    explore_temperature: float = setting(1.2, "Sampling temperature of exploration samples.")
    explore_attempts: int = setting(4, "Recent rewarded sessions of a task that must all have failed to explore it.")
    explore_budget: int = setting(120, "Most exploration samples a minute (the CPU they may take).")
    # Experiential memory
    memory: tuple[str, ...] = setting(
        (),
        "Model name whose calls get worked examples from the active memory bank, or * for every route "
        "(repeatable; none: off).",
        flag="--memory",
    )
    memory_examples: int = setting(2, "Best-rewarded trajectories put in front of a call when memory is on.")
    memory_size: int = setting(10000, "Most trajectories a memory bank keeps per model, the best-rewarded first.")
    # The optimizer
    optimize: bool = setting(True, "Train, evaluate and publish adapters in the background (needs the policy).")
    train_algorithm: str = setting("sft", "What runs optimize: sft (filtered behaviour cloning), kto or grpo.")
    train_min_turns: int = setting(32, "New rewards that start an optimizer run.")
    train_min_interval: float = setting(
        0.0, "Least seconds between the starts of two optimizer runs (0: as soon as the last one has ended)."
    )
    train_learning_rate: float = setting(2e-4, "Learning rate of optimizer runs.")
    train_epochs: int = setting(1, "Passes over the training data per run.")
    train_window: str = setting(
        "new", "Sessions a run trains on: new (since the active version's data: it learned the rest) or all."
    )
    train_threads: int = setting(1, "torch CPU threads of optimizer runs (0: torch's choice); vLLM shares the CPU.")
    train_processes: int = setting(
        1, "Processes an optimizer run trains in, data parallel under torchrun (one per GPU; gloo on the CPU)."
    )
    runs_dir: Path = setting(Path("lightwire-runs"), "Where optimizer runs keep their data, logs and checkpoints.")
    eval_split: float = setting(0.1, "Share of sessions held out of training, to evaluate candidates on.")
    eval_hooks: tuple[str, ...] = setting(
        (),
        "Span hook that only judges candidates offline, never live calls (default: the span hooks; repeatable).",
        flag="--eval-hook",
    )
    eval_max_prompts: int = setting(32, "Held-out prompts replayed per offline evaluation (with judging hooks).")
    eval_canary_fraction: float = setting(0.5, "Share of sessions a candidate gets in an online evaluation.")
    eval_min_sessions: int = setting(20, "Rewarded sessions each arm needs before an online evaluation decides.")
    eval_timeout: float = setting(1800.0, "Seconds an online evaluation waits for them; then the candidate retires.")
    # Fleet mode: many sidecars, one learner
    share: str | None = setting(
        None,
        "Folder or fsspec URL (e.g. s3://bucket/prefix) where sidecars ship what they record and the learner "
        "publishes versions (unset: one process does everything).",
    )
    share_interval: float = setting(2.0, "Seconds between two shipments of new rows to the share (and reads of it).")
    share_poll: float = setting(0.5, "Seconds between two reads of the share's registry by a sidecar.")
    lease_ttl: float = setting(
        15.0, "Seconds a learner's hold on the share lasts unless renewed (a crashed one's lapses)."
    )
    # Telemetry
    otlp_endpoint: str | None = setting(
        None, "OTLP/HTTP traces endpoint (e.g. http://127.0.0.1:4318/v1/traces) to export spans to."
    )
    log_level: str = setting("info", "Log level: debug, info, warning or error.")

    def __post_init__(self) -> None:
        if self.capture_tokens not in {"auto", "always", "never"}:
            raise ConfigError(f"capture_tokens must be auto, always or never, not {self.capture_tokens!r}")
        if self.swap_mode not in {"auto", "lora", "merged"}:
            raise ConfigError(f"swap_mode must be auto, lora or merged, not {self.swap_mode!r}")
        if any("=" not in route for route in self.routes):
            raise ConfigError("routes are MODEL=TARGET, e.g. gpt-4o-mini=policy")
        if self.train_window not in {"new", "all"}:
            raise ConfigError(f"train_window must be new or all, not {self.train_window!r}")
        if self.train_algorithm not in {"sft", "kto", "grpo"}:
            raise ConfigError(f"train_algorithm must be sft, kto or grpo, not {self.train_algorithm!r}")
        if self.credit_policy not in {"last", "broadcast", "discounted"}:
            raise ConfigError(f"credit_policy must be last, broadcast or discounted, not {self.credit_policy!r}")
        positive = (
            "max_body_mb",
            "max_pending_spans",
            "upstream_connections",
            "db_memory_limit_mb",
            "db_cache_mb",
            "db_threads",
        )
        if any(getattr(self, name) <= 0 for name in (*positive, "session_index_size")):
            raise ConfigError(f"{', '.join(positive)} and session_index_size must be positive")
        if self.train_processes < 1:
            raise ConfigError(f"train_processes must be 1 or more, not {self.train_processes}")
        if self.group_samples < 0:
            raise ConfigError(f"group_samples must be 0 (off) or more, not {self.group_samples}")
        if self.explore_samples < 0 or self.explore_attempts < 1 or self.explore_budget < 1:
            raise ConfigError("explore_samples must be 0 or more, explore_attempts and explore_budget 1 or more")
        if self.memory_examples < 1 or self.memory_size < 1:
            raise ConfigError("memory_examples and memory_size must be 1 or more")
        if min(self.share_interval, self.share_poll, self.lease_ttl) <= 0:
            raise ConfigError("share_interval, share_poll and lease_ttl must be positive")
        if self.share and self.swap_mode == "merged":
            raise ConfigError("with a share, versions are served as LoRA adapters (swap_mode lora or auto)")
        if self.share and not self.vllm and not (self.upstream or self.provider_models):
            raise ConfigError("with a share, the policy is served by --vllm servers that the learner also reaches")
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            raise ConfigError(f"upstream must be an http(s) URL, not {self.upstream!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked: what may be logged."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata["secret"] and value else value
        return out


def fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Config)


def flag_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def env_name(f: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + f.name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults are left to :func:`load` so that precedence stays in one place."""
    parser.add_argument("--config", type=Path, help="TOML file with settings (keys as in the README table).")
    for f in fields():
        kind = "append" if _is_tuple(f) else "store"
        parser.add_argument(flag_name(f), dest=f.name, action=kind, default=None, help=f.metadata["help"])


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Build the config: defaults < TOML file < environment < command line < keyword overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    toml_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if toml_path:
        with open(toml_path, "rb") as fh:
            table = tomllib.load(fh)
        unknown = set(table) - {f.name for f in fields()}
        if unknown:
            raise ConfigError(f"unknown settings in {toml_path}: {', '.join(sorted(unknown))}")
        values.update(table)
    for f in fields():
        if env_name(f) in environ:
            values[f.name] = environ[env_name(f)]
        cli = getattr(args, f.name, None) if args is not None else None
        if cli is not None:
            values[f.name] = cli
    values.update(overrides)
    return Config(**{name: _coerce(name, value) for name, value in values.items()})


def _is_tuple(f: dataclasses.Field[Any]) -> bool:
    return isinstance(f.default, tuple)


# The value type of settings whose default is None (annotations are strings under postponed evaluation).
_OPTIONAL_KINDS: dict[str, type] = {"Path | None": Path, "float | None": float, "int | None": int}


def _coerce(name: str, value: Any) -> Any:
    f = next(f for f in fields() if f.name == name)
    kind: type = type(f.default) if f.default is not None else _OPTIONAL_KINDS.get(str(f.type), str)
    try:
        if _is_tuple(f):
            items = value.split(",") if isinstance(value, str) else value
            return tuple(str(v).strip() for v in items if str(v).strip())
        if kind is bool and isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        if isinstance(value, str) and value == "" and f.default is None:
            return None
        return value if isinstance(value, kind) else kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot read {value!r} as {kind.__name__}") from exc


def markdown_table() -> str:
    """The README's configuration table (``lightwire settings`` prints it; a test keeps the README in step)."""
    lines = ["| setting (TOML key) | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for f in fields():
        default = "" if f.default in (None, ()) else f"`{str(f.default).replace(str(Path.home()), '~')}`"
        lines.append(f"| `{f.name}` | `{flag_name(f)}` | `{env_name(f)}` | {default} | {f.metadata['help']} |")
    return "\n".join(lines)
