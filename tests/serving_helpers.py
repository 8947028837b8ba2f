"""Helpers of the serving tests (not a conftest): the model, plans, a subprocess HTTP server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
SERVER_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "16384", "--sleep-on-idle",
                "--host", "127.0.0.1"]


def model_dir() -> Path:
    """SmolLM2-135M-Instruct as a HF checkpoint: $SHPLB_TEST_MODEL, else the lead's model_store."""
    if os.environ.get("SHPLB_TEST_MODEL"):
        return Path(os.environ["SHPLB_TEST_MODEL"])
    from sglang_shplb.planning.model_store import default_checkpoint
    return Path(default_checkpoint())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def env(**extra) -> dict:
    """The servers' environment: this one, minus the kernel tests' interpreter switch (conftest.py), plus
    SGLang's CPU engine."""
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.update(CPU_ENV)
    e.update(extra)
    return e


def passkey_prompt(tok, key: int, reps: int = 40) -> str:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    body = filler * (reps // 2) + f"The pass key is {key}. Remember it. {key} is the pass key. " + filler * (reps // 2)
    msgs = [{"role": "user", "content": "There is an important info hidden inside a lot of irrelevant text. "
             "Find it and memorize it.\n" + body + "\nWhat is the pass key?"}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "The pass key is"


class Server:
    """``python -m sglang_shplb.launch_server`` (or ``module``) in its own process group; killed as a group."""

    def __init__(self, args: list[str], log: Path, timeout: float = 240, module: str = "sglang_shplb.launch_server",
                 env_extra: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", module, *args, *SERVER_FLAGS, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(**(env_extra or {})),
                                     cwd=ROOT, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=20) as r:
                    if r.status == 200:
                        self.startup_s = time.time() - t0
                        return
            except Exception:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not up in {timeout}s:\n{log.read_text()[-4000:]}")

    def post(self, path: str, payload: dict, timeout: float = 300):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except Exception:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except Exception:
                pass


def greedy_answers(args: list[str], prompts: list[str], log: Path, max_new: int, env_extra: dict | None = None,
                   module: str = "sglang_shplb.launch_server") -> tuple[list[list[int]], float]:
    """Start a server (2K context), take its greedy output ids for each prompt, stop it; with its startup seconds."""
    s = Server(args + ["--context-length", "2048", "--log-level", "info"], log, timeout=420, module=module,
               env_extra=env_extra)
    try:
        outs = []
        for p in prompts:
            code, body = s.post("/generate", {"text": p, "sampling_params": {"max_new_tokens": max_new,
                                                                             "temperature": 0}})
            assert code == 200, body
            outs.append(body["output_ids"])
        return outs, s.startup_s
    finally:
        s.stop()
