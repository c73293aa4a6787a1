"""The artifact: the contract between build and serve.

    manifest.json          twin.manifest.Manifest: format + version, config, experts, merge, ranks, router,
                           parity, sha256 of every file, and its own sha256 (manifest_sha256)
    backbone.safetensors   θ*
    exclusive.safetensors  "{param}::{expert}::A" / "::B" factors of 2-D deltas, "::delta" for 1-D deltas;
                           int8 factors carry "::A_scale" / "::B_scale" (one fp32 scale per rank component)
                           Either file may be sharded as transformers shards checkpoints:
                           backbone-00001-of-00003.safetensors, … plus backbone.safetensors.index.json
                           ({"weight_map": {tensor: shard}}), written by ``ShardWriter`` as tensors are produced
    generation_config.json (optional) the base's, for eos ids
    router.safetensors     (optional) router weights
    tokenizer/             HF tokenizer files
    report.json            build + quality report

Written into a temp dir beside the target and renamed into place; an update hard-links the
unchanged files into a fresh temp dir, so even a multi-GB backbone is never copied.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import TwinserveError
from .manifest import FORMAT, FORMAT_VERSION, SELF_CHECKSUM_SINCE, Manifest, manifest_from_json

MANIFEST = "manifest.json"
BACKBONE = "backbone.safetensors"
EXCLUSIVE = "exclusive.safetensors"
ROUTER = "router.safetensors"
REPORT = "report.json"
OWNER = ".owner-pid"   # in a temp dir while it is being written; a killed writer leaves it behind


class ArtifactError(TwinserveError):
    """An artifact that is missing, of another version, or fails verification; names the file."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, OWNER))


def make_readable(root: Path) -> None:
    """Files 0644, dirs 0755: safetensors writes 0600, which a server running as another user cannot read."""
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def manifest_digest(data: dict) -> str:
    """sha256 of a parsed manifest.json without its ``manifest_sha256`` field, as canonical JSON (sorted
    keys, no whitespace): what the build records and verification recomputes."""
    rest = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     allow_nan=True).encode()).hexdigest()


