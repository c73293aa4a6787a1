"""Load a base model and its experts as state dicts: HF model dirs (safetensors) or PEFT LoRA adapters."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig

from twin.errors import TwinserveError


class CheckpointError(TwinserveError):
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


# Buffers some checkpoints carry that are not parameters (rotary inv_freq; GPT-2's causal-mask
# attn.bias / attn.masked_bias): never merged or served, so they are not read at all.
_NON_PARAMETER = re.compile(r"(^|\.)(inv_freq|attn\.bias|attn\.masked_bias)$")


class LazyState:
    """Tensors of an HF model dir read one at a time (memory stays at one tensor per expert).
    Non-parameter buffers (``_NON_PARAMETER``) are skipped.

    With the model's ``config`` (or a ``layout``), tensors are named as the model class names its
    parameters, through transformers' weight conversions (compression.names): renamed keys, and MoE experts
    saved one tensor per expert read as the fused parameter. ``pieces`` and the ``raw_*`` methods reach the
    checkpoint tensors themselves.
    """

    def __init__(self, path: str | Path, config: PretrainedConfig | None = None, layout=None):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        for f in _safetensors_files(self.path):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                    if not _NON_PARAMETER.search(k):
                        self._where[k] = f
        if layout is None and config is not None:
            from .names import CheckpointLayout, LayoutError
            try:
                layout = CheckpointLayout(config, list(self._where))
            except LayoutError as e:
                raise CheckpointError(f"{self.path}: {e}") from None
        self.layout = None if layout is None or layout.identity else layout

    def keys(self) -> list[str]:
        return self.layout.keys() if self.layout is not None else list(self._where)

    def _key(self, name: str) -> str:
        return self.layout.simple.get(name, name) if self.layout is not None else name

    def _fused(self, name: str):
        return self.layout.fused.get(name) if self.layout is not None else None

    def pieces(self, name: str) -> list[str] | None:
        """The checkpoint keys a fused parameter is assembled from (None: one tensor of the same name)."""
        f = self._fused(name)
        return f.pieces if f is not None else None

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._fused(name)
        if f is not None:
            return tuple(f.assemble(lambda k: torch.empty(self.raw_shape(k), device="meta")).shape)
        return self.raw_shape(self._key(name))

    def get(self, name: str) -> torch.Tensor:
        f = self._fused(name)
        return f.assemble(self.raw_get) if f is not None else self.raw_get(self._key(name))

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 (dim 0) of tensor ``name``, read from the mmap without the rest of the tensor."""
        f = self._fused(name)
        return f.rows(self.raw_get, lo, hi) if f is not None else self.raw_rows(self._key(name), lo, hi)

    # ---- the checkpoint's own tensors -----------------------------------------------------------------
    def raw_shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self._where[key]), framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def raw_get(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as h:
            return h.get_tensor(key)

    def raw_rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as h:
            sl = h.get_slice(key)
            return sl[lo:hi] if len(sl.get_shape()) else h.get_tensor(key)

    def unchanged(self, name: str) -> bool:
        """Whether this checkpoint's ``name`` is known to equal the base's without reading it (a base: yes)."""
        return False


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All parameter tensors of an HF model dir, keyed by their HF names (e.g. model.layers.0.mlp.up_proj.weight)."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(path):
        state.update({k: v for k, v in load_file(str(f)).items() if not _NON_PARAMETER.search(k)})
    return state


def is_peft_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


_LORA_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
               ".lora_magnitude_vector": "m", ".lora_embedding_A": "EA", ".lora_embedding_B": "EB"}
_TOKENS = ".token_adapter.trainable_tokens_delta"


