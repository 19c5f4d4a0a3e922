"""vLLM's OpenAI-compatible server as a supervised child process.

:class:`VllmServer` starts ``python -m vllm.entrypoints.openai.api_server`` on a free loopback port, with
runtime LoRA loading and the dev-mode endpoints (``/collective_rpc``, ``/reset_prefix_cache``) enabled, and
sends its output to a log file. :meth:`VllmServer.supervise` watches it and restarts it with exponential
backoff when it exits or stops answering ``/health``; :attr:`VllmServer.ready` is false meanwhile so that
the proxy can answer 503. Use it from an aiohttp ``cleanup_ctx``::

    async def vllm_ctx(app: web.Application) -> AsyncIterator[None]:
        async with VllmServer(options).running(wait_ready=False) as server:
            app[VLLM] = server
            yield

The child runs in its own process group, so that :meth:`VllmServer.stop` also ends vLLM's engine-core and
worker processes, and a :class:`~proxy.child_guard.ChildGuard` ends that group if Lightwire dies without
stopping it (SIGKILL, a crash). vLLM is only ever talked to over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from proxy.child_guard import ChildGuard
from proxy.errors import LightwireError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Seconds to wait for a fresh vLLM to answer ``/health`` (it takes 40-90 s on two cores).
DEFAULT_STARTUP_TIMEOUT_S = 300.0
#: Seconds between SIGTERM and SIGKILL when stopping.
DEFAULT_STOP_GRACE_S = 15.0
#: How often ``/health`` is polled while starting, and while running.
STARTUP_POLL_INTERVAL_S = 1.0
HEALTH_INTERVAL_S = 5.0
HEALTH_TIMEOUT_S = 10.0
#: A running server that fails ``/health`` this long is killed and restarted.
UNHEALTHY_RESTART_S = 60.0
#: Restart delays: doubled after each failure up to the maximum, back to the initial one after a server
#: stayed up for BACKOFF_RESET_S.
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
BACKOFF_RESET_S = 300.0
#: How often a start in progress is reported in the log.
PROGRESS_INTERVAL_S = 10.0
#: Lines of the vLLM log quoted in a start error.
LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 64 * 1024


class VllmError(LightwireError, RuntimeError):
    """The managed vLLM server is unusable."""


class VllmStartError(VllmError):
    """vLLM exited or did not become healthy while starting."""


@dataclass(frozen=True, kw_only=True)
class VllmOptions:
    """How to run vLLM. The model folder must hold weights, tokenizer and chat template (no hub access)."""

    model_dir: Path
    served_model_name: str
    log_path: Path
    max_lora_rank: int = 16
    max_loras: int = 2
    max_model_len: int = 2048
    #: GiB of RAM for the KV cache (VLLM_CPU_KVCACHE_SPACE).
    kv_cache_space_gib: int = 2
    #: 0 picks a free loopback port at every start, so :attr:`VllmServer.base_url` may change on a restart.
    port: int = 0
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    python: str = sys.executable
    #: The weights' dtype as served; "auto": :func:`serving_dtype`.
    dtype: str = "auto"
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)


def free_loopback_port() -> int:
    """Return a TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def serving_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``bfloat16`` where the CPU has bf16 instructions (x86: AVX-512 BF16 or AMX; Arm: BF16), else ``float32``.

    vLLM-CPU serves bfloat16 on any x86 CPU, but without those instructions its matmuls fall back to torch's
    emulated bf16: on an AVX2-only Xeon, 16 answers at once came at 19.5 tokens/s in bfloat16 and 60.7 in float32
    (one at a time, 12.3 and 13.9). Where the flags cannot be read (not Linux), bfloat16, vLLM's own choice.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "bfloat16"
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16", "bf16"} else "float32"


