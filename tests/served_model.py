"""`transformers serve` (transformers' own OpenAI-compatible server) on a free loopback port, offline, for tests.

transformers 5.23 serves a local folder pinned as its FORCE_MODEL argument: requests must name the model as that
same path (any other name is HTTP 400), and `/v1/models` lists only the hub cache, so it is pointed at an empty one
(without a cache folder that route answers 500). The server runs in its own process group, stopped as a whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from judge_server import free_port

START_TIMEOUT = 180.0  # seconds for the server to import, load the model and answer /v1/models


@dataclass
class ServedModel:
    process: subprocess.Popen
    folder: str  # the model's name in requests
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def judge_spec(self) -> str:
        return f"openai:{self.folder}@{self.base_url}"

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after 5 s."""
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def serve(folder: str | Path, workdir: Path) -> ServedModel:
    """Start `transformers serve FOLDER` on 127.0.0.1 and wait until /v1/models answers 200."""
    hub_cache = workdir / "empty-hub-cache"
    hub_cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "OMP_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
    }
    port = free_port()
    log = workdir / "transformers-serve.log"
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder)]
    options = ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "info"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, *options], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = ServedModel(process, str(folder), port, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {process.returncode}:\n{served.log_tail()}")
        try:
            with urllib.request.urlopen(f"{served.base_url}/models", timeout=5) as reply:
                if reply.status == 200:
                    return served
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    served.stop()
    raise RuntimeError(f"transformers serve did not answer within {START_TIMEOUT:g} s:\n{served.log_tail()}")
