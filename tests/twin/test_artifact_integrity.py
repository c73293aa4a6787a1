"""The manifest is covered by its own checksum: an edit after the build (the hand edits that were served
silently wrong) is refused, naming manifest.json; an artifact of an older format still loads."""
from __future__ import annotations

import json

import pytest

from twin.artifact import (
    MANIFEST,
    ArtifactError,
    check_json_files,
    manifest_digest,
    read_manifest,
    update_artifact,
    verify_artifact,
)
from twin.manifest import SELF_CHECKSUM_SINCE


def edit(artifact, change) -> None:
    m = json.loads((artifact / MANIFEST).read_text())
    change(m)
    (artifact / MANIFEST).write_text(json.dumps(m, indent=2))


def test_build_seals_the_manifest(tiny_artifact):
    data = json.loads((tiny_artifact / MANIFEST).read_text())
    assert data["format_version"] >= SELF_CHECKSUM_SINCE
    assert data["manifest_sha256"] == manifest_digest(data)
    assert verify_artifact(tiny_artifact).manifest_sha256 == data["manifest_sha256"]


@pytest.mark.parametrize("what, change", [
    ("no deltas", lambda m: m.update(tensors={})),
    ("rope_theta", lambda m: m["config"].update(rope_theta=1.0)),
    ("dtype", lambda m: m.update(dtype="bfloat16")),
    ("longer context", lambda m: m["config"].update(max_position_embeddings=1 << 20)),
    ("expert renamed", lambda m: m["experts"][0].update(name="renamed")),
    ("skip_parity", lambda m: m.update(skip_parity=True)),   # would dodge serve's parity refusal
    ("whitespace only is no edit", None),
])
def test_an_edited_manifest_is_refused(artifact_copy, what, change):
    if change is None:   # re-indenting changes bytes, not content: still the same manifest
        edit(artifact_copy, lambda m: None)
        verify_artifact(artifact_copy)
        return
    edit(artifact_copy, change)
    with pytest.raises(ArtifactError, match="checksum mismatch") as ei:
        verify_artifact(artifact_copy)
    assert str(artifact_copy / MANIFEST) in str(ei.value) and "edited" in str(ei.value)
    read_manifest(artifact_copy)   # parsing alone (no checksums) still reads it


def test_a_removed_checksum_is_refused(artifact_copy):
    edit(artifact_copy, lambda m: m.pop("manifest_sha256"))
    with pytest.raises(ArtifactError, match="no manifest_sha256"):
        verify_artifact(artifact_copy)
    edit(artifact_copy, lambda m: m.update(manifest_sha256="0" * 64))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        verify_artifact(artifact_copy)


def test_an_older_format_without_its_own_checksum_still_verifies(artifact_copy):
    def as_v2(m):
        m.pop("manifest_sha256")
        m["format_version"] = 2
    edit(artifact_copy, as_v2)
    assert verify_artifact(artifact_copy).format_version == 2
    # an update reseals it at the current version
    manifest = update_artifact(artifact_copy, {"notes.txt": "x"})
    assert manifest.format_version >= SELF_CHECKSUM_SINCE and manifest.manifest_sha256
    assert verify_artifact(artifact_copy) == manifest


def test_a_damaged_tokenizer_json_is_named(artifact_copy):
    f = artifact_copy / "tokenizer" / "tokenizer.json"
    check_json_files(artifact_copy)
    f.write_text(f.read_text()[:100])
    with pytest.raises(ArtifactError, match="tokenizer.json: not valid JSON") as ei:
        check_json_files(artifact_copy)
    assert str(f) in str(ei.value)