def build_command(options: VllmOptions, port: int) -> list[str]:
    """Return the command line that starts vLLM's OpenAI server for ``options`` on ``port``."""
    # The `vllm` console script fails (the distribution is named vllm-cpu), hence `python -m`.
    return [
        options.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(options.model_dir),
        "--served-model-name",
        options.served_model_name,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--dtype",
        serving_dtype() if options.dtype == "auto" else options.dtype,
        "--max-model-len",
        str(options.max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(options.max_lora_rank),
        "--max-loras",
        str(options.max_loras),
        *options.extra_args,
    ]


def build_env(options: VllmOptions) -> dict[str, str]:
    """Return the child's environment: ours plus what runtime LoRA, weight reloads and offline use need."""
    env = dict(os.environ)
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # /v1/load_lora_adapter, /v1/unload_lora_adapter
            "VLLM_SERVER_DEV_MODE": "1",  # /collective_rpc (reload_weights), /reset_prefix_cache
            "VLLM_CPU_KVCACHE_SPACE": str(options.kv_cache_space_gib),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(options.extra_env)
    return env


class VllmServer:
    """One vLLM server process on loopback, started, health-checked, restarted and stopped from asyncio."""

    def __init__(
        self, options: VllmOptions, *, on_start: Callable[[VllmServer], Awaitable[None]] | None = None
    ) -> None:
        self.options = options
        #: Run once a fresh process is healthy and before it counts as ready, e.g. to load the served weights
        #: again after a restart; an exception fails that start.
        self.on_start = on_start
        self._process: asyncio.subprocess.Process | None = None
        self._exit: asyncio.Task[int] | None = None  # completes with the child's exit code
        self._guard: ChildGuard | None = None  # ends the child's group if this process dies first
        self._port: int | None = None
        self._ready = False
        self._ready_event = asyncio.Event()
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None
        self._started_at = 0.0
        self.starts = 0
        """How many times a vLLM process was launched (1 + restarts)."""

    @property
    def ready(self) -> bool:
        """True while the child runs and its last health check passed."""
        return self._ready

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, without ``/v1``: the admin endpoints (``/collective_rpc``) live at the root."""
        if self._port is None:
            raise VllmError("vLLM has not been started")
        return f"http://{LOOPBACK}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running vLLM API server (also its process group id), if any."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    async def start(self) -> None:
        """Launch vLLM and return once it answers ``/health``.

        Raises :class:`VllmStartError` (after killing the child) if it exits or is not healthy within
        ``options.startup_timeout_s``. Cancelling the call also kills the child.
        """
        if self.pid is not None:
            raise VllmError(f"vLLM is already running (pid {self.pid})")
        self._stopping = False
        if not (self.options.model_dir / "config.json").is_file():
            raise VllmStartError(f"{self.options.model_dir} is not a Hugging Face model folder (no config.json)")
        port = self.options.port or free_loopback_port()
        command = build_command(self.options, port)
        self.options.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.options.log_path.open("ab") as log:
            header = f"\n=== lightwire: start #{self.starts} at {time.ctime()}: {' '.join(command)}\n"
            log.write(header.encode())
            log.flush()
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=build_env(self.options),
                start_new_session=True,  # own process group: stop() reaches the engine and worker processes
            )
        self._exit = asyncio.create_task(self._process.wait(), name=f"vllm-{self._process.pid}-exit")
        self._port = port
        self._started_at = time.monotonic()
        logger.info(
            "Starting vLLM (pid %d) for %s on %s, log in %s",
            self._process.pid,
            self.options.served_model_name,
            self.base_url,
            self.options.log_path,
        )
        try:
            self._guard = await ChildGuard.start(self._process.pid)
            await self._wait_healthy()
            if self.on_start is not None:
                try:
                    await self.on_start(self)
                except Exception as exc:
                    raise VllmStartError(f"vLLM started but could not be prepared for serving: {exc}") from exc
        except BaseException:
            await self._terminate()
            raise
        self._set_ready(True)
        logger.info("vLLM is ready on %s after %.0f s", self.base_url, time.monotonic() - self._started_at)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until :attr:`ready` is true; raises :class:`TimeoutError` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not self._ready:
                await self._ready_event.wait()

    async def supervise(self) -> None:
        """Keep vLLM running until :meth:`stop`: start it if needed, restart it when it dies or hangs.

        Failed starts and crashes are retried after an exponentially growing delay. Meant to run as a
        background task; cancelling it leaves the child alone (call :meth:`stop` for that).
        """
        backoff = BACKOFF_INITIAL_S
        while not self._stopping:
            if self.pid is None:
                try:
                    await self.start()
                except VllmStartError as error:
                    if self._stopping:
                        return
                    logger.error("%s; retrying in %.0f s", error, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
            await self._watch()
            if self._stopping:
                return
            if time.monotonic() - self._started_at > BACKOFF_RESET_S:
                backoff = BACKOFF_INITIAL_S
            logger.warning("Restarting vLLM in %.0f s (log in %s)", backoff, self.options.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def stop(self) -> None:
        """Stop vLLM: SIGTERM to its process group, SIGKILL after ``options.stop_grace_s``."""
        self._stopping = True
        await self._terminate()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def running(self, *, wait_ready: bool = True) -> AsyncIterator[VllmServer]:
        """Run vLLM under :meth:`supervise` for the duration of the block, then stop it.

        With ``wait_ready`` the block starts once vLLM is healthy (a failed first start raises
        :class:`VllmStartError`); without it, the block starts at once and :attr:`ready` turns true later.
        """
        supervisor: asyncio.Task[None] | None = None
        try:
            if wait_ready:
                await self.start()
            supervisor = asyncio.create_task(self.supervise(), name="vllm-supervisor")
            yield self
        finally:
            self._stopping = True
            if supervisor is not None:
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor
            await self.stop()

    # -- internals ---------------------------------------------------------------------------------------

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            logger.info("vLLM %s", "ready" if ready else "not ready")
        self._ready = ready
        if ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S))
        return self._session

    async def _healthy(self) -> bool:
        try:
            async with self._client().get(f"{self.base_url}/health") as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _exited(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the child to exit; return its exit code, or None."""
        if self._exit is None:
            return None
        done, _ = await asyncio.wait({self._exit}, timeout=timeout)
        return self._exit.result() if done else None

    async def _wait_healthy(self) -> None:
        deadline = self._started_at + self.options.startup_timeout_s
        next_report = self._started_at + PROGRESS_INTERVAL_S
        while True:
            if self._exit is None or self._exit.done():
                code = self._exit.result() if self._exit is not None else None
                raise VllmStartError(
                    f"vLLM exited with code {code} while starting; "
                    f"last lines of {self.options.log_path}:\n{self._log_tail()}"
                )
            if await self._healthy():
                return
            now = time.monotonic()
            if now > deadline:
                raise VllmStartError(
                    f"vLLM was not healthy after {self.options.startup_timeout_s:.0f} s; "
                    f"last lines of {self.options.log_path}:\n{self._log_tail()}"
                )
            if now >= next_report:
                next_report = now + PROGRESS_INTERVAL_S
                lines = self._log_tail(1).strip()
                logger.info("Waiting for vLLM (%.0f s): %s", now - self._started_at, lines[-200:])
            await self._exited(STARTUP_POLL_INTERVAL_S)

    async def _watch(self) -> None:
        """Return when the child has exited, or after killing it for failing health checks too long."""
        process = self._process
        if process is None:
            return
        last_healthy = time.monotonic()
        while not self._stopping:
            code = await self._exited(HEALTH_INTERVAL_S)
            if code is not None:
                self._set_ready(False)
                if not self._stopping:
                    logger.error(
                        "vLLM (pid %d) exited with code %d; last lines of %s:\n%s",
                        process.pid,
                        code,
                        self.options.log_path,
                        self._log_tail(),
                    )
                await self._terminate()  # reap what is left of its process group
                return
            if await self._healthy():
                last_healthy = time.monotonic()
                self._set_ready(True)
                continue
            self._set_ready(False)
            if time.monotonic() - last_healthy > UNHEALTHY_RESTART_S:
                logger.error("vLLM failed /health for %.0f s; killing it", UNHEALTHY_RESTART_S)
                await self._terminate()
                return

    async def _terminate(self) -> None:
        """End the child's whole process group: SIGTERM, then SIGKILL after the grace period."""
        self._set_ready(False)
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            if await self._exited(self.options.stop_grace_s) is None:
                logger.warning("vLLM did not stop within %.0f s; killing it", self.options.stop_grace_s)
        # The API server may be gone while its engine or workers linger in the group.
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()
        if self._guard is not None:
            await self._guard.stand_down()
            self._guard = None
        if self._process is process:
            self._process = None
            self._exit = None

    def _log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.options.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        # vLLM lists its ~60 routes on start-up; they would crowd out the lines that explain a failure.
        useful = [line for line in text.splitlines() if "Route: " not in line]
        return "\n".join(useful[-lines:])


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
