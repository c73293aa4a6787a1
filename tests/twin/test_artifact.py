"""Artifact verification (tamper detection), atomic writes and in-place updates."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from twin import artifact as art
from twin.artifact import (
    BACKBONE,
    EXCLUSIVE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    REPORT,
    ArtifactError,
    atomic_dir,
    finalize_manifest,
    load_tensors,
    read_manifest,
    read_report,
    replace_file,
    sha256_file,
    update_artifact,
    verify_artifact,
)
from twin.manifest import Manifest, RouterSection


def leftovers(parent: Path, name: str) -> list[str]:
    """Temp or old dirs that atomic_dir would leave beside ``name``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- verify

def test_built_artifact_verifies_and_lists_every_file(tiny_artifact):
    manifest = verify_artifact(tiny_artifact)
    assert manifest.format == FORMAT and manifest.format_version == FORMAT_VERSION == 3
    on_disk = sorted(str(p.relative_to(tiny_artifact)) for p in tiny_artifact.rglob("*")
                     if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest.files) == on_disk
    assert {BACKBONE, EXCLUSIVE, REPORT, "tokenizer/tokenizer.json"} <= set(on_disk)
    for rel, meta in manifest.files.items():
        f = tiny_artifact / rel
        assert meta.bytes == f.stat().st_size
        assert meta.sha256 == sha256_file(f)
    assert read_manifest(tiny_artifact) == manifest
    assert "build" in read_report(tiny_artifact)


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()


def test_flipped_byte_in_backbone_is_a_checksum_error(artifact_copy):
    f = artifact_copy / BACKBONE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum") as ei:
        verify_artifact(artifact_copy)
    assert BACKBONE in str(ei.value)


def test_truncated_exclusive_is_reported_as_truncated(artifact_copy):
    f = artifact_copy / EXCLUSIVE
    size = f.stat().st_size
    with open(f, "r+b") as h:
        h.truncate(size - 100)
    with pytest.raises(ArtifactError, match="truncated") as ei:
        verify_artifact(artifact_copy)
    msg = str(ei.value)
    assert EXCLUSIVE in msg and str(size - 100) in msg and str(size) in msg


def test_truncated_safetensors_cannot_be_loaded_either(artifact_copy):
    f = artifact_copy / EXCLUSIVE
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="cannot read") as ei:
        load_tensors(artifact_copy, EXCLUSIVE)
    assert EXCLUSIVE in str(ei.value)


@pytest.mark.parametrize("rel", ["tokenizer/tokenizer.json", REPORT, BACKBONE])
def test_deleted_file_is_reported_missing(artifact_copy, rel):
    (artifact_copy / rel).unlink()
    with pytest.raises(ArtifactError, match="missing") as ei:
        verify_artifact(artifact_copy)
    assert rel.split("/")[-1] in str(ei.value)


def test_manifest_without_backbone_entry_is_rejected(artifact_copy):
    m = json.loads((artifact_copy / MANIFEST).read_text())
    del m["files"][BACKBONE]
    m["manifest_sha256"] = art.manifest_digest(m)     # as a build that forgot it would have sealed it
    (artifact_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=f"does not list {BACKBONE}"):
        verify_artifact(artifact_copy)


@pytest.mark.parametrize("version", [4, 0, "1", "2", "3", None, True])
def test_other_format_version_is_rejected(artifact_copy, version):
    m = json.loads((artifact_copy / MANIFEST).read_text())
    m["format_version"] = version
    (artifact_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version") as ei:
        verify_artifact(artifact_copy)
    assert "rebuild" in str(ei.value) and repr(version) in str(ei.value) and MANIFEST in str(ei.value)


def _as_v1(artifact: Path) -> dict:
    """Rewrite a built manifest as format version 1 wrote it: no factor_dtype / quant_error / parity fields."""
    m = json.loads((artifact / MANIFEST).read_text())
    for key in ("parity", "skip_parity", "untied_head", "tokenizer", "synthetic", "manifest_sha256"):
        m.pop(key)
    for info in m["tensors"].values():
        info.pop("factor_dtype")
        info.pop("quant_error")
    m["format_version"] = 1
    m["zoo_fingerprint"] = "0123456789abcdef"
    (artifact / MANIFEST).write_text(json.dumps(m))
    return m


def test_version_1_artifact_still_loads_and_serves_the_same(artifact_copy, tiny_artifact):
    from twin.artifact import load_exclusive

    old = _as_v1(artifact_copy)
    manifest = verify_artifact(artifact_copy)
    assert manifest.format_version == 1 and manifest.expert_names == [e["name"] for e in old["experts"]]
    assert manifest.tensors["model.norm.weight"].factor_dtype is None
    lowrank, dense = load_exclusive(artifact_copy, manifest)
    ref_lowrank, ref_dense = load_exclusive(tiny_artifact, verify_artifact(tiny_artifact))
    for k, d in ref_lowrank.items():
        assert torch.equal(lowrank[k].A_cat, d.A_cat) and torch.equal(lowrank[k].B_cat, d.B_cat)
    assert all(torch.equal(dense[k], d) for k, d in ref_dense.items())
    # an update rewrites it at the current version
    assert update_artifact(artifact_copy, {"notes.txt": "x"}).format_version == FORMAT_VERSION
    assert json.loads((artifact_copy / MANIFEST).read_text())["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("field, value, named", [
    ("experts", [{"name": "math", "bogus": 1}], "experts.0.bogus"),
    ("tensors", {"w": {"shape": [2, 2], "kind": "sparse"}}, "tensors.w.kind"),
    ("architecture", None, "architecture"),
    ("surprise", 1, "surprise"),
])
def test_invalid_manifest_field_is_named(artifact_copy, field, value, named):
    m = json.loads((artifact_copy / MANIFEST).read_text())
    m[field] = value
    (artifact_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="invalid manifest field") as ei:
        verify_artifact(artifact_copy)
    assert named in str(ei.value) and MANIFEST in str(ei.value)


