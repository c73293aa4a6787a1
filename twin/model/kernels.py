"""How a linear layer's GEMMs run: oneDNN-prepacked weights on CPU, [W*; A_cat] stacked on GPU.

The Twin equation itself is in twin/fusion.py; these classes only hold W* (and the factors) in the layout
a device multiplies fastest, and implement `twin.fusion.TwinKernel` for it. Every tensor they hold is a
buffer, so ``model.buffers()`` counts them (`twin.model.memory`). Buffers named ``delta_*`` hold
exclusive factors; the others hold θ*.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twin.fusion import LowRankDeltas


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacking: CPU with mkldnn, fp32 (or bf16 where the CPU has native bf16 dot products)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _pack(w: torch.Tensor, batch_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_hint)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is reordered once into oneDNN's blocked layout (CPU).

    The packed tensor is the only copy of W; ``weight`` unpacks it (exactly) for the reference paths.
    Measured at hidden 1024, batch 16, one thread: 2.7x faster than F.linear on the same weight.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", _pack(linear.weight.detach(), batch_hint), persistent=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)


class FusedTwinKernel(nn.Module):
    """A Twin linear whose W* and A_cat live in one weight ``wa`` = [W*; A_cat] (the only copy of both), so
    one GEMM reads x once for the backbone and the shrink:

        [y; h] = [W*; A_cat] x + [b*; 0]
        y     += B_cat (h ⊙ w[:, idx])          (the scale is `ExpertMix.scale`; the expand is ``expand_``)
    """
    idx: torch.Tensor
    offsets: tuple[int, ...]

    def _set_factors(self, linear: nn.Linear, d: LowRankDeltas) -> None:
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("delta_idx", d.idx, persistent=False)
        self.num_experts, self.offsets = d.num_experts, d.offsets

    @property
    def idx(self) -> torch.Tensor:
        return self.delta_idx

    def grouped_factors(self) -> None:
        return None      # the stacked GEMM already reads every factor with W*


class PackedTwinLinear(FusedTwinKernel):
    """[W*; A_cat] and B_cat, each reordered into oneDNN's blocked layout (CPU).

    Measured at hidden 1024, R 128, batch 16, one thread: 208 µs against 258 µs for F.linear plus two
    unpacked thin matmuls (backbone alone: 148 µs). ``weight`` and ``factors()`` unpack exactly.
    """

    def __init__(self, linear: nn.Linear, d: LowRankDeltas, batch_hint: int):
        super().__init__()
        self._set_factors(linear, d)
        w = linear.weight.detach()
        self.register_buffer("wa", _pack(torch.cat([w, d.A_cat.to(w.dtype)]), batch_hint), persistent=False)
        self.register_buffer("delta_B", _pack(d.B_cat.to(w.dtype), batch_hint), persistent=False)
        self.bias = linear.bias
        self.register_buffer("bias_wa", None if linear.bias is None else
                             torch.cat([linear.bias.detach(), linear.bias.new_zeros(d.rank)]), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.wa.to_dense()[: self.out_features]

    def factors(self) -> LowRankDeltas:
        return LowRankDeltas(self.wa.to_dense()[self.out_features:].contiguous(), self.delta_B.to_dense(),
                             self.idx, self.num_experts, self.offsets)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.wa, self.bias_wa)[..., : self.out_features].contiguous()

    def base_and_shrink(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        yh = _packed_linear(x, self.wa, self.bias_wa)
        return yh[..., : self.out_features], yh[..., self.out_features:]

    def expand_(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return y + _packed_linear(h, self.delta_B, None)


class StackedTwinLinear(FusedTwinKernel):
    """[W*; A_cat] in one dense weight (GPU): the PackedTwinLinear layout without oneDNN.

    Three kernels a layer where F.linear plus a separate shrink, scale, expand and add take five: a decode
    step on a GPU is launch-bound. ``weight`` (the first d_out rows of ``wa``) and ``factors()`` are views.
    θ*-only rows multiply by those rows alone. The layer output is a column slice of [y; h] (row stride
    d_out + R), which transformers' projections reshape and slice as they do a contiguous one; the expand
    accumulates into it inside the GEMM (addmm_).
    """

    def __init__(self, linear: nn.Linear, d: LowRankDeltas):
        super().__init__()
        self._set_factors(linear, d)
        w = linear.weight.detach()
        self.register_buffer("wa", torch.cat([w, d.A_cat.to(w.dtype)]).contiguous(), persistent=False)
        self.register_buffer("delta_B", d.B_cat.to(w.dtype).contiguous(), persistent=False)
        self.bias = linear.bias
        self.register_buffer("bias_wa", None if linear.bias is None else
                             torch.cat([linear.bias.detach(), linear.bias.new_zeros(d.rank)]), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.wa[: self.out_features]

    def factors(self) -> LowRankDeltas:
        return LowRankDeltas(self.wa[self.out_features:], self.delta_B, self.idx, self.num_experts, self.offsets)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wa[: self.out_features], self.bias)

    def base_and_shrink(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.out_features
        yh = F.linear(x, self.wa, self.bias_wa)                        # (N, [S,] d_out + R)
        return yh[..., :o], yh[..., o:]

    def expand_(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.delta_B.T)   # view() never copies
        return y
