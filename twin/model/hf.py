"""The transformers backend: transformers' own model class for the artifact's config, with Twin layers
injected (twin/model/layers.py) and twinserve's slot-cache attention behind transformers'
AttentionInterface (twin/model/attention.py).

Serves any decoder-only causal LM that transformers implements with its attention-backend hooks (Llama,
Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2, GPT-2, MoE and MLA families, ...; twin/model/support.py).
One forward layout: `step` runs a `FlatBatch` (decode tokens and prefill chunks as one flat token list,
each token with its row's expert mix), and everything that runs the model — the engine, the parity
gate, eval, generation, the router's pass — builds one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from twin.fusion import LowRankDeltas
from twin.model.attention import ATTN_IMPLEMENTATION
from twin.model.batch import FlatBatch, SlotCache, StepContext
from twin.model.kernels import FusedTwinKernel, PackedLinear, PackedTwinLinear, StackedTwinLinear, can_prepack
from twin.model.layers import TwinEmbedding, TwinLayer, TwinLinear, delta_refusal, twin_layer_for
from twin.model.memory import module_memory
from twin.model.support import NON_PARAMETER_SUFFIXES, UnsupportedModelError, causal_lm_class


class _StopForward(Exception):
    pass


@dataclass
class ModelArgs:
    num_layers: int
    hidden_size: int
    vocab_size: int


class HFTwinModel(nn.Module):
    """θ* in transformers' own model class, plus routed exclusive deltas. Parameter names are the HF names."""

    def __init__(self, config: PretrainedConfig, state: dict[str, torch.Tensor]):
        super().__init__()
        cls = causal_lm_class(config)
        config = copy.deepcopy(config)
        config._attn_implementation = ATTN_IMPLEMENTATION
        self.config = config
        any_t = next(iter(state.values()))
        from transformers.initialization import no_init_weights
        with no_init_weights(), torch.device(any_t.device):
            hf = cls._from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=any_t.dtype)
        hf.tie_weights()  # no_init_weights skips init_weights, which is where transformers ties the head
        self.hf = hf.eval().requires_grad_(False)   # inference only: no autograd graph, even outside inference_mode
        self._load_state(state)
        self.ctx = StepContext()
        for m in hf.modules():
            if hasattr(m, "layer_idx") and "Attention" in type(m).__name__:
                m._twin_ctx = self.ctx
        # the decoder stack (transformers' base model; Llama 4's text class keeps it under .model)
        self.base = hf.base_model if hf.base_model is not hf else hf.model
        self.layers = next((m for m in self.base.children()
                            if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers), None)
        self.args = ModelArgs(config.num_hidden_layers, config.hidden_size, config.vocab_size)
        # RoBERTa-style embeddings count positions from padding_idx + 1 (transformers derives them from the ids)
        emb = getattr(self.base, "embeddings", None)
        self.position_offset = (emb.padding_idx + 1 if hasattr(emb, "create_position_ids_from_input_ids")
                                and getattr(emb, "padding_idx", None) is not None else 0)
        # what runs between the decoder's last hidden state and the logits: the lm_head, or the class's head
        # modules in order (BERT's transform + decoder, ModernBERT's prediction head + decoder)
        # the class's children after the decoder, up to the one holding the output embedding (a child after it,
        # such as an assistant model's projections, is not on the path to the logits)
        out_emb = hf.get_output_embeddings()
        self._head_names = []
        for n, m in hf.named_children():
            if m is self.base:
                continue
            self._head_names.append(n)
            if out_emb is None or any(x is out_emb for x in m.modules()):
                break
        self.num_experts = 0
        self.expert_names: list[str] = []
        self._packed: dict[str, nn.Module] = {}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        hf = self.hf
        params = dict(hf.named_parameters(remove_duplicate=False))
        buffers = {n for n, _ in hf.named_buffers()}
        emb = hf.get_input_embeddings()
        head = hf.get_output_embeddings()
        self.tied = head is not None and head.weight is emb.weight
        self._embedding_name = next(n for n, p in params.items() if p is emb.weight)
        load = {}
        for name, t in state.items():
            if name in params:
                if tuple(t.shape) != tuple(params[name].shape):
                    raise UnsupportedModelError(f"tensor {name} has shape {tuple(t.shape)} but the config's "
                                                f"{type(hf).__name__} expects {tuple(params[name].shape)}")
                load[name] = t
            elif not (name in buffers or name.endswith(NON_PARAMETER_SUFFIXES)):
                raise UnsupportedModelError(f"tensor {name} is not a parameter of {type(hf).__name__} "
                                            f"for this config")
        loaded = {id(params[n]) for n in load}
        missing = [n for n in params if n not in load and id(params[n]) not in loaded]
        if missing:
            raise UnsupportedModelError(f"checkpoint has no tensor {missing[0]} ({len(missing)} missing)")
        hf.load_state_dict(load, strict=False, assign=True)
        # assign=True replaced each loaded Parameter: tie every name that shared one (a tied head's weight,
        # RoBERTa's decoder bias) to the loaded tensor again
        shared: dict[int, list[str]] = {}
        for n, p in params.items():
            shared.setdefault(id(p), []).append(n)
        for names in shared.values():
            src = next((n for n in names if n in load), None)
            for n in names if src is not None and len(names) > 1 else ():
                path, _, attr = n.rpartition(".")
                setattr(hf.get_submodule(path), attr, hf.get_parameter(src))
        self._state = {n: params_now for n, params_now in hf.state_dict(keep_vars=True).items() if n in load}

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    # ---- deltas -------------------------------------------------------------------------------------
    def _wrap(self, param: str) -> TwinLayer:
        """The Twin layer for ``param`` (an HF name such as model.layers.0.mlp.up_proj.weight), created once."""
        path, _ = param.rsplit(".", 1)
        mod = self.hf.get_submodule(path)
        if isinstance(mod, TwinLayer):
            return mod
        why = delta_refusal(self.hf, param)
        if why is not None:
            raise UnsupportedModelError(f"{param}: {why}")
        twin = twin_layer_for(mod, self.ctx)
        parent, _, child = path.rpartition(".")
        setattr(self.hf.get_submodule(parent) if parent else self.hf, child, twin)
        return twin

    def attach_deltas(self, expert_names: list[str], lowrank: dict[str, LowRankDeltas],
                      dense: dict[str, torch.Tensor]) -> None:
        """lowrank: param -> factors of its 2-D deltas; dense: param -> (T, *shape) 1-D deltas (gains, biases)."""
        self.expert_names = list(expert_names)
        self.num_experts = len(expert_names)
        for param, d in lowrank.items():
            twin = self._wrap(param)
            # GPT-2's Conv1D stores δ as (d_in, d_out) = B A: the layer holds it as Aᵀ Bᵀ, nn.Linear's orientation
            twin.deltas = d.transposed() if isinstance(twin.base_layer, Conv1D) else d
        head = self.hf.get_output_embeddings()
        if self.tied and self._embedding_name in lowrank and not isinstance(head, TwinLinear):
            twin = TwinLinear(head, self.ctx)   # the tied head is the embedding table: same δ_t factors
            twin.deltas = lowrank[self._embedding_name]
            self.hf.set_output_embeddings(twin)
        for param, d in dense.items():
            twin = self._wrap(param)
            if isinstance(twin, TwinEmbedding):
                raise UnsupportedModelError(f"{param}: a dense delta on an embedding is not supported")
            if param.endswith(".bias"):
                twin.bias_deltas = d
            else:
                twin.deltas = d

    # ---- the step -----------------------------------------------------------------------------------
    def step(self, flat: FlatBatch, cache: SlotCache) -> torch.Tensor:
        """One step: the M tokens of ``flat`` (decode tokens and prefill chunks, each with its expert mix) in one
        forward. Returns logits (R, V) at ``flat.logits_at`` only (every decode token, then per chunk its last
        token or every position, as the batch was built)."""
        ctx = self.ctx
        mix = None if flat.mix is None else flat.mix.to(self.dtype)
        ctx.mix, ctx.cache, ctx.flat, ctx.calls = mix, cache, flat, {}
        try:
            h = self.base(input_ids=flat.tokens[:, None], position_ids=self._position_ids(flat),
                          use_cache=False).last_hidden_state                      # (M, 1, H)
            at = flat.logits_at
            rows = h[at]                                                           # (R, 1, H)
            if mix is not None and at.shape[0] != flat.num_tokens:
                ctx.mix = mix.rows(at)
            return self._head(rows)[:, 0]
        finally:
            ctx.mix = ctx.cache = ctx.flat = None

    def _position_ids(self, flat: FlatBatch) -> torch.Tensor:
        return (flat.positions + self.position_offset if self.position_offset else flat.positions)[:, None]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head (or the class's head modules) plus the logit post-processing transformers' CausalLM classes
        apply."""
        logits = h
        for name in self._head_names:      # looked up each time: Twin layers and prepacking replace modules
            logits = getattr(self.hf, name)(logits)
        cfg = self.config
        if getattr(cfg, "logit_scale", None) is not None:            # Cohere
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None) is not None:         # Granite
            logits = logits / cfg.logits_scaling
        if getattr(cfg, "final_logit_softcapping", None) is not None:  # Gemma 2/3
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits

    @torch.inference_mode()
    def hidden_states_flat(self, flat: FlatBatch, cache: SlotCache, num_layers: int) -> torch.Tensor:
        """θ*'s hidden states after ``num_layers`` decoder blocks for the tokens of ``flat``: (M, H).

        The router's truncated pass: prompts as prefill chunks of one flat batch, no experts.
        """
        if self.layers is None:
            raise UnsupportedModelError(f"{type(self.hf).__name__}: cannot find its decoder blocks for a truncated pass")
        ctx = self.ctx
        ctx.mix, ctx.cache, ctx.flat, ctx.calls = None, cache, flat, {}
        captured = {}

        def hook(_module, _args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = self.layers[num_layers - 1].register_forward_hook(hook)
        try:
            self.base(input_ids=flat.tokens[:, None], position_ids=self._position_ids(flat), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
            ctx.cache = ctx.flat = None
        return captured["h"][:, 0]

    def new_cache(self, slots: int, max_seq: int, layers: int | None = None) -> SlotCache:
        """``layers`` < num_layers makes a cache for a truncated pass (router features)."""
        return SlotCache(layers or self.args.num_layers, slots, max_seq, self.device, self.dtype)

    # ---- kernels ------------------------------------------------------------------------------------
    def prepack(self, batch_hint: int = 16) -> int:
        """Reorder every untied nn.Linear weight into oneDNN's layout (CPU; see PackedLinear). Returns the count.

        Call after ``attach_deltas``: Twin layers keep their wrapper and pack their base layer.
        """
        if not can_prepack(self.device, self.dtype):
            return 0
        # Twin layers: backbone + shrink in one GEMM
        count = self._stack_twin_layers(lambda linear, d: PackedTwinLinear(linear, d, batch_hint))
        head = self._head_linear()
        for name, mod in list(self.hf.named_modules()):
            if type(mod) is not nn.Linear or (self.tied and mod is head):
                continue
            packed = PackedLinear(mod, batch_hint)
            parent, _, child = name.rpartition(".")
            setattr(self.hf.get_submodule(parent) if parent else self.hf, child, packed)
            key = name.replace(".base_layer", "") + ".weight"
            self._packed[key] = packed
            self._state[key] = torch.empty(0)      # drop the dense copy: the packed tensor is the only one
            count += 1
        return count

    def stack_shrink(self) -> int:
        """Stack each Twin linear's W* and A_cat into one dense weight (``StackedTwinLinear``; for GPUs, where
        oneDNN prepacking does not apply). Call after ``attach_deltas``. Returns the count."""
        return self._stack_twin_layers(StackedTwinLinear)

    def _head_linear(self) -> nn.Module:
        head = self.hf.get_output_embeddings()
        return head.base_layer if isinstance(head, TwinLinear) else head

    def _stack_twin_layers(self, make) -> int:
        """Replace the nn.Linear base of every Twin linear with factors (not a tied head, which is the
        embedding table) by ``make(linear, deltas)``, a kernel holding [W*; A_cat] as the only copy of W*."""
        head = self._head_linear()
        count = 0
        for name, twin in list(self.hf.named_modules()):
            if (isinstance(twin, TwinLinear) and type(twin.base_layer) is nn.Linear and twin.deltas is not None
                    and twin.deltas.rank and not (self.tied and twin.base_layer is head)):
                twin.base_layer = make(twin.base_layer, twin.deltas)
                twin.deltas = None
                self._packed[name + ".weight"] = twin.base_layer
                self._state[name + ".weight"] = torch.empty(0)   # the stacked weight holds W*
                count += 1
        return count

    # ---- accounting ---------------------------------------------------------------------------------
    def memory_report(self, seen: set | None = None) -> dict[str, int]:
        """Bytes held by kind ({"weights", "deltas"}), each storage once (see twin/model/memory.py)."""
        return module_memory(self, seen)

    def linear_macs(self) -> dict[str, int]:
        """Multiply-accumulates per token: ``backbone`` = Σ d_out·d_in over θ*'s linear layers (lm_head
        included), ``factors`` = Σ R·(d_in + d_out) over the exclusive factors of all T experts (an embedding's:
        R·H). Soft routing over every expert adds ``factors`` to each token's work; the bench's cost bounds
        use the ratio. From the shapes alone (nothing is unpacked)."""
        backbone = factors = 0
        for mod in self.hf.modules():
            if isinstance(mod, (nn.Linear, PackedLinear, FusedTwinKernel)):
                backbone += mod.in_features * mod.out_features
            elif isinstance(mod, Conv1D):
                backbone += mod.weight.shape[0] * mod.weight.shape[1]
            elif isinstance(mod, TwinLinear):
                d = mod.kernel
                rank = d.idx.shape[0] if d is not mod else (mod.deltas.rank if mod.deltas is not None else 0)
                factors += rank * sum(mod.weight.shape) if d is mod else rank * (d.in_features + d.out_features)
            elif isinstance(mod, TwinEmbedding) and mod.deltas is not None:
                factors += mod.deltas.rank * mod.deltas.A_cat.shape[1]
        return {"backbone": backbone, "factors": factors}

    # ---- reference path -----------------------------------------------------------------------------
    def backbone_state(self) -> dict[str, torch.Tensor]:
        """θ* under HF names, as loaded (a tied head is left out, as in tied checkpoints)."""
        return {n: (self._packed[n].weight if n in self._packed else t.detach()) for n, t in self._state.items()}

    def twin_layers(self) -> dict[str, TwinLayer]:
        """HF parameter path of each wrapped module -> its Twin layer."""
        return {name.replace(".base_layer", ""): mod for name, mod in self.hf.named_modules()
                if isinstance(mod, TwinLayer)}

    def fused(self, w: torch.Tensor) -> HFTwinModel:
        """Reference path: a new dense model with θ* + Σ_t w_t δ̂_t materialised (w: (T,)), each Twin layer
        giving its own dense delta; a tied head is the fused embedding table of the new model."""
        w = w.to(device=self.device, dtype=self.dtype)
        state = self.backbone_state()
        for path, twin in self.twin_layers().items():
            for attr, delta in twin.delta_weight(w).items():
                key = f"{path}.{attr}"
                if key in state:
                    state[key] = state[key] + delta
        return HFTwinModel(self.config, state).eval()