def test_wrong_format_and_broken_manifest_are_rejected(artifact_copy):
    mpath = artifact_copy / MANIFEST
    good = mpath.read_text()
    mpath.write_text(json.dumps(dict(json.loads(good), format="something-else")))
    with pytest.raises(ArtifactError, match="not a twinserve artifact manifest"):
        verify_artifact(artifact_copy)
    mpath.write_text(good[:-20])
    with pytest.raises(ArtifactError, match="cannot parse"):
        verify_artifact(artifact_copy)
    mpath.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a twinserve artifact manifest"):
        verify_artifact(artifact_copy)
    mpath.unlink()
    with pytest.raises(ArtifactError, match="missing") as ei:
        verify_artifact(artifact_copy)
    assert MANIFEST in str(ei.value)


def test_not_a_directory_is_rejected(tmp_path):
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not a directory"):
        verify_artifact(f)
    with pytest.raises(ArtifactError, match="not a directory"):
        verify_artifact(tmp_path / "does-not-exist")
    with pytest.raises(ArtifactError, match="not a twinserve artifact"):
        verify_artifact(tmp_path)  # a directory without manifest.json


def test_artifact_error_is_a_value_error():
    assert issubclass(ArtifactError, ValueError)


# ----------------------------------------------------------------------------- update

def test_update_adds_a_file_and_hard_links_the_rest(artifact_copy):
    before = {rel: (artifact_copy / rel).stat().st_ino for rel in (BACKBONE, EXCLUSIVE, "tokenizer/tokenizer.json")}
    backbone_bytes = (artifact_copy / BACKBONE).read_bytes()
    router = os.urandom(256)
    section = {"config": {"experts": ["math", "code", "chat"]}, "train": {"heldout_accuracy": 1.0}}
    manifest = update_artifact(artifact_copy, {"router.safetensors": router, REPORT: '{"eval": 1}'},
                               manifest_update={"router": section})
    assert verify_artifact(artifact_copy) == manifest
    assert manifest.router == RouterSection(**section)
    assert manifest.files["router.safetensors"].bytes == 256
    assert (artifact_copy / "router.safetensors").read_bytes() == router
    assert read_report(artifact_copy) == {"eval": 1}
    # unchanged files were hard-linked, not copied (same inode), content identical
    for rel, ino in before.items():
        assert (artifact_copy / rel).stat().st_ino == ino, rel
    assert (artifact_copy / BACKBONE).read_bytes() == backbone_bytes
    assert manifest.architecture == "LlamaForCausalLM"  # rest of the manifest kept
    assert leftovers(artifact_copy.parent, artifact_copy.name) == []


def test_update_can_add_files_in_new_and_existing_subdirs(artifact_copy):
    manifest = update_artifact(artifact_copy, {"eval/results.json": '{"acc": 0.5}', "tokenizer/extra.txt": b"x"})
    assert json.loads((artifact_copy / "eval" / "results.json").read_text()) == {"acc": 0.5}
    assert manifest.files["tokenizer/extra.txt"].bytes == 1
    assert "eval/results.json" in verify_artifact(artifact_copy).files


def test_update_with_an_invalid_field_is_refused_and_changes_nothing(artifact_copy):
    before = snapshot(artifact_copy)
    with pytest.raises(ArtifactError, match="router"):
        update_artifact(artifact_copy, {"x.txt": "x"}, {"router": {"train": {}}})  # no config
    assert snapshot(artifact_copy) == before


