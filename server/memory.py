"""Memory at startup: weights, factors and the KV cache, planned before loading and reported after.

The KV cache holds ``slots`` rows of ``positions`` keys and values per layer (twin.model.SlotCache). With a
budget (``kv_cache_gib``, like vLLM's ``--kv-cache-memory``) the positions per slot follow from it; without
one they are ``max_model_len`` (default min(model max positions, 2048)). On CPU the plan is checked against
the memory available now, so a server that cannot fit refuses at once, with the numbers, instead of being
killed mid-request.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twin.errors import TwinserveError
from twin.util import human_bytes

GiB = 1 << 30
DEFAULT_MAX_LEN = 2048
MIN_POSITIONS = 64
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


class StartupError(TwinserveError):
    """The server cannot start with these settings on this machine (exit 2); names the setting and the numbers."""


def kv_bytes_per_position(config, dtype_bytes: int) -> int:
    """Keys + values of one position of one slot over every layer, from the config (GQA aware)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv * head_dim * dtype_bytes


@dataclass
class MemoryPlan:
    weights_bytes: int
    factors_bytes: int
    kv_bytes: int
    slots: int
    positions: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.factors_bytes + self.kv_bytes

    def summary(self) -> str:
        return (f"weights {human_bytes(self.weights_bytes)}, factors {human_bytes(self.factors_bytes)}, KV cache "
                f"{human_bytes(self.kv_bytes)} ({self.slots} slots × {self.positions} positions)")

    def to_json(self) -> dict:
        return {"weights_bytes": self.weights_bytes, "factors_bytes": self.factors_bytes, "kv_bytes": self.kv_bytes,
                "slots": self.slots, "positions": self.positions}


def plan(manifest, config, artifact: Path, dtype: str, slots: int, max_model_len: int | None,
         kv_cache_gib: float | None, with_experts: bool = True) -> MemoryPlan:
    """Bytes the served model will hold in ``dtype`` (the artifact's files, upcast as loading does)."""
    from twin.artifact import BACKBONE, index_name

    size = _BYTES[dtype]
    stored = _BYTES.get(manifest.dtype, 4)

    def file_bytes(name: str) -> int:
        return sum(f.bytes for rel, f in manifest.files.items() if rel == name or rel.startswith(name.removesuffix(
            ".safetensors") + "-") or rel == index_name(name))

    weights = file_bytes(BACKBONE) * size // stored
    factors = 0
    if with_experts:
        for info in manifest.tensors.values():
            rank = sum(info.ranks.values())
            factors += (rank * sum(info.shape) if info.kind == "lowrank" else
                        len(manifest.experts) * _prod(info.shape)) * size
    per_position = kv_bytes_per_position(config, size)
    ctx = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LEN
    positions = min(max_model_len or DEFAULT_MAX_LEN, ctx)
    if kv_cache_gib is not None:
        fit = int(kv_cache_gib * GiB) // (slots * per_position)
        if fit < MIN_POSITIONS:
            raise StartupError(f"kv_cache_gib (--kv-cache-gib / TWINSERVE_KV_CACHE_GIB): {kv_cache_gib} GiB holds "
                               f"{fit} positions per slot for {slots} slots ({per_position:,} bytes per position); "
                               f"at least {MIN_POSITIONS} are needed: raise it or lower --max-batch-size")
        positions = min(ctx, fit) if max_model_len is None else min(positions, fit)
    return MemoryPlan(weights, factors, slots * positions * per_position, slots, positions)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_fits(p: MemoryPlan, device: str) -> None:
    """StartupError when a CPU server's weights + factors + KV cache exceed the memory available now."""
    if device != "cpu":
        return
    from twin.util import available_memory

    avail = available_memory()
    if p.total_bytes > avail:
        raise StartupError(f"not enough memory to serve: {p.summary()} = {p.total_bytes / GiB:.2f} GiB, "
                           f"{avail / GiB:.2f} GiB available; lower --kv-cache-gib or --max-batch-size, or serve "
                           "--mode backbone (no factors)")


def memory_plan(settings, manifest) -> MemoryPlan:
    """The startup plan for ``settings`` (server.settings.Settings) and an artifact's manifest: slots from the
    serving mode, dtype and device as the server will pick them; StartupError when it cannot fit this machine."""
    from twin.loading import config_from_manifest, pick_device, pick_dtype

    from .modes import MODES

    device = pick_device(settings.device)
    dtype = str(pick_dtype(settings.dtype, device)).removeprefix("torch.")
    mode = MODES[settings.mode]
    p = plan(manifest, config_from_manifest(manifest), settings.artifact, dtype,
             1 if mode.per_request else settings.max_batch_size, settings.max_model_len, settings.kv_cache_gib,
             with_experts=mode.routed)
    check_fits(p, device.type)
    return p