def finalize_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Record size and sha256 of every file under ``root`` and write manifest.json at the current format
    version, covered by its own checksum (all files world-readable); return the manifest as written."""
    files = {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in _listing(root)}
    manifest = Manifest.model_validate(dict(manifest.model_dump(), format=FORMAT, format_version=FORMAT_VERSION,
                                            files=files, manifest_sha256=None))
    # the digest of exactly what a reader parses back (floats as JSON writes them)
    manifest = manifest.model_copy(update={"manifest_sha256": manifest_digest(json.loads(manifest.to_json()))})
    (root / MANIFEST).write_text(manifest.to_json())
    make_readable(root)
    return manifest


@contextlib.contextmanager
def atomic_dir(target: str | Path, link_from: str | Path | None = None) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success it replaces ``target``, on error it is removed.

    ``link_from`` pre-populates the temp dir with hard links (or copies across devices) of an
    existing artifact, for in-place updates; replace a linked file by writing a new one, never edit it.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    if link_from is not None:
        shutil.copytree(link_from, tmp, copy_function=_link_or_copy)
    else:
        tmp.mkdir()
    (tmp / OWNER).write_text(str(os.getpid()))
    try:
        yield tmp
        (tmp / OWNER).unlink(missing_ok=True)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove temp dirs of ``target`` left by a writer that no longer runs (a killed build): they were never
    renamed into place, so nothing could load them, but they hold disk. Returns what was removed."""
    removed = []
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int((tmp / OWNER).read_text())
        except (OSError, ValueError):
            continue      # not ours, or an older writer without an owner file: leave it
        if not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_file(path: Path, data: bytes | str) -> None:
    """Write ``path`` as a new inode (safe inside a hard-linked temp dir)."""
    if path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def read_manifest(path: str | Path, check_self: bool = False) -> Manifest:
    """Parse and validate manifest.json; ArtifactError names the file, version or field. ``check_self``:
    also its own checksum (format 3 on), so a manifest edited after the build is refused."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"artifact not found: {path} is not a directory")
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing; {path} is not a twinserve artifact")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{mpath}: cannot parse: {e}") from None
    try:
        manifest = manifest_from_json(data, str(mpath))
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    if check_self and manifest.format_version >= SELF_CHECKSUM_SINCE:
        if manifest.manifest_sha256 is None:
            raise ArtifactError(f"{mpath}: has no manifest_sha256 (format {manifest.format_version} records the "
                                "manifest's own checksum); it was edited or written by hand: rebuild the artifact")
        if manifest_digest(data) != manifest.manifest_sha256:
            raise ArtifactError(f"{mpath}: checksum mismatch (manifest_sha256 differs from its contents); the "
                                "manifest was edited after the build: rebuild the artifact")
    return manifest


def verify_artifact(path: str | Path) -> Manifest:
    """Check version, the manifest's own checksum, and presence, size and sha256 of every file (no file the
    manifest does not list); return the manifest."""
    path = Path(path)
    manifest = read_manifest(path, check_self=True)
    files = manifest.files
    for required in (BACKBONE, EXCLUSIVE):
        if required not in files and index_name(required) not in files:
            raise ArtifactError(f"{path / MANIFEST}: does not list {required}")
    unlisted = [rel for rel in _listing(path) if rel not in files]
    if unlisted:     # a file nothing checksums would be loaded unchecked (a router, a shard, a tokenizer file)
        raise ArtifactError(f"{path / unlisted[0]}: not listed in manifest.json (added or left after the build); "
                            f"remove it or rebuild ({len(unlisted)} unlisted file(s))")
    for rel, meta in files.items():
        f = path / rel
        if not f.resolve().is_relative_to(path.resolve()):
            raise ArtifactError(f"{path / MANIFEST}: file path {rel} points outside the artifact")
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (listed in manifest.json)")
        size = f.stat().st_size
        if size != meta.bytes:
            raise ArtifactError(f"{f}: truncated or modified: {size} bytes, manifest says {meta.bytes}")
        if sha256_file(f) != meta.sha256:
            raise ArtifactError(f"{f}: checksum mismatch (sha256 differs from manifest.json); file was modified")
    return manifest


def check_json_files(path: str | Path) -> None:
    """Every JSON file of the artifact but the manifest (tokenizer files, shard indexes, report) parses:
    ArtifactError naming the file otherwise (the tokenizer libraries' own errors name none)."""
    path = Path(path)
    for f in sorted(path.rglob("*.json")):
        if f.name == MANIFEST and f.parent == path:
            continue
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{f}: not valid JSON ({e}); the file is damaged: rebuild the artifact") from None


def index_name(name: str) -> str:
    return name + ".index.json"


def tensor_files(path: Path, name: str) -> list[Path]:
    """The file(s) holding ``name`` (e.g. backbone.safetensors): itself, or the shards its index lists."""
    index = path / index_name(name)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ArtifactError(f"{index}: cannot read the shard index: {e}") from None
        return [path / s for s in shards]
    return [path / name]


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in tensor_files(Path(path), name):
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{f}: cannot read: {e}") from None
    return out


class LazyTensors:
    """Tensors of a (sharded) safetensors file read one at a time through safetensors' mmap."""

    def __init__(self, path: Path, name: str):
        self.where: dict[str, Path] = {}
        for f in tensor_files(Path(path), name):
            try:
                with safe_open(str(f), framework="pt") as h:
                    self.where.update(dict.fromkeys(h.keys(), f))
            except (SafetensorError, OSError) as e:
                raise ArtifactError(f"{f}: cannot read: {e}") from None

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __iter__(self):
        return iter(self.where)

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.where[key]), framework="pt") as h:
            return h.get_tensor(key)


