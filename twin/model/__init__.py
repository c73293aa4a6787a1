"""The served model: θ* with routed exclusive deltas (the Twin equation itself is in twin/fusion.py).

Two backends behind one interface (``model(tokens, positions, cache, slots, w, logits_at, num_layers)``,
``new_cache``, ``attach_deltas``, ``fused``, ``backbone_state``, ``device``, ``dtype``, ``args``):
  - ``transformers`` (default, hf.py): transformers' own model class with Twin layers injected; any
    decoder-only architecture transformers implements with its attention-backend hooks;
  - ``native`` (native.py): a plain-torch Llama/Mistral/Qwen2 without sliding windows.
"""
from twin.model.hf import (
           HFTwinModel,
           SlotCache,
           UnsupportedModelError,
           check_supported,
           supported_model_types,
)
from twin.model.native import NativeTwinModel

BACKENDS = {"transformers": HFTwinModel, "native": NativeTwinModel}
TwinModel = HFTwinModel

__all__ = ["BACKENDS", "HFTwinModel", "NativeTwinModel", "SlotCache", "TwinModel", "UnsupportedModelError",
           "check_supported", "supported_model_types"]
