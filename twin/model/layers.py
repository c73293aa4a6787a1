"""Twin layers: transformers' own modules wrapped in place (as PEFT injects LoRA layers), each calling one
op of the step's `ExpertMix` and owning its dense merge (``delta_weight``, PEFT's ``get_delta_weight``):

    TwinLinear:    y = base(x) + B_cat((A_cat x) ⊙ w[:, idx]) + w @ Δb       (nn.Linear, GPT-2 Conv1D)
    TwinEmbedding: e = base(tok) + s · (B_cat[tok] ⊙ w[:, idx]) @ A_cat       (s: the class's embed scale)
    TwinNorm:      the norm's own forward with a per-row gain g* + w @ Δg     (RMSNorm, Gemma's 1+g, LayerNorm)

Deltas are buffers named ``delta_*`` (see twin/model/memory.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from twin.fusion import LowRankDeltas, dense_delta, merged_delta
from twin.model.batch import StepContext
from twin.model.kernels import FusedTwinKernel, PackedLinear


class TwinLayer(nn.Module):
    """A module wrapped with routed deltas: ``base_layer`` is the wrapped module (so its parameters keep their
    names under ``….base_layer``), ``ctx`` the model's step context, ``deltas``/``bias_deltas`` the exclusive
    deltas of its weight and bias."""

    def __init__(self, base: nn.Module, ctx: StepContext):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        self._deltas: LowRankDeltas | torch.Tensor | None = None
        self._bias_deltas: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def deltas(self) -> LowRankDeltas | torch.Tensor | None:
        return self._deltas

    @deltas.setter
    def deltas(self, d: LowRankDeltas | torch.Tensor | None) -> None:
        self._deltas = d
        for name in ("delta_A", "delta_B", "delta_idx", "delta_dense"):
            self._buffers.pop(name, None)
        if isinstance(d, LowRankDeltas):
            self.register_buffer("delta_A", d.A_cat, persistent=False)
            self.register_buffer("delta_B", d.B_cat, persistent=False)
            self.register_buffer("delta_idx", d.idx, persistent=False)
        elif d is not None:
            self.register_buffer("delta_dense", d, persistent=False)

    @property
    def bias_deltas(self) -> torch.Tensor | None:
        return self._bias_deltas

    @bias_deltas.setter
    def bias_deltas(self, d: torch.Tensor | None) -> None:
        self._bias_deltas = d
        self._buffers.pop("delta_bias", None)
        if d is not None:
            self.register_buffer("delta_bias", d, persistent=False)

    def delta_weight(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_t w_t δ_t of this layer's tensors for one weight vector w (T,): attribute -> delta (the dense merge)."""
        out = {}
        if isinstance(self.deltas, torch.Tensor):
            out["weight"] = dense_delta(self.deltas, w)
        if self.bias_deltas is not None:
            out["bias"] = dense_delta(self.bias_deltas, w)
        return out