class ShardWriter:
    """Write tensors as they are produced into ``root/stem-0000i-of-0000N.safetensors`` shards of about
    ``shard_bytes`` each (one file named ``stem.safetensors`` when everything fits one shard), plus the
    index transformers reads. Memory held: the current shard's tensors, never the whole model."""

    def __init__(self, root: Path, name: str, shard_bytes: int = 1 << 29):
        self.root, self.name, self.shard_bytes = Path(root), name, shard_bytes
        self.stem = name.removesuffix(".safetensors")
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        t = t.contiguous()
        self._buf[key] = t
        self._buf_bytes += t.numel() * t.element_size()
        self.total_bytes += t.numel() * t.element_size()
        if self._buf_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        part = self.root / f".{self.stem}-part{len(self._parts):05d}.safetensors"
        save_file(self._buf, str(part))
        self._parts.append((part, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give the shards their final names, write the index; return the file names."""
        if self._buf or not self._parts:
            if not self._parts:   # one shard (or nothing at all): the plain single-file layout
                save_file(self._buf, str(self.root / self.name))
                self._buf = {}
                return [self.name]
            self._flush()
        n = len(self._parts)
        weight_map, names = {}, []
        for i, (part, keys) in enumerate(self._parts, 1):
            final = f"{self.stem}-{i:05d}-of-{n:05d}.safetensors"
            os.rename(part, self.root / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.root / index_name(self.name)).write_text(json.dumps(index, indent=1))
        return [*names, index_name(self.name)]


def exclusive_key(param: str, expert: str, part: str) -> str:
    return f"{param}::{expert}::{part}"


def read_report(path: str | Path) -> dict:
    f = Path(path) / REPORT
    return json.loads(f.read_text()) if f.is_file() else {}


def update_artifact(path: str | Path, files: dict[str, bytes | str], manifest_update: dict | None = None) -> Manifest:
    """Atomically replace/add ``files`` (relative path -> content) and set the Manifest fields in
    ``manifest_update`` (field name -> value, validated); re-checksum."""
    path = Path(path)
    manifest = verify_artifact(path)
    try:
        manifest = Manifest.model_validate(dict(manifest.model_dump(), **(manifest_update or {})))
    except ValueError as e:
        raise ArtifactError(f"{path / MANIFEST}: invalid update: {e}") from None
    with atomic_dir(path, link_from=path) as tmp:
        for rel, data in files.items():
            replace_file(tmp / rel, data)
        (tmp / MANIFEST).unlink()
        manifest = finalize_manifest(tmp, manifest)
    return manifest


def dequantize_factor(q: torch.Tensor, scale: torch.Tensor | None, dim: int) -> torch.Tensor:
    """fp32 factor from its stored form: int8 ``q`` times ``scale`` (one per rank component, laid along
    ``dim``: 1 for B (d_out×r), 0 for A (r×d_in)); bf16/fp16/fp32 factors are only upcast."""
    if scale is None:
        return q.float()
    return q.float() * (scale.float().unsqueeze(0) if dim == 1 else scale.float().unsqueeze(1))


def stored_factors(tensors: dict[str, torch.Tensor], param: str, expert: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_t, A_t) of one expert as fp32, dequantised when stored as int8 (KeyError when absent)."""
    def part(name: str, dim: int) -> torch.Tensor:
        scale = tensors.get(exclusive_key(param, expert, f"{name}_scale"))
        return dequantize_factor(tensors[exclusive_key(param, expert, name)], scale, dim)
    return part("B", 1), part("A", 0)


def load_exclusive(path: str | Path, manifest: Manifest) -> tuple[dict, dict]:
    """Exclusive deltas in expert order: ({param: LowRankDeltas}, {param: (T, *shape) dense deltas}).

    Factors are fp32 after loading (int8 ones dequantised); the caller casts to the serving dtype.
    """
    from .fusion import LowRankDeltas

    tensors = load_tensors(Path(path), EXCLUSIVE)
    names = manifest.expert_names
    lowrank, dense = {}, {}
    for param, info in manifest.tensors.items():
        try:
            if info.kind == "lowrank":
                lowrank[param] = LowRankDeltas.from_factors([stored_factors(tensors, param, n) for n in names])
            else:
                dense[param] = torch.stack([tensors[exclusive_key(param, n, "delta")] for n in names])
        except KeyError as e:
            raise ArtifactError(f"{Path(path) / EXCLUSIVE}: missing tensor {e.args[0]}") from None
    return lowrank, dense
