"""A mergekit YAML (mergekit 0.1.5 ``MergeConfiguration``) -> a twinserve recipe's fields (compression.recipe
validates them: ``load_recipe`` reads either kind of file).

``twinserve build mergekit.yaml -o DIR`` then writes the backbone θ* mergekit would write (see
compression/merging/) and each expert's exclusive δ_t = θ_t − θ* against it. Supported: the
``models:`` form with every merge_method of the registry that mergekit has (linear, task_arithmetic,
ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties); ``base_model``; ``models[].model`` (a path, or ``base+adapter``
for a PEFT adapter of the base) with ``parameters.weight`` / ``density``; top-level ``parameters``
(weight, density, lambda, normalize, rescale, int8_mask, gamma); ``dtype`` / ``out_dtype``;
``tokenizer_source`` base or a path. Anything else is refused with the key or method named.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import RecipeError
from .merging import MERGE_METHODS

METHODS = {name for name, m in MERGE_METHODS.items() if m.mergekit}
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
# mergekit parameter -> MergeSpec field (shared scope); weight and density may also be per model.
SHARED = {"lambda": "lambda", "normalize": "normalize", "rescale": "rescale", "int8_mask": "int8_mask",
          "gamma": "gamma", "density": "density"}
PER_MODEL = {"weight", "density"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _scalar(value, where: str):
    if isinstance(value, (list, dict)):
        raise RecipeError(f"{where}: per-layer gradients and filters are not supported; give one number")
    return value


def _expert_name(model: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "-", Path(model.rstrip("/")).name).lstrip("-_.")[:60] or "expert"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}-{i}", i + 1
    taken.add(name)
    return name


def recipe_data_from_mergekit(data: dict, path: str | Path) -> dict:
    """A recipe's fields (the dict `Recipe` validates) equivalent to a parsed mergekit config read from ``path``
    (relative model paths resolve against its folder when the recipe is resolved). Raises RecipeError naming the
    offending key, method or model."""
    path = Path(path)
    where = f"mergekit config {path}"
    extra = sorted(set(data) - TOP_KEYS)
    if extra:
        raise RecipeError(f"{where}: {extra[0]}: not supported by twinserve (supported keys: "
                          f"{', '.join(sorted(TOP_KEYS))})")
    method = data["merge_method"]
    if method not in METHODS:
        raise RecipeError(f"{where}: merge_method: {method!r} is not supported by twinserve "
                          f"(supported: {', '.join(sorted(METHODS))})")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{where}: models: a non-empty list is required")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise RecipeError(f"{where}: base_model: expected a path")
    if base is None and method != "linear":
        raise RecipeError(f"{where}: base_model: required by {method}")

    params = data.get("parameters") or {}
    # mergekit's default density is 1 (no sparsification); its trims break ties by its own argsort
    merge: dict = {"method": method, "density": 1.0, "tie_break": "argsort"}
    shared_weight = None
    for key, value in params.items():
        value = _scalar(value, f"{where}: parameters.{key}")
        if key == "weight":
            shared_weight = value
        elif key in SHARED:
            merge[SHARED[key]] = value
        else:
            raise RecipeError(f"{where}: parameters.{key}: not a parameter of {method} that twinserve supports")

    experts, taken = [], set()
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise RecipeError(f"{where}: models.{i}.model: expected a model path")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise RecipeError(f"{where}: models.{i}.{unknown[0]}: not supported")
        model = entry["model"]
        mparams = entry.get("parameters") or {}
        for key in mparams:
            if key not in PER_MODEL:
                raise RecipeError(f"{where}: models.{i}.parameters.{key}: only weight and density may be set "
                                  "per model in twinserve")
        weight = _scalar(mparams.get("weight", shared_weight), f"{where}: models.{i}.parameters.weight")
        if model == base:
            if method == "linear":  # the base is then one of the averaged models
                merge["base_weight"] = weight if weight is not None else 0.0
            continue  # task-vector methods skip the base, as mergekit does
        if "+" in model:
            left, adapter = model.split("+", 1)
            if left != base:
                raise RecipeError(f"{where}: models.{i}.model: {model!r} applies a LoRA to {left!r}, which is "
                                  "not the base_model; only adapters of the base can be experts")
            model = adapter
        if weight is None:
            raise RecipeError(f"{where}: models.{i}.parameters.weight: required (mergekit has no default)")
        density = _scalar(mparams.get("density"), f"{where}: models.{i}.parameters.density")
        experts.append({"name": _expert_name(model, taken), "path": model, "weight": weight, "density": density,
                        "description": f"{model} (from the mergekit config)"})
    if not experts:
        raise RecipeError(f"{where}: models: no model other than base_model to serve as an expert")

    dtype = data.get("out_dtype") or data.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise RecipeError(f"{where}: dtype: {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    tok = data.get("tokenizer_source")
    if tok == "union" or (tok is not None and not isinstance(tok, str)):
        raise RecipeError(f"{where}: tokenizer_source: {tok!r} is not supported (use base or a path)")
    return {"base": base if base is not None else experts[0]["path"], "experts": experts, "merge": merge,
            "dtype": DTYPES[dtype], "tokenizer": None if tok in (None, "base") else tok}