def _peft_target_name(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A')."""
    for suffix, tag in _LORA_PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)].removeprefix("base_model.model."), tag
    return None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key
    that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_adapter(path: Path) -> dict[str, torch.Tensor]:
    st, binary = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        return load_file(str(st))
    if binary.is_file():
        try:  # tensors only: no code runs at load
            return torch.load(str(binary), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (unpickling errors have no common base class)
            raise CheckpointError(f"{binary}: cannot read as a tensor-only checkpoint: {e}") from None
    raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


def _shape_error(path: Path, key: str, got, name: str, want) -> CheckpointError:
    return CheckpointError(f"{path}: {key} gives {name} shape {tuple(got)}, the base has {tuple(want)} (an adapter "
                           "for another base model, or one that resized the vocabulary)")


class PeftExpert:
    """θ_t of a PEFT LoRA adapter, read exactly as ``PeftModel.merge_and_unload()`` computes it.

    Per adapted weight W_0 (d_out×d_in): ΔW = s·B A with s = α/r (α/√r with rsLoRA), r and α per module
    from rank_pattern / alpha_pattern; the transpose for fan_in_fan_out; DoRA: W = m ⊙ (W_0 + s B A) /
    ‖W_0 + s B A‖_row; lora_bias: b += s·b_B; embedding LoRA: ΔE = s·(B A)ᵀ. modules_to_save tensors
    replace the base's; trainable_token_indices replace rows of the embedding (trainable_tokens_delta).
    Shapes that do not fit the base raise CheckpointError naming the tensor and both shapes.
    Source: peft 0.21 tuners/lora/layer.py (get_delta_weight, merge), tuners/lora/dora.py,
    tuners/trainable_tokens/layer.py.
    """

    def __init__(self, path: str | Path, base: LazyState):
        path = Path(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path}: only LoRA adapters are supported, got peft_type={cfg.get('peft_type')}")
        r0 = int(cfg["r"])
        alpha0 = float(cfg.get("lora_alpha", r0))
        self.rslora = bool(cfg.get("use_rslora"))
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self.scale = alpha0 / (r0 ** 0.5) if self.rslora else alpha0 / r0
        self.base = base
        self.pairs: dict[str, dict[str, torch.Tensor]] = {}     # weight name -> parts (A, B, bias, m, EA, EB)
        self.scales: dict[str, float] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight name -> (row indices, rows)
        self.base_layers: dict[str, torch.Tensor] = {}  # weights the adapter saved for its adapted layers
        base_keys = set(base.keys())
        token_cfg = cfg.get("trainable_token_indices")
        for key, t in _read_adapter(path).items():
            if key.endswith(_TOKENS):
                module = key[: -len(_TOKENS)].removeprefix("base_model.model.")
                idx = token_cfg if isinstance(token_cfg, list) else _pattern_value(token_cfg, module, None)
                if idx is None:
                    raise CheckpointError(f"{path}: {key} has no trainable_token_indices entry in adapter_config.json")
                self.tokens[module + ".weight"] = (torch.tensor(idx, dtype=torch.long), t)
                continue
            if key.endswith(".base_layer.weight"):  # save_embedding_layers: the (possibly resized) base weight
                self.base_layers[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = t
                continue
            target = _peft_target_name(key)
            if target is None:
                if "lora_" in key:
                    raise CheckpointError(f"{path}: unsupported adapter tensor {key}")
                # modules_to_save: full replacement tensors
                self.replaced[key.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "")] = t
                continue
            module, tag = target
            name = module + (".bias" if tag == "bias" else ".weight")
            self.pairs.setdefault(module + ".weight", {})[tag] = t
            if tag == "bias" and name not in base_keys:
                raise CheckpointError(f"{path}: {key} (lora_bias) adapts {name}, which the base model does not have")
        for name, parts in self.pairs.items():
            module = name.removesuffix(".weight")
            if name not in base_keys:
                raise CheckpointError(f"{path}: adapter weight for {name} does not match the base model "
                                      "(no such tensor in the base)")
            if not ({"A", "B"} <= set(parts) or {"EA", "EB"} <= set(parts)):
                raise CheckpointError(f"{path}: adapter weight for {name} has parts {sorted(parts)}, expected "
                                      "lora_A and lora_B")
            if "m" in parts and "EA" in parts:
                raise CheckpointError(f"{path}: DoRA on an embedding ({name}) is not supported")
            a = parts.get("A", parts.get("EA"))
            r = int(a.shape[0])
            want_r = int(_pattern_value(cfg.get("rank_pattern"), module, r0))
            if r != want_r:
                raise CheckpointError(f"{path}: {module} lora_A has rank {r}, adapter_config.json says {want_r}")
            alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha0))
            self.scales[name] = alpha / (r ** 0.5) if self.rslora else alpha / r
            got = self._lora_shape(parts)
            want = base.shape(name)
            if tuple(got) != tuple(want):
                raise _shape_error(path, f"base_model.model.{module}.lora_A/B", got, name, want)
        for kind, tensors in (("modules_to_save", self.replaced), ("saved base layer", self.base_layers)):
            for name, t in tensors.items():
                # a head saved over a tied base has no base tensor of its own (the build unties it)
                if name in base_keys and tuple(t.shape) != base.shape(name):
                    raise _shape_error(path, f"{kind} {name}", t.shape, name, base.shape(name))
        for name, (idx, rows) in self.tokens.items():
            if name not in base_keys:
                raise CheckpointError(f"{path}: trainable tokens for {name}, which the base model does not have")
            vocab, hidden = base.shape(name)
            if rows.shape != (len(idx), hidden) or (len(idx) and int(idx.max()) >= vocab):
                raise _shape_error(path, f"trainable_tokens_delta (token ids up to {int(idx.max())})",
                                   rows.shape, name, (vocab, hidden))

    def _lora_shape(self, parts: dict[str, torch.Tensor]) -> tuple[int, int]:
        """The shape of B A in the base weight's layout, from the factors' shapes (nothing multiplied)."""
        if "EA" in parts:
            return parts["EA"].shape[1], parts["EB"].shape[0]
        shape = (parts["B"].shape[0], parts["A"].shape[1])
        return shape[::-1] if self.fan_in_fan_out else shape

    def _lora_product(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """B A in the base weight's layout (unscaled)."""
        if "EA" in parts:  # embedding LoRA: A (r, V), B (H, r); the weight is (V, H)
            return (parts["EB"].float() @ parts["EA"].float()).T
        ba = parts["B"].float() @ parts["A"].float()
        return ba.T if self.fan_in_fan_out else ba

    def delta(self, name: str) -> torch.Tensor | None:
        """θ_t − θ_0 for tensor ``name`` in fp32, or None where the adapter leaves it unchanged."""
        if name.endswith(".bias"):
            parts = self.pairs.get(name.removesuffix(".bias") + ".weight")
            if parts is None or "bias" not in parts:
                return None
            return parts["bias"].float() * self.scales[name.removesuffix(".bias") + ".weight"]
        parts = self.pairs.get(name)
        if parts is None:
            return None
        d = self._lora_product(parts) * self.scales[name]
        if "m" in parts:  # DoRA: rescale each output row of W_0 + ΔW to the learned magnitude
            w0 = self._w0(name).float()
            w = w0 + d
            norm = torch.linalg.norm(w.T if self.fan_in_fan_out else w, dim=1)
            factor = (parts["m"].float() / norm).view(-1, 1)
            d = (factor.T if self.fan_in_fan_out else factor) * w - w0
        return d

    def _w0(self, name: str) -> torch.Tensor:
        """The weight the adapter applies to: its own saved copy of the layer where it has one (PEFT loads
        that over the base), else the base's."""
        return self.base_layers[name] if name in self.base_layers else self.base.get(name)

    def unchanged(self, name: str) -> bool:
        """The adapter leaves ``name`` as the base has it (no LoRA pair, bias, token rows or replacement)."""
        return (name not in self.replaced and name not in self.tokens and name not in self.base_layers
                and self.delta(name) is None)

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 of θ_t[name]: a plain LoRA pair costs s·B[lo:hi] A on the base rows, not a dense ΔW."""
        parts = self.pairs.get(name)
        if self.unchanged(name):
            return self.base.rows(name, lo, hi)
        if (parts is None or name in self.replaced or name in self.tokens or name in self.base_layers
                or "m" in parts or "A" not in parts or self.fan_in_fan_out):
            return self.get(name)[lo:hi]
        w0 = self.base.rows(name, lo, hi)
        d = (parts["B"][lo:hi].float() @ parts["A"].float()) * self.scales[name]
        return (w0.float() + d).to(w0.dtype)

    def get(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name]
        w0 = self._w0(name)
        if name in self.tokens:
            idx, rows = self.tokens[name]
            w0 = w0.clone()
            w0[idx] = rows.to(w0.dtype)
        d = self.delta(name)
        return w0 if d is None else (w0.float() + d).to(w0.dtype)


class FullExpert(LazyState):
    """A fully fine-tuned expert; its tensors must match the base's names and shapes."""

    def __init__(self, path: str | Path, base: LazyState):
        super().__init__(path, layout=base.layout)
        missing = sorted(set(base.keys()) - set(self.keys()))
        if missing:
            raise CheckpointError(f"{path}: tensors missing compared with the base model: {', '.join(missing[:5])}")
        for name in base.keys():  # noqa: SIM118 (LazyState is not a dict)
            if self.shape(name) != base.shape(name):
                raise CheckpointError(f"{path}: {name} has shape {self.shape(name)}, base has {base.shape(name)}")


def open_expert(path: str | Path, base: LazyState) -> PeftExpert | FullExpert:
    """An expert stored as a full fine-tune or as a LoRA adapter, read tensor by tensor."""
    if not Path(path).is_dir():
        raise CheckpointError(f"expert not found: {path} is not a directory")
    return PeftExpert(path, base) if is_peft_adapter(path) else FullExpert(path, base)