class TwinLinear(TwinLayer):
    """A linear layer (nn.Linear, or GPT-2's Conv1D with its (d_in, d_out) weight) plus routed deltas.

    With a plain base layer it is its own `TwinKernel` (``F.linear`` then the thin shrink and expand); after
    ``prepack``/``stack_shrink`` the base layer is a fused kernel holding [W*; A_cat] and B_cat.
    """

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def kernel(self):
        return self.base_layer if isinstance(self.base_layer, FusedTwinKernel) else self

    def factors(self) -> LowRankDeltas | None:
        """B_cat, A_cat of this layer in nn.Linear orientation (unpacked when a fused kernel holds them)."""
        k = self.kernel
        return self.deltas if k is self else k.factors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.ctx.mix
        return self.kernel.backbone(x) if mix is None else mix.linear(x, self.kernel, self.bias_deltas)

    def delta_weight(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        d = self.factors()
        if d is not None and d.rank:
            delta = merged_delta(d, w)
            out["weight"] = delta.T if isinstance(self.base_layer, Conv1D) else delta
        if self.bias_deltas is not None:
            out["bias"] = dense_delta(self.bias_deltas, w)
        return out

    # ---- TwinKernel for a plain base layer ---------------------------------------------------------------
    @property
    def idx(self) -> torch.Tensor:
        return self.deltas.idx

    @property
    def offsets(self) -> tuple[int, ...]:
        return self.deltas.offsets

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def base_and_shrink(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = self.deltas
        y = self.base_layer(x)
        return (y, None) if d is None or not d.rank else (y, x @ d.A_cat.T)

    def expand_(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """In place into the fresh layer output (addmm_ with β = 1): one kernel fewer than a matmul and an add."""
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.deltas.B_cat.T)
        return y

    def grouped_factors(self) -> LowRankDeltas | None:
        d = self.deltas
        return d if d is not None and d.rank else None


class TwinEmbedding(TwinLayer):
    """An embedding (or a scaled one, as Gemma 3's) plus routed low-rank deltas of its table."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.base_layer(tokens)                      # (N, S, H)
        mix = self.ctx.mix
        if mix is None or self.deltas is None or not self.deltas.rank:
            return e
        d = mix.embedding(tokens, self.deltas)
        scale = getattr(self.base_layer, "embed_scale", None)
        return e + (d * scale.to(d.dtype) if scale is not None else d)

    def delta_weight(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.deltas
        return {"weight": merged_delta(d, w)} if d is not None and d.rank else {}


class TwinNorm(TwinLayer):
    """A norm whose gain (and bias) carry routed dense 1-D deltas: each row gets g* + w @ Δg.

    RMSNorm-style classes use their weight elementwise (g·x̂, or Gemma's (1+g)·x̂), so their own forward
    runs with the per-row gain (N, 1, …, H) in place of g; nn.LayerNorm normalises first, then applies
    the per-row gain and bias.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.ctx.mix
        base = self.base_layer
        if mix is None or (self.deltas is None and self.bias_deltas is None):
            return base(x)
        if isinstance(base, nn.LayerNorm):
            y = F.layer_norm(x, base.normalized_shape, None, None, base.eps)
            y = y * mix.gain(base.weight, self.deltas, x.ndim)
            return y + mix.gain(base.bias, self.bias_deltas, x.ndim) if base.bias is not None else y
        saved = base._parameters["weight"]
        base._parameters["weight"] = mix.gain(saved, self.deltas, x.ndim)
        try:
            return base(x)
        finally:
            base._parameters["weight"] = saved


def delta_refusal(model: nn.Module, param: str) -> str | None:
    """Why tensor ``param`` of ``model`` (a transformers model, possibly on the meta device) cannot carry a routed
    exclusive delta, or None when a Twin layer serves it: a linear's weight and bias (nn.Linear, GPT-2's
    Conv1D), an embedding table (plain, or scaled as Gemma 3's), a norm's gain and bias."""
    path, _, attr = param.rpartition(".")
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return "not a parameter of the model"
    if isinstance(mod, TwinLayer):
        mod = mod.base_layer
    kind = type(mod).__name__
    if isinstance(mod, nn.Linear) and type(mod).forward is not nn.Linear.forward:
        return f"{kind} is an nn.Linear with a forward of its own (an MoE router's), which a Twin layer does not wrap"
    if isinstance(mod, (nn.Linear, Conv1D, PackedLinear)):
        return None if attr in ("weight", "bias") else f"{attr} of a {kind} has no Twin layer"
    if isinstance(mod, nn.Embedding):
        if type(mod) is not nn.Embedding and not hasattr(mod, "embed_scale"):
            return f"embedding class {kind} is not supported for exclusive deltas"
        return None if attr == "weight" else f"{attr} of an embedding has no Twin layer"
    if isinstance(mod, nn.LayerNorm) or is_rms_norm(mod):
        return None if attr in ("weight", "bias") else f"{attr} of a {kind} has no Twin layer"
    return f"exclusive deltas on a {kind} are not supported"


def is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)


def twin_layer_for(mod: nn.Module, ctx: StepContext) -> TwinLayer:
    """The Twin layer class that wraps ``mod`` (one `delta_refusal` has accepted)."""
    if isinstance(mod, (nn.Linear, Conv1D, PackedLinear)):
        return TwinLinear(mod, ctx)
    if isinstance(mod, nn.Embedding):
        return TwinEmbedding(mod, ctx)
    return TwinNorm(mod, ctx)
