"""A small OCI image archive made here, for containerd to import: two layers
(busybox-static with a few of its applets; then one file), no registry, no
network. The layout is the OCI image spec's: ``oci-layout``, ``index.json``
and content-addressed ``blobs/sha256/``; the layers are plain tars (the spec
allows uncompressed layers, whose digest is then also their diff id)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "ls", "sha256sum", "dd", "sync", "mount", "true")
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _dir(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def layers(release: str) -> list[bytes]:
    base = _tar([_dir("bin"), _dir("etc"), _dir("tmp", 0o1777), _dir("proc"), _dir("sys"),
                 _dir("dev"), _dir("data"),
                 _file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
                 *(_link(f"bin/{applet}", "busybox") for applet in APPLETS)])
    top = _tar([_dir("etc"), _file("etc/lab-release", release.encode())])
    return [base, top]


def _descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
            "size": len(blob)}


def write_archive(path: Path, name: str, release: str = "dmd lab\n") -> None:
    """An OCI archive at *path* whose one image is called *name* (a full
    reference, e.g. docker.io/library/lab:latest)."""
    blobs = layers(release)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(0)),
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]},
    }).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST,
                           "config": _descriptor(CONFIG, config),
                           "layers": [_descriptor(LAYER, b) for b in blobs]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        **_descriptor(MANIFEST, manifest),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rpartition(":")[2]}}]})
    entries = [_file("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
               _file("index.json", index.encode()), _dir("blobs"), _dir("blobs/sha256")]
    for blob in (*blobs, config, manifest):
        entries.append(_file(f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob))
    path.write_bytes(_tar(entries))
