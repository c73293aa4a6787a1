"""The served model: θ* with routed exclusive deltas (the Twin equation itself is in twin/fusion.py).

One backend (hf.py): transformers' own model class for the artifact's config, with Twin layers injected
and twinserve's slot-cache attention behind transformers' AttentionInterface. A plain-torch Llama-family
model was measured against it at the synthetic width (hidden 1024, 8 layers, 8 experts, batch 16, soft
w): prefill 1252 vs 1267 ms, decode step 93 vs 90 ms, and 605 / 41 ms once the weights are prepacked,
which only this backend does. It was removed.
"""
from twin.model.hf import (
    FlatBatch,
    HFTwinModel,
    SlotCache,
    UnsupportedModelError,
    check_supported,
    supported_model_types,
)

TwinModel = HFTwinModel

__all__ = ["FlatBatch", "HFTwinModel", "SlotCache", "TwinModel", "UnsupportedModelError", "check_supported",
           "supported_model_types"]
