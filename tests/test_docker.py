"""The CPU image (docker/Dockerfile) and docker/compose.yaml, used as an operator uses them.

``docker/prepare-host.sh`` runs first: it installs and starts the Docker daemon, the compose plugin and a Debian
bookworm + Python 3.11 base image made offline with debootstrap (cached by name); it needs root unless all that is
there already. The image is then built from the working tree on that base and run with host networking: the
example agent of compose.yaml and the openai SDK call through it, feedback is posted, ``docker stop`` (SIGTERM)
arrives while a stream is in flight, and every span and feedback row is read back from the mounted volume.

Time on 2 cores: ~1.5 min when the images are cached (only Lightwire's code changed: +15 s; pyproject.toml changed:
+~5 min for the environment); ~10 min on a machine without Docker or any image (set-up ~3 min, build ~6 min).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from proxy import config as settings
from proxy.vllm_server import DEFAULT_STOP_GRACE_S
from tests.conftest import read_rows
from tests.test_serve_process import free_port

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "lightwire-base:bookworm"
IMAGE = "lightwire:test"
BUILD_STAGES = ("deps", "model", "app")  # docker/Dockerfile's
OWNER_LABEL = "lightwire.test.pid"  # on the test's containers: the pytest process that started them
#: What the Dockerfile's build context must hold (docker/Dockerfile.dockerignore keeps it to this).
CONTEXT = ("pyproject.toml", "README.md", "proxy", "store", "optimizers", "docker")
PREPARE_TIMEOUT_S = 900  # packages, dockerd, the compose plugin and the debootstrap base: ~3 min the first time
BUILD_TIMEOUT_S = 2400  # each of the four builds; all of them: ~6 min with nothing cached, ~15 s for a code change
READY_TIMEOUT_S = 420  # vLLM-CPU loads the model in ~1-2 min on 2 cores
HEALTHY_TIMEOUT_S = 120  # the HEALTHCHECK runs every 30 s
STOP_TIMEOUT_S = 90  # docker stop -t: SIGKILL after this, far past what a clean stop takes
SHM_SIZE = "1g"  # what compose.yaml gives it: vLLM does not start in Docker's default 64 MiB of /dev/shm
MIN_SHM_BYTES = 256 * 2**20
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
IN_FLIGHT_TOKENS = 96
ADMIN_KEY = "lw-test-admin-key"  # the image listens on 0.0.0.0: without an admin key its admin API is off

pytestmark = [pytest.mark.docker, pytest.mark.timeout(PREPARE_TIMEOUT_S + BUILD_TIMEOUT_S + 900)]


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs: Any) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout.strip()


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def remove_orphans() -> None:
    """Remove the containers of earlier runs that were killed before their cleanup (each holds a vLLM)."""
    listing = docker("ps", "--all", "--filter", f"label={OWNER_LABEL}", "--format", "{{.ID}} {{.Labels}}")
    for line in listing.splitlines():
        container, labels = line.split(" ", 1)
        pid = dict(label.split("=", 1) for label in labels.split(","))[OWNER_LABEL]
        if not Path(f"/proc/{pid}").exists():
            docker("rm", "--force", container, check=False)


@pytest.fixture(scope="module")
def docker_host() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "docker" / "prepare-host.sh")],
        env={**os.environ, "BASE_IMAGE_NAME": BASE_IMAGE, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=PREPARE_TIMEOUT_S,
    )
    assert done.returncode == 0, f"docker/prepare-host.sh failed:\n{done.stdout}{done.stderr}"
    remove_orphans()


def stage_context(context: Path) -> list[str]:
    """Copy what the build needs into ``context`` and return the extra ``docker build`` arguments.

    The daemon here may be reached only through the legacy builder, which reads no per-Dockerfile ignore file,
    so the context is staged instead of sending the whole checkout (.venv included). torch's CPU build comes from
    wherever this machine's pip finds it, put in docker/wheels/, when its usual index is out of reach.
    """
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache")
    for part in CONTEXT:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, context / part, ignore=junk)
        else:
            shutil.copy2(source, context / part)
    pin = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins no torch version"
    wheels = context / "docker" / "wheels"
    wheels.mkdir(exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
    got = subprocess.run([*download, "--dest", str(wheels), pin.group(1) + "+cpu"], capture_output=True, timeout=600)
    return ["--build-arg", "TORCH_INDEX_URL="] if got.returncode == 0 else []


def image_id(tag: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)


@pytest.fixture(scope="module")
def image(docker_host: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build the CPU image from the working tree; return its environment (the settings it runs with).

    The build stages are tagged too: their layers are the cache of the next build (the large environment is
    rebuilt only when pyproject.toml changes), and the ones a rebuild replaces are removed (~4 GB each).
    """
    context = tmp_path_factory.mktemp("docker-context")
    extra = stage_context(context)
    log = context.parent / "docker-build.log"
    tags = {f"{IMAGE}-{stage}": ["--target", stage] for stage in BUILD_STAGES} | {IMAGE: []}
    previous = {tag: image_id(tag) for tag in tags}
    build = ["docker", "build", "--network", "host", "--file", "docker/Dockerfile"]
    build += ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *extra]
    with log.open("w") as out:
        for tag, target in tags.items():
            done = subprocess.run(
                [*build, *target, "--tag", tag, "."],
                cwd=context,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
            )
            assert done.returncode == 0, f"docker build failed; the end of {log}:\n{tail(log)}"
    shutil.rmtree(context)
    for tag in reversed(tags):  # children first: an image another one is built on cannot go before it
        if previous[tag] and previous[tag] != image_id(tag):
            docker("image", "rm", previous[tag], check=False)
    env = json.loads(docker("image", "inspect", "--format", "{{json .Config.Env}}", IMAGE))
    return dict(item.split("=", 1) for item in env)


