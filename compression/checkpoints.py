"""Load a base model and its experts as state dicts: HF model dirs (safetensors) or PEFT LoRA adapters."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig


class CheckpointError(ValueError):
    """A model or adapter directory that cannot be used; the message names the path."""


def load_config(path: str | Path) -> PretrainedConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if (path / "pytorch_model.bin").exists():
        raise CheckpointError(f"{path}: only pickle weights (pytorch_model.bin) found; "
                              "convert to safetensors (model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


class LazyState:
    """Tensors of an HF model dir read one at a time (memory stays at one tensor per expert)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        for f in _safetensors_files(self.path):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self._where[name]), framework="pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), framework="pt") as h:
            return h.get_tensor(name)


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model dir, keyed by their HF names (e.g. model.layers.0.mlp.up_proj.weight)."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(path):
        state.update(load_file(str(f)))
    return state


def is_peft_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


_LORA_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B",
               ".lora_embedding_A": "EA", ".lora_embedding_B": "EB"}
_UNSUPPORTED_PEFT = ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern")


def _peft_target_name(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj.weight', 'A')."""
    for suffix, tag in _LORA_PARTS.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)].removeprefix("base_model.model.")
            return module + ".weight", tag
    return None


class PeftExpert:
    """θ_t = θ_0 + (α/r)·B A for every LoRA-adapted weight (α/√r with rsLoRA); other tensors from the base."""

    def __init__(self, path: str | Path, base: LazyState):
        path = Path(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path}: only LoRA adapters are supported, got peft_type={cfg.get('peft_type')}")
        used = [k for k in _UNSUPPORTED_PEFT if cfg.get(k)]
        if used:
            raise CheckpointError(f"{path}: adapter_config.json uses {', '.join(used)}, which twinserve cannot "
                                  "merge yet; merge the adapter with peft (merge_and_unload) and pass the full model")
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{path}: no adapter_model.safetensors")
        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
        self.scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        self.base = base
        self.pairs: dict[str, dict[str, torch.Tensor]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        base_keys = set(base.keys())
        for key, t in load_file(str(weights)).items():
            target = _peft_target_name(key)
            if target is None:
                if "lora_" in key:
                    raise CheckpointError(f"{path}: unsupported adapter tensor {key}")
                # modules_to_save: full replacement tensors
                self.replaced[key.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "")] = t
                continue
            self.pairs.setdefault(target[0], {})[target[1]] = t
        for name, ab in self.pairs.items():
            if name not in base_keys or set(ab) not in ({"A", "B"}, {"EA", "EB"}):
                raise CheckpointError(f"{path}: adapter weight for {name} does not match the base model")

    def delta(self, name: str) -> torch.Tensor | None:
        ab = self.pairs.get(name)
        if ab is None:
            return None
        if "EA" in ab:  # embedding LoRA: A (r, V), B (H, r); the weight is (V, H)
            return (ab["EB"].float() @ ab["EA"].float()).T * self.scale
        return (ab["B"].float() @ ab["A"].float()) * self.scale

    def get(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name]
        w0 = self.base.get(name)
        d = self.delta(name)
        return w0 if d is None else (w0.float() + d).to(w0.dtype)


class FullExpert(LazyState):
    """A fully fine-tuned expert; its tensors must match the base's names and shapes."""

    def __init__(self, path: str | Path, base: LazyState):
        super().__init__(path)
        missing = sorted(set(base.keys()) - set(self.keys()))
        if missing:
            raise CheckpointError(f"{path}: tensors missing compared with the base model: {', '.join(missing[:5])}")
        for name in base.keys():
            if self.shape(name) != base.shape(name):
                raise CheckpointError(f"{path}: {name} has shape {self.shape(name)}, base has {base.shape(name)}")


def open_expert(path: str | Path, base: LazyState) -> PeftExpert | FullExpert:
    """An expert stored as a full fine-tune or as a LoRA adapter, read tensor by tensor."""
    if not Path(path).is_dir():
        raise CheckpointError(f"expert not found: {path} is not a directory")
    return PeftExpert(path, base) if is_peft_adapter(path) else FullExpert(path, base)