def test_update_replaces_linked_file_without_touching_the_original_inode(artifact_copy, tmp_path):
    keep = tmp_path / "keep-report.json"
    os.link(artifact_copy / REPORT, keep)  # another name for the original inode
    old = keep.read_bytes()
    update_artifact(artifact_copy, {REPORT: "{}"})
    assert keep.read_bytes() == old  # the old inode was not written through
    assert (artifact_copy / REPORT).read_text() == "{}"
    verify_artifact(artifact_copy)


def test_update_of_a_tampered_artifact_is_refused(artifact_copy):
    (artifact_copy / REPORT).write_text("{}")
    with pytest.raises(ArtifactError):
        update_artifact(artifact_copy, {"router.safetensors": b"x"})
    assert not (artifact_copy / "router.safetensors").exists()


def test_failing_update_leaves_artifact_intact(artifact_copy, monkeypatch):
    before = snapshot(artifact_copy)

    def boom(root, manifest):
        raise RuntimeError("disk full")

    monkeypatch.setattr(art, "finalize_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        update_artifact(artifact_copy, {BACKBONE: b"garbage", "router.safetensors": b"r"})
    monkeypatch.undo()
    assert snapshot(artifact_copy) == before
    verify_artifact(artifact_copy)
    assert leftovers(artifact_copy.parent, artifact_copy.name) == []


def test_atomic_dir_failure_with_links_keeps_original(artifact_copy):
    before = snapshot(artifact_copy)
    with pytest.raises(KeyError), atomic_dir(artifact_copy, link_from=artifact_copy) as tmp:
        assert tmp.parent == artifact_copy.parent and tmp != artifact_copy
        assert (tmp / BACKBONE).stat().st_ino == (artifact_copy / BACKBONE).stat().st_ino
        replace_file(tmp / BACKBONE, b"new content")  # new inode: the original is untouched
        replace_file(tmp / "extra.txt", "x")
        raise KeyError("fail inside")
    assert snapshot(artifact_copy) == before
    verify_artifact(artifact_copy)
    assert leftovers(artifact_copy.parent, artifact_copy.name) == []


def test_atomic_dir_creates_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "deep" / "out"
    with atomic_dir(target) as tmp:
        assert not target.exists()  # nothing visible until the block succeeds
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("three")
        raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert leftovers(target.parent, "out") == []


def test_finalize_manifest_records_nested_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(b"abc")
    (tmp_path / BACKBONE).write_bytes(b"")
    (tmp_path / EXCLUSIVE).write_bytes(b"12")
    m = finalize_manifest(tmp_path, Manifest(architecture="LlamaForCausalLM", config={}))
    assert m.format == FORMAT and m.format_version == FORMAT_VERSION
    assert m.files["sub/x.bin"].model_dump() == {"bytes": 3, "sha256": sha256_file(tmp_path / "sub" / "x.bin")}
    assert MANIFEST not in m.files
    assert verify_artifact(tmp_path) == m
    shutil.rmtree(tmp_path / "sub")
    with pytest.raises(ArtifactError, match="x.bin: missing"):
        verify_artifact(tmp_path)


def test_artifact_files_are_world_readable(tiny_artifact):
    import stat
    for f in tiny_artifact.rglob("*"):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & 0o004, f"{f} is not world-readable ({oct(mode)})"


def test_a_file_the_manifest_does_not_list_is_refused(tiny_artifact, tmp_path):
    """An unlisted file (a router dropped in by hand, a stray shard) would load without a checksum: refused,
    naming it."""
    import shutil

    from twin.artifact import ArtifactError, verify_artifact
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    verify_artifact(art)
    (art / "router.safetensors").write_bytes(b"not a router")
    with pytest.raises(ArtifactError, match="router.safetensors: not listed in manifest.json"):
        verify_artifact(art)


def test_config_with_infinite_fields_round_trips_through_the_manifest(artifact_copy):
    """Mamba-style configs hold inf (GraniteMoeHybrid's time_step_limit (0, inf)): the manifest keeps it (as
    JSON's Infinity), its checksum still verifies, and the config loads back with the same value."""
    from twin.loading import config_from_manifest

    m = art.update_artifact(artifact_copy, {}, {"config": {**art.read_manifest(artifact_copy).config,
                                                           "time_step_limit": [0.0, float("inf")]}})
    assert m.config["time_step_limit"] == [0.0, float("inf")]
    back = art.verify_artifact(artifact_copy)
    assert back.config["time_step_limit"] == [0.0, float("inf")]
    assert "Infinity" in (artifact_copy / "manifest.json").read_text()
    assert config_from_manifest(back).time_step_limit == [0.0, float("inf")]