async def run(*args: str, timeout: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return await proc.wait(), output.decode(errors="replace")


async def inspect(container: str, template: str) -> str:
    code, output = await run("docker", "inspect", "--format", template, container)
    assert code == 0, output
    return output.strip()


async def wait_ready(root: str, container: str, vllm_log: str) -> None:
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(READY_TIMEOUT_S):
            while await inspect(container, "{{.State.Running}}") == "true":
                try:
                    async with http.get(root + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(2)
        problem = "the container exited while starting"
    except TimeoutError:
        problem = f"not ready after {READY_TIMEOUT_S} s"
    _, logs = await run("docker", "logs", "--tail", "40", container)
    _, vllm = await run("docker", "exec", container, "tail", "-n", "30", vllm_log)
    pytest.fail(f"{problem}; the container's log:\n{logs}\nvLLM's log:\n{vllm}")


async def wait_healthy(container: str) -> str:
    status = ""
    async with asyncio.timeout(HEALTHY_TIMEOUT_S):
        while status != "healthy":
            status = await inspect(container, "{{.State.Health.Status}}")
            if status == "unhealthy":
                break
            await asyncio.sleep(2)
    return status


async def test_the_image_serves_records_and_flushes_every_row_on_sigterm(image: dict[str, str], tmp_path: Path) -> None:
    data, adapters = tmp_path / "data", tmp_path / "adapters"
    for folder in (data, adapters):
        folder.mkdir()
        folder.chmod(0o777)  # the image runs as an unprivileged user
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    container, agent = f"lightwire-test-{port}", f"lightwire-test-agent-{port}"
    owner = f"{OWNER_LABEL}={os.getpid()}"
    db = PurePosixPath(image["LIGHTWIRE_DB"])
    code, output = await run(
        "docker", "run", "--detach", "--name", container, "--label", owner, "--network", "host", "--shm-size", SHM_SIZE,
        "--env", f"LIGHTWIRE_PORT={port}", "--env", f"LIGHTWIRE_ADMIN_KEY={ADMIN_KEY}",
        "--volume", f"{data}:{db.parent}", "--volume", f"{adapters}:{image['LIGHTWIRE_ADAPTERS_DIR']}", IMAGE,
    )  # fmt: skip
    assert code == 0, output
    try:
        await wait_ready(root, container, f"{image['LIGHTWIRE_CACHE_DIR']}/vllm.log")
        assert (await run("docker", "exec", container, "id", "-un"))[1].strip() == "lightwire"
        assert "tini" in (await run("docker", "exec", container, "cat", "/proc/1/cmdline"))[1]
        assert await wait_healthy(container) == "healthy"

        # The example agent of compose.yaml, configured only by OPENAI_BASE_URL (and the key the SDK wants).
        code, agent_output = await run(
            "docker", "run", "--rm", "--name", agent, "--label", owner, "--network", "host",
            "--env", f"OPENAI_BASE_URL={root}/v1",
            "--env", "OPENAI_API_KEY=not-used", "--volume", f"{ROOT / 'docker' / 'example_agent.py'}:/app/agent.py:ro",
            "--entrypoint", "python3", IMAGE, "/app/agent.py", timeout=300,
        )  # fmt: skip
        assert code == 0, agent_output
        assert len(re.findall(r"^A: \S", agent_output, re.MULTILINE)) == 3, agent_output  # three answers

        client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="not-used", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="any-name", messages=QUESTION, temperature=0, max_tokens=12
        )
        answer, span_id = raw.parse(), raw.headers["x-lightwire-span-id"]
        assert "Paris" in (answer.choices[0].message.content or "")
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with aiohttp.ClientSession() as http:
            feedback = [{"response_id": answer.id, "reward": 1}, {"span_id": span_id, "reward": 0, "name": "thumbs"}]
            for body in feedback:
                async with http.post(root + "/feedback", json=body, headers=admin) as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["span_id"] == span_id
            async with http.get(root + "/admin/stats") as resp:
                assert resp.status == 401  # the admin key guards the admin API
            async with http.get(root + "/admin/stats", headers=admin) as resp:
                assert resp.status == 200 and (await resp.json())["spans"] == 4, await resp.text()

        # A stream in flight when `docker stop` sends SIGTERM is finished, then everything is written.
        stream = await client.chat.completions.create(
            model="any-name", messages=[{"role": "user", "content": "Count from one to one hundred."}],
            max_tokens=IN_FLIGHT_TOKENS, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks_left = aiter(stream)
        chunks = [await anext(chunks_left)]
        stop = asyncio.create_task(run("docker", "stop", "--time", str(STOP_TIMEOUT_S), container, timeout=300))
        chunks += [chunk async for chunk in chunks_left]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == IN_FLIGHT_TOKENS
        assert (await stop)[0] == 0
        assert await inspect(container, "{{.State.ExitCode}}") == "0"  # a clean exit, not SIGKILL's 137
    finally:
        _, logs = await run("docker", "logs", "--tail", "80", container)
        await run("docker", "rm", "--force", container, agent)

    rows = read_rows(data / db.name, "SELECT * FROM spans ORDER BY start_time")
    assert [r["http_status"] for r in rows] == [200] * 5, logs
    assert [r["request_stream"] for r in rows] == [False] * 4 + [True]
    assert rows[3]["span_id"] == span_id and rows[3]["response_id"] == answer.id
    assert rows[4]["usage_output_tokens"] == IN_FLIGHT_TOKENS
    assert all(r["provider_name"] == "vllm" and r["completion_token_ids"] for r in rows)
    fed = read_rows(data / db.name, "SELECT span_id, name, value FROM feedback ORDER BY created_at")
    assert [(r["span_id"], r["name"], r["value"]) for r in fed] == [(span_id, "reward", 1.0), (span_id, "thumbs", 0.0)]


def compose_config(*args: str, **env: str) -> dict[str, Any]:
    """The file as compose reads it (validated, variables filled in) with ``env`` and none of the caller's."""
    ours = {name: value for name, value in os.environ.items() if not name.startswith(("LIGHTWIRE_", "VLLM_"))}
    output = docker(
        "compose", "--file", str(ROOT / "docker" / "compose.yaml"), *args, "config", "--format", "json",
        env={**ours, **env},
    )  # fmt: skip
    return json.loads(output)


def seconds(duration: str) -> float:
    """Read a Go duration as compose prints it, e.g. ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def test_compose_file_validates_and_wires_agent_volumes_and_vllm_to_the_sidecar(image: dict[str, str]) -> None:
    services = compose_config()["services"]
    assert set(services) == {"lightwire", "agent"}  # the vLLM service only comes with its profile
    agent, sidecar = services["agent"], services["lightwire"]
    assert agent["environment"]["OPENAI_BASE_URL"] == f"http://lightwire:{image['LIGHTWIRE_PORT']}/v1"
    assert not [name for name in agent["environment"] if name.startswith("LIGHTWIRE_")]
    mounts = {volume["target"]: volume["source"] for volume in sidecar["volumes"] if volume["type"] == "volume"}
    assert str(PurePosixPath(image["LIGHTWIRE_DB"]).parent) in mounts
    assert image["LIGHTWIRE_ADAPTERS_DIR"] in mounts
    assert sidecar["environment"]["LIGHTWIRE_VLLM"] == ""  # the embedded model
    keyed = compose_config(LIGHTWIRE_ADMIN_KEY=ADMIN_KEY)["services"]["lightwire"]
    assert keyed["environment"]["LIGHTWIRE_ADMIN_KEY"] == ADMIN_KEY  # the operator's key reaches the sidecar
    assert int(sidecar["shm_size"]) >= MIN_SHM_BYTES
    defaults = settings.load(environ={})
    assert seconds(sidecar["stop_grace_period"]) > defaults.shutdown_timeout + DEFAULT_STOP_GRACE_S

    variant = compose_config("--profile", "vllm", LIGHTWIRE_VLLM="http://vllm:8000/v1")["services"]
    assert variant["lightwire"]["environment"]["LIGHTWIRE_VLLM"] == "http://vllm:8000/v1"
    vllm = variant["vllm"]
    # vLLM opens adapter folders by the paths the sidecar hands it: the same volume at the same place.
    adapters = image["LIGHTWIRE_ADAPTERS_DIR"]
    assert (mounts[adapters], adapters) in {(v["source"], v["target"]) for v in vllm["volumes"]}
    assert "--enable-lora" in vllm["command"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_compose_fleet_profile_wires_two_sidecars_one_learner_and_vllm_to_one_share(image: dict[str, str]) -> None:
    env = {"LIGHTWIRE_SHARE": "/share", "LIGHTWIRE_VLLM": "http://fleet-vllm:8000/v1"}
    services = compose_config("--profile", "fleet", **env)["services"]
    assert {"lightwire", "agent", "lightwire-b", "agent-b", "learner", "fleet-vllm"} <= set(services)
    sidecars, learner = [services["lightwire"], services["lightwire-b"]], services["learner"]
    for service in [*sidecars, learner]:
        assert service["environment"]["LIGHTWIRE_SHARE"] == "/share"
        assert service["environment"]["LIGHTWIRE_VLLM"] == "http://fleet-vllm:8000/v1"
        assert ("lightwire-share", "/share") in {(v["source"], v["target"]) for v in service["volumes"]}
    assert learner["command"] == ["learn"]
    assert services["agent-b"]["environment"]["OPENAI_BASE_URL"] == "http://lightwire-b:8400/v1"
    # each sidecar and the learner keep their own DuckDB file; vLLM reads the learner's versions at their path
    stores = [{v["target"]: v["source"] for v in s["volumes"]}["/data"] for s in [*sidecars, learner]]
    assert len(set(stores)) == 3
    adapters = image["LIGHTWIRE_ADAPTERS_DIR"]
    assert ("lightwire-adapters", adapters) in {(v["source"], v["target"]) for v in services["fleet-vllm"]["volumes"]}
    assert "--enable-lora" in services["fleet-vllm"]["command"]
