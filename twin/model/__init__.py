"""The served model: θ* with routed exclusive deltas (the Twin equation itself is in twin/fusion.py).

By concern: support.py (which architectures, UnsupportedModelError), batch.py (the step object
`FlatBatch` and the `SlotCache`), attention.py (the slot-cache kernel), layers.py (Twin layers),
kernels.py (prepacked/stacked GEMM layouts), memory.py (the memory account), hf.py (the model:
transformers' own class for the config with Twin layers injected).

A plain-torch Llama-family model was measured against the transformers backend at the synthetic width
(hidden 1024, 8 layers, 8 experts, batch 16, soft w): prefill 1252 vs 1267 ms, decode step 93 vs 90 ms,
and 605 / 41 ms once the weights are prepacked, which only this backend does. It was removed.
"""
from twin.model.batch import FlatBatch, SlotCache
from twin.model.hf import HFTwinModel
from twin.model.support import UnsupportedModelError, check_supported, supported_model_types

TwinModel = HFTwinModel

__all__ = ["FlatBatch", "HFTwinModel", "SlotCache", "TwinModel", "UnsupportedModelError", "check_supported",
           "supported_model_types"]
