"""Build recipe: what to merge and how to compress it. Validated once, at the edge."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import RecipeError
from .mergekit import recipe_data_from_mergekit
from .merging import MERGE_METHODS

MergeName = Literal[tuple(MERGE_METHODS)]      # the registry's names (compression/merging)
DType = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
                      description="expert id used in routing and in the API (letters, digits, _ . -)")
    path: str = Field(min_length=1, description="HF model dir (full fine-tune) or PEFT LoRA adapter dir")
    description: str = ""
    weight: float = Field(1.0, allow_inf_nan=False, description="w_t in the backbone merge (mergekit: weight)")
    density: float | None = Field(None, gt=0.0, le=1.0,
                                  description="this expert's density; default: merge.density (mergekit: density)")


class MergeSpec(_Strict):
    """The backbone merge, with mergekit's names and semantics (merge_method parameters of mergekit 0.1.5).

    ``lambda`` is also accepted as ``lam``. ``normalize`` / ``rescale`` left unset take the method's
    mergekit default (ties: normalize; dare_*: rescale to the L1 norm).
    """
    method: MergeName = "ties"
    lam: float = Field(1.0, gt=0.0, le=10.0, validation_alias=AliasChoices("lambda", "lam"),
                       serialization_alias="lambda", description="scale λ applied to the merged task vector")
    density: float = Field(0.2, gt=0.0, le=1.0,
                           description="ties/dare/breadcrumbs: fraction of entries kept per task vector")
    normalize: bool | None = Field(None, description="divide by the (agreeing) experts' summed weights")
    rescale: bool | None = Field(None, description="rescale sparsified task vectors to their L1 norm")
    consensus: Literal["sum", "count"] = Field("sum", description="sign election: summed mass or vote count")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="breadcrumbs: fraction of largest entries dropped")
    int8_mask: bool = Field(False, description="mergekit's mask dtype; accepted, the result is the same")
    base_weight: float = Field(0.0, allow_inf_nan=False,
                               description="linear: weight of the base model itself in the weighted sum")
    seed: int = Field(0, description="dare: seed of the per-tensor drop masks")
    tie_break: Literal["index", "argsort"] = Field(
        "index", description="ties/breadcrumbs: which entries tied at the trim boundary are kept — index (radix "
        "select, bounded memory) or argsort (mergekit's own sort: bit-equal to mergekit, ~20 bytes per entry)")

    @model_validator(mode="before")
    @classmethod
    def _old_dare(cls, data):
        if isinstance(data, dict) and (data.get("method") == "dare" or "drop_p" in data or "dare_base" in data):
            raise ValueError("method 'dare' with drop_p/dare_base was replaced by mergekit's dare_linear and "
                             "dare_ties: set method: dare_linear or dare_ties and density: 1 - drop_p")
        return data


class RankPolicy(_Strict):
    rank: int | None = Field(16, ge=0, le=4096, description="fixed rank per matrix and expert")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="keep this fraction of spectral energy")
    max_rank: int | None = Field(None, ge=1, description="cap for the energy policy")
    include: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of tensors that keep a delta")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of tensors that drop their delta")
    svd: Literal["auto", "exact", "randomized"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _energy_replaces_default_rank(cls, data):
        if isinstance(data, dict) and data.get("energy") is not None and "rank" not in data:
            data = {**data, "rank": None}
        return data

    @model_validator(mode="after")
    def _one_policy(self) -> RankPolicy:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("set exactly one of rank.rank and rank.energy")
        return self


class CompressSpec(_Strict):
    """Size of the exclusive modules: a global byte budget spread over tensors by singular-value energy
    (replaces the per-tensor rank; rank.max_rank still caps it) and the storage of the B, A factors."""
    budget: float | None = Field(None, gt=0.0, le=1.0, description="exclusive bytes / dense expert bytes")
    factor_dtype: Literal["float32", "bfloat16", "float16", "int8"] | None = Field(
        None, description="factor storage (int8: one fp32 scale per rank component); default: the artifact dtype")


class Recipe(_Strict):
    base: str = Field(min_length=1, description="base model dir (HF format)")
    experts: list[ExpertSpec] = Field(min_length=1)
    merge: MergeSpec = MergeSpec()
    rank: RankPolicy = RankPolicy()
    compress: CompressSpec = CompressSpec()
    dtype: DType = "float32"
    tokenizer: str | None = Field(None, description="tokenizer dir; default: the base dir")

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts: list[ExpertSpec]) -> list[ExpertSpec]:
        names = [e.name for e in experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate expert names: {', '.join(dup)}")
        return experts

    @model_validator(mode="after")
    def _weights_can_be_normalised(self) -> Recipe:
        if (self.merge.method == "average" or (self.merge.method == "linear" and self.merge.normalize is not False)) \
                and sum(e.weight for e in self.experts) + self.merge.base_weight == 0:
            raise ValueError("experts: the weights sum to 0, so the normalised merge is undefined")
        return self

    def merge_options(self) -> dict:
        """The flat merge parameters for ``compression.merging.merge_params``, with the per-expert
        weights and densities (None: merge.density) in expert order."""
        return {**self.merge.model_dump(exclude={"method", "tie_break"}), "weights": [e.weight for e in self.experts],
                "densities": [e.density for e in self.experts]}

    def resolve(self, root: Path) -> Recipe:
        """Return a copy whose relative paths are resolved against ``root`` (the recipe's folder)."""
        def r(p: str | None) -> str | None:
            return None if p is None else str((root / p).resolve()) if not Path(p).is_absolute() else p
        return self.model_copy(update={
            "base": r(self.base), "tokenizer": r(self.tokenizer),
            "experts": [e.model_copy(update={"path": r(e.path)}) for e in self.experts],
        })


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        parts.append(f"{prefix}{loc}: {e['msg']}")
    return "; ".join(parts)


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line error (problem, context, source excerpt with a caret) as one line:
    "line L, column C: problem (context at line L', column C')", 1-based like an editor."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None or mark is None:
        return " ".join(str(err).split())
    text = f"{at(mark)}: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        where = at(context_mark) if context_mark is not None else None
        text += f" ({context} at {where})" if where and where != at(mark) else f" ({context})"
    return text


def load_recipe(path: str | Path) -> Recipe:
    """A twinserve recipe or a mergekit config (detected by its ``merge_method`` key), YAML or JSON,
    with relative paths resolved against the file's folder. Raises RecipeError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"cannot parse recipe {path}: {yaml_problem(e)}") from None
    except (OSError, ValueError) as e:   # json.JSONDecodeError's message already names line and column
        raise RecipeError(f"cannot parse recipe {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: top level must be a mapping")
    where = f"recipe {path}"
    if "merge_method" in data:        # a mergekit config: translated into a recipe's fields first
        data, where = recipe_data_from_mergekit(data, path), f"mergekit config {path}"
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"invalid {where}: {format_validation_error(e)}") from None
    return recipe.resolve(path.parent)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False))
