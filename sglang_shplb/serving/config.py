"""Serving options of the shplb backend. They travel from the launcher (or a test) to SGLang's scheduler
subprocesses as environment variables, which every spawned process inherits."""
from __future__ import annotations

import os
from dataclasses import dataclass

from sglang_shplb.core.patterns import DECODE_RESELECT_EVERY

ENV_PLAN = "SHPLB_PLAN"                      # path of the plan (directory or plan.json)
ENV_DENSE_FALLBACK = "SHPLB_DENSE_FALLBACK"  # "1": no plan, every head dense (documented fallback)
ENV_DENSE_BACKEND = "SHPLB_DENSE_BACKEND"    # stock backend for dense heads (default: torch_native on CPU, flashinfer on CUDA)
ENV_GROUP_PREFILL = "SHPLB_GROUP_PREFILL_BY_BUCKET"  # "1": order the waiting queue so prefill batches share a bucket
ENV_HIST_EVERY = "SHPLB_BUCKET_LOG_EVERY"    # log the bucket histogram every N batches (0: never)
ENV_RESELECT = "SHPLB_DECODE_RESELECT_EVERY"  # decode steps a top-k / vertical-slash page selection is kept
ENV_WARMUP = "SHPLB_WARMUP"                  # "0": no extend warm-up at start (kernels compile on first use)
ENV_ALWAYS = "SHPLB_ALWAYS_BACKEND"          # "1": the shplb backend even for a plan stock everywhere (no outright)

BACKEND_NAME = "shplb"
#: ends the line a server logs where the launcher or the backend factory serves the stock backend outright (a plan
#: stock everywhere the server reaches); benchmarks read the server log for it
OUTRIGHT_MARK = "outright (--shplb-always-backend / SHPLB_ALWAYS_BACKEND=1 keeps shplb)"


@dataclass(frozen=True)
class ServingConfig:
    plan_path: str | None
    dense_fallback: bool
    dense_backend: str | None
    group_prefill_by_bucket: bool
    bucket_log_every: int
    decode_reselect_every: int = DECODE_RESELECT_EVERY
    warmup: bool = True
    always_backend: bool = False

    @staticmethod
    def from_env(env=None) -> "ServingConfig":
        env = os.environ if env is None else env
        return ServingConfig(
            plan_path=env.get(ENV_PLAN) or None,
            dense_fallback=env.get(ENV_DENSE_FALLBACK, "0") == "1",
            dense_backend=env.get(ENV_DENSE_BACKEND) or None,
            group_prefill_by_bucket=env.get(ENV_GROUP_PREFILL, "0") == "1",
            bucket_log_every=int(env.get(ENV_HIST_EVERY, "200")),
            decode_reselect_every=int(env.get(ENV_RESELECT, str(DECODE_RESELECT_EVERY))),
            warmup=env.get(ENV_WARMUP, "1") != "0",
            always_backend=env.get(ENV_ALWAYS, "0") == "1",
        )

    def to_env(self) -> dict[str, str]:
        out = {ENV_DENSE_FALLBACK: "1" if self.dense_fallback else "0",
               ENV_GROUP_PREFILL: "1" if self.group_prefill_by_bucket else "0",
               ENV_HIST_EVERY: str(self.bucket_log_every), ENV_RESELECT: str(self.decode_reselect_every),
               ENV_WARMUP: "1" if self.warmup else "0", ENV_ALWAYS: "1" if self.always_backend else "0"}
        if self.plan_path:
            out[ENV_PLAN] = str(self.plan_path)
        if self.dense_backend:
            out[ENV_DENSE_BACKEND] = self.dense_backend
        return out


def configure(plan: str | None = None, *, dense_fallback: bool = False, dense_backend: str | None = None,
              group_prefill_by_bucket: bool = False, bucket_log_every: int = 200,
              decode_reselect_every: int = DECODE_RESELECT_EVERY, warmup: bool = True,
              always_backend: bool = False) -> ServingConfig:
    """Set the options for servers started from this process (``sgl.Engine`` included)."""
    if decode_reselect_every < 1:
        raise ValueError(f"decode_reselect_every must be >= 1, got {decode_reselect_every}")
    cfg = ServingConfig(str(plan) if plan else None, dense_fallback, dense_backend, group_prefill_by_bucket,
                        bucket_log_every, decode_reselect_every, warmup, always_backend)
    for k in (ENV_PLAN, ENV_DENSE_BACKEND):
        os.environ.pop(k, None)
    os.environ.update(cfg.to_env())
    return cfg
