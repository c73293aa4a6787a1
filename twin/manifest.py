"""The typed manifest: the contract between ``twinserve build`` and everything that reads an artifact.

Read and written only by twin/artifact.py; every other package gets a validated ``Manifest`` and reads
attributes. Format history:

  1  fp factors only (A, B in the artifact dtype)
  2  factors may be quantised (int8 with one scale per rank component, or bf16) and are dequantised on
     load; per-tensor ``factor_dtype`` and ``quant_error``; ``parity`` report and ``skip_parity``;
     ``generation`` (the base's generation_config.json copied into the artifact root)
  3  ``manifest_sha256``: the manifest's own checksum (sha256 of its canonical JSON without that field),
     so a manifest edited after the build is refused like any other modified file

Version-1 and -2 manifests are read as before (their fields are a subset of version 3; they carry no
checksum of their own); any other version is refused with a message naming it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "twinserve-artifact"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SELF_CHECKSUM_SINCE = 3   # manifests of this version and later must carry manifest_sha256
FactorDType = Literal["float32", "bfloat16", "float16", "int8"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")   # configs may hold inf (Mamba's time_step_limit)


class _Open(BaseModel):
    """Sections whose keys come from a recipe or a report that other packages extend: known keys are
    typed, the rest are kept as they are."""
    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")


class ExpertEntry(_Model):
    name: str
    description: str = ""
    source: str | None = Field(None, description="the expert's checkpoint dir at build time (mode `expert`)")


class TensorEntry(_Model):
    """One parameter that keeps an exclusive delta: ``lowrank`` (2-D, B_t A_t factors) or ``dense`` (1-D δ_t)."""
    shape: list[int]
    kind: Literal["lowrank", "dense"]
    ranks: dict[str, int] = Field(default_factory=dict, description="expert -> r_t")
    rel_error: dict[str, float] = Field(default_factory=dict,
                                        description="expert -> ||δ_t − B_t A_t||_F / ||δ_t||_F (SVD truncation)")
    factor_dtype: FactorDType | None = Field(None, description="storage of B_t, A_t (None: the artifact dtype)")
    quant_error: dict[str, float] = Field(default_factory=dict,
                                          description="expert -> ||B A − B̃ Ã||_F / ||δ_t||_F, the dequantisation error")


class FileEntry(_Model):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class MergeRecord(_Open):
    method: str


class RankRecord(_Open):
    rank: int | None = None
    energy: float | None = None


class RouterSection(_Model):
    config: dict[str, Any] = Field(description="router.model.RouterConfig as a dict (experts, feature layer, ...)")
    train: dict[str, Any] = Field(default_factory=dict, description="training report (held-out accuracy, ...)")


class ParityEntry(_Open):
    """Served artifact (expert pinned, w = one-hot) vs transformers' forward of the expert, fp32."""
    max_abs_logit_diff: float
    argmax_agreement: float = Field(ge=0.0, le=1.0)
    rank: int | None = None


class Manifest(_Model):
    format: Literal["twinserve-artifact"] = FORMAT
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    architecture: str
    config: dict[str, Any] = Field(description="the HF config (PretrainedConfig.to_dict()) of the served model")
    dtype: str = "float32"
    tokenizer: str = Field("tokenizer", description="tokenizer dir, relative to the artifact")
    base: str | None = Field(None, description="the base model dir at build time")
    experts: list[ExpertEntry] = Field(default_factory=list)
    merge: MergeRecord | None = None
    rank_policy: RankRecord | None = None
    tensors: dict[str, TensorEntry] = Field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    router: RouterSection | None = None
    parity: dict[str, ParityEntry] | None = None
    skip_parity: bool = False
    untied_head: bool = Field(False, description="the base ties lm_head to the embedding, an expert does not: "
                                                 "the backbone stores lm_head.weight and config says untied")
    zoo_fingerprint: str | None = None
    synthetic: dict[str, Any] | None = None
    files: dict[str, FileEntry] = Field(default_factory=dict)
    manifest_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                        description="sha256 of this manifest's canonical JSON without this field "
                                                    "(twin.artifact.manifest_digest); written last by the build")

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=False)


def manifest_from_json(data: Any, where: str) -> Manifest:
    """Validate parsed manifest.json; ``where`` (the file's path) prefixes every error.

    Raises ValueError with one line naming the version or the field.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{where}: not a twinserve artifact manifest (format != {FORMAT!r})")
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ValueError(f"{where}: format_version {version!r} is not supported (this twinserve reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}); rebuild the artifact")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise ValueError(f"{where}: invalid manifest field {loc}: {first['msg']}") from None
