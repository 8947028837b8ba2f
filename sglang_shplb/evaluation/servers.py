"""The two servers the eval compares, each a real SGLang HTTP server in a process group of its own.

dense:  ``python -m sglang.launch_server --attention-backend torch_native`` (CPU) / ``flashinfer`` (CUDA)
sparse: ``python -m sglang_shplb.launch_server --shplb-plan PLAN --shplb-always-backend`` (the shplb backend:
        sparse prefill and decode per the plan; its dense heads and the layers the plan marks stock run on the same
        stock backend; through shplb even where the plan marks every layer stock, where the launcher would
        otherwise serve the stock backend outright), one per plan

Same model, device, dtype and flags otherwise; the radix cache is off so every prompt is a cold
prefill on both. Generation is greedy (temperature 0) and streamed: TTFT is the time from sending the
request to the first streamed chunk, as the client sees it (HTTP included).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DENSE_BACKEND = {"cpu": "torch_native", "cuda": "flashinfer"}
DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


@dataclass(frozen=True)
class ServerSpec:
    name: str                 # "dense" or "sparse"
    module: str               # the launcher module, run as ``python -m``
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args, "--host", "127.0.0.1", "--port", str(port)]


@dataclass(frozen=True)
class Generation:
    text: str
    ttft_s: float
    latency_s: float
    output_tokens: int
    sent_at: float = 0.0                          # time.perf_counter() when the request was sent
    chunks: tuple[tuple[float, int], ...] = ()    # per streamed chunk: (seconds after sending, tokens so far)


def server_specs(model: Path, plans: list[Path], device: str, dtype: str, context_length: int, concurrency: int = 1,
                 extra: tuple[str, ...] = (), dense_backend: str | None = None,
                 always_backend: bool = True) -> tuple[ServerSpec, list[ServerSpec]]:
    """The dense server and one sparse server per plan: the same flags but the backend. Sparse servers are
    named ``sparse`` (one plan) or ``sparse:<plan folder>``. ``dense_backend`` (default
    :data:`DENSE_BACKEND` of the device) is the dense server's backend and the sparse servers' stock one.
    ``always_backend``: through shplb even for a plan stock everywhere (the eval's sparse side); False: as a user's
    launcher would serve it (the stock backend outright there)."""
    dense_backend = dense_backend or DENSE_BACKEND[device]
    # one request slot over the concurrency: while SGLang 0.5.17 chunks a prompt, that request holds a slot of its own,
    # and at --max-running-requests == concurrency the last request waited for the others' whole decode (a CPU
    # server, 4 requests of 300 tokens, 256-token chunks: three ran together, the fourth took 5.7 s against 3.9, in
    # two rounds; with 5 slots all four ran together; round 32's GPU logs: one of 16 queued in every batch-16 cell)
    common = ["--model-path", str(model), "--device", device, "--dtype", dtype, "--context-length",
              str(context_length), "--disable-radix-cache", "--random-seed", "0",
              "--max-running-requests", str(max(concurrency, 1) + 1)]
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":  # SGLang's CPU engine; a KV pool sized for the requests in flight
        common += ["--max-total-tokens", str((concurrency + 1) * context_length), "--sleep-on-idle"]
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    else:  # the prefill graph capture of every size takes minutes (shared/gpu/README.md); decode graphs stay
        common += ["--disable-prefill-cuda-graph", "--cuda-graph-max-bs", str(max(8, concurrency))]
    common += list(extra)
    dense = ServerSpec("dense", "sglang.launch_server", (*common, "--attention-backend", dense_backend), env)
    names = ["sparse"] if len(plans) == 1 else [f"sparse:{Path(p).parent.name}" for p in plans]
    stock = () if dense_backend == DENSE_BACKEND[device] else ("--shplb-dense-backend", dense_backend)
    always = ("--shplb-always-backend",) if always_backend else ()
    return dense, [ServerSpec(n, "sglang_shplb.launch_server", (*common, *stock, "--shplb-plan", str(p), *always), env)
                   for n, p in zip(names, plans)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A started server; ``with Server(spec, log) as s: s.generate(...)`` stops it (the whole group)."""

    def __init__(self, spec: ServerSpec, log: Path, timeout_s: float = 900):
        self.spec, self.log, self.port = spec, log, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(spec.command(self.port), stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **spec.env}, start_new_session=True)
        t0 = time.time()
        while not self._healthy():
            if self.proc.poll() is not None or time.time() - t0 > timeout_s:
                self.stop()
                raise RuntimeError(f"{spec.name} server ({spec.module}) did not start: see {log}\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(2)
        self.startup_s = time.time() - t0

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health_generate", timeout=60) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def generate(self, input_ids: list[int], max_new_tokens: int, timeout_s: float = 1800,
                 ignore_eos: bool = False) -> Generation:
        """Greedy, streamed. ``ignore_eos``: always ``max_new_tokens`` tokens (timing runs)."""
        payload = {"input_ids": input_ids, "stream": True,
                   "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos}}
        req = self._json_request("/generate", payload)
        t0, ttft, last, chunks = time.perf_counter(), None, None, []
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{self.spec.name} server: {chunk['error']}")
                now = time.perf_counter() - t0
                ttft = ttft if ttft is not None else now
                chunks.append((now, int(chunk.get("meta_info", {}).get("completion_tokens", 0))))
                last = chunk
        if last is None:
            raise RuntimeError(f"{self.spec.name} server streamed no output")
        return Generation(last["text"], ttft, time.perf_counter() - t0,
                          int(last.get("meta_info", {}).get("completion_tokens", 0)), t0, tuple(chunks))

    def _json_request(self, path: str, body: dict) -> urllib.request.Request:
        return urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})

    def post(self, path: str, body: dict, timeout_s: float = 600) -> str:
        """POST ``body`` as JSON to one of the server's endpoints (e.g. ``/start_profile``); its reply's text."""
        with urllib.request.urlopen(self._json_request(path, body), timeout=timeout_s) as r:
            return r.read().decode(errors="replace")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
