"""The served model: θ* with routed exclusive deltas (see twin/fusion.py for the Twin equation)."""
from twin.model.native import SUPPORTED_MODEL_TYPES, KVCache, TwinModel, UnsupportedModelError

__all__ = ["KVCache", "SUPPORTED_MODEL_TYPES", "TwinModel", "UnsupportedModelError"]
