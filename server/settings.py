"""Server settings: the only place that reads the environment (TWINSERVE_*)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .modes import Mode, modes_help


class Settings(BaseSettings):
    """Every field can be set as TWINSERVE_<NAME> (e.g. TWINSERVE_MAX_BATCH_SIZE=32) or a CLI flag."""

    model_config = SettingsConfigDict(env_prefix="TWINSERVE_", extra="ignore")

    artifact: str = Field("artifacts/demo", description="artifact directory to serve")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=1, le=65535, description="bind port")
    model_name: str | None = Field(None, description="model id in the API (default: artifact dir name)")
    mode: Mode = Field("lowrank", description=modes_help())
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX; the demo "
        "eval showed no quality loss), else float32")
    prepack: bool = Field(True, description="CPU: reorder linear weights once into oneDNN's layout when "
                          "max_batch_size >= 4 (measured 2.7x per matmul at batch 16; 0.9x at batch 1, so not "
                          "below 4)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    max_batch_size: int = Field(16, ge=1, le=1024, description="rows in the running decode batch")
    max_tokens_per_step: int = Field(512, ge=16, description="tokens per engine step (decode tokens + prefill "
                                     "chunks, one forward): longer prompts are prefilled in chunks across steps")
    max_queue: int = Field(256, ge=1, description="waiting requests before 429")
    max_model_len: int | None = Field(None, ge=8, description="context limit and KV cache length per slot (default: min(model max positions, 2048))")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV cache budget in GiB: positions per slot = "
                                       "budget / (max_batch_size × KV bytes per position), capped by max_model_len "
                                       "when set (default: max_model_len positions per slot)")
    max_tokens_default: int = Field(16, ge=1, description="max_tokens when the request omits it")
    request_timeout_s: float = Field(120.0, gt=0, description="per-request deadline (504 after it)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM/SIGINT, in-flight and queued requests get "
                                   "this long to finish while new ones and /ready get 503; a container's stop "
                                   "timeout must exceed it by 10 s (docs: deploy/README.md)")
    materialize_cache: int = Field(4, ge=1, description="fused models kept by materialize/expert modes (LRU)")
    router_top_k: int | None = Field(None, ge=1, description="override the router's top-k")
    router_temperature: float | None = Field(None, gt=0, description="override the router's temperature")
    api_key: str | None = Field(None, description="require Authorization: Bearer <key> on /v1/*")
    allowed_origins: list[str] = Field(default_factory=list, description="CORS: origins allowed to call the API "
                                       "from a browser, a JSON list such as [\"https://app.example\"] (\"*\" = any); "
                                       "empty = CORS off (default: [])")
    allowed_methods: list[str] = Field(default_factory=lambda: ["*"], description="CORS: allowed methods, a JSON "
                                       "list (default: [\"*\"])")
    allowed_headers: list[str] = Field(default_factory=lambda: ["*"], description="CORS: allowed request headers, "
                                       "a JSON list (default: [\"*\"])")
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body in bytes; larger "
                                   "ones get 413 (default: 8 MiB)")
    verify_artifact: bool = Field(True, description="check the artifact's checksums (every file and the manifest "
                                  "itself) once at startup; false skips them")
    require_parity: bool = Field(True, description="`twinserve serve` refuses an artifact whose build recorded no "
                                 "parity result (the gate never ran or never finished) unless the build ran with "
                                 "--skip-parity; false serves it anyway")
    log_level: str = Field("info", description="uvicorn log level")
