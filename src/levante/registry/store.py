"""The model store: content-addressed blobs plus one manifest per `name:tag` (as Ollama keeps models).

    LEVANTE_HOME/
      blobs/sha256-<hex>                 file contents, stored once however many models use them
      manifests/<name>/<tag>.json        what a model is: its files (name -> digest), facts, provenance
      models/<name>/<tag>/               a folder of symlinks to the blobs, laid out as the loader expects

An import copies every file into a temporary blob while hashing it, renames it into place,
and writes the manifest last (atomically): a model exists only once all of it does, and an
interrupted import leaves nothing behind but temporary files that the next write sweeps.
Writers hold an exclusive lock on LEVANTE_HOME/.lock, so CLI and server can share a store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from levante.home import levante_home

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
TAG_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,79}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
DEFAULT_TAG = "latest"
_CHUNK = 1 << 20
_STALE_TMP_SECONDS = 3600

Progress = Callable[[int], None]  # called with bytes processed since the last call


class RegistryError(ValueError):
    """Bad name, unknown model, tampered blob...: a clear message, the store unchanged."""


class ModelNotFoundError(RegistryError):
    pass


@dataclass(frozen=True)
class ModelRef:
    name: str
    tag: str = DEFAULT_TAG

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """`mistral:7b-instruct-v0.3` -> ModelRef("mistral", "7b-instruct-v0.3"); `smollm2` -> tag "latest".

        Names are lowercase letters, digits, `.`, `_`, `-`; no slashes, no `..`, no absolute paths.
        """
        if not isinstance(text, str) or not text:
            raise RegistryError("invalid model name: a name is required")
        name, sep, tag = text.partition(":")
        tag = tag if sep else DEFAULT_TAG
        if not NAME_RE.fullmatch(name) or ".." in name:
            raise RegistryError(
                f"invalid model name {text!r}: use lowercase letters, digits, '.', '_' and '-' (e.g. mistral:7b-instruct-v0.3)"
            )
        if not TAG_RE.fullmatch(tag) or ".." in tag:
            raise RegistryError(f"invalid tag in {text!r}: use letters, digits, '.', '_' and '-'")
        return cls(name, tag)

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass
class FileEntry:
    name: str  # file name inside the model (config.json, model-00001-of-00002.safetensors, model.gguf)
    digest: str  # sha256:<hex>
    size: int


@dataclass
class Manifest:
    name: str
    tag: str
    format: str  # "gguf" or "safetensors"
    files: list[FileEntry]
    architecture: str
    parameters: int
    quantization: str
    context_length: int
    chat_template: str  # where the chat format comes from: "gguf", "tokenizer_config.json", "mistral-instruct", "none"
    license: str | None = None
    source: str = ""
    imported_at: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.tag)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        """A digest of the manifest's file list: identifies the exact model content."""
        body = json.dumps([[f.name, f.digest] for f in sorted(self.files, key=lambda f: f.name)]).encode()
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        try:
            raw = json.loads(text)
            raw["files"] = [FileEntry(**f) for f in raw["files"]]
            manifest = cls(**raw)
        except (ValueError, TypeError, KeyError) as e:
            raise RegistryError(f"{where}: corrupt manifest ({e})") from e
        for f in manifest.files:
            if not FILE_NAME_RE.fullmatch(f.name) or not DIGEST_RE.fullmatch(f.digest):
                raise RegistryError(f"{where}: corrupt manifest entry {f.name!r}")
        return manifest


def file_digest(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return "sha256:" + h.hexdigest()


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or levante_home()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.views = self.root / "models"

    # ---- locking and housekeeping ---------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _sweep_tmp(self) -> None:
        """Remove temporaries of imports that died more than an hour ago."""
        now = time.time()
        for folder in (self.blobs, self.manifests, self.views):
            if not folder.is_dir():
                continue
            for tmp in folder.rglob(".tmp-*"):
                with contextlib.suppress(OSError):
                    if now - tmp.lstat().st_mtime > _STALE_TMP_SECONDS:
                        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()

    # ---- blobs ----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.fullmatch(digest):
            raise RegistryError(f"invalid digest {digest!r}")
        return self.blobs / digest.replace(":", "-")

    def add_blob(self, src: Path, progress: Progress | None = None) -> FileEntry:
        """Copy `src` into the store while hashing it; a blob already present is not stored twice."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        tmp = Path(tmp_name)
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if progress:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + h.hexdigest()
            final = self.blob_path(digest)
            if final.exists() and final.stat().st_size == size:
                tmp.unlink()
            else:
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return FileEntry(src.name, digest, size)

    def verify_blob(self, entry: FileEntry, progress: Progress | None = None) -> str | None:
        """None if the blob is intact, else what is wrong."""
        path = self.blob_path(entry.digest)
        if not path.is_file():
            return f"{entry.name}: blob {entry.digest} is missing"
        if path.stat().st_size != entry.size:
            return f"{entry.name}: blob {entry.digest} has {path.stat().st_size} bytes, expected {entry.size}"
        actual = file_digest(path, progress)
        if actual != entry.digest:
            return f"{entry.name}: blob content does not match its digest {entry.digest} (got {actual}): it was modified"
        return None

    # ---- manifests ------------------------------------------------------------------------

    def manifest_path(self, ref: ModelRef) -> Path:
        return self.manifests / ref.name / f"{ref.tag}.json"

    def get(self, ref: ModelRef) -> Manifest:
        path = self.manifest_path(ref)
        if not path.is_file():
            known = ", ".join(str(m.ref) for m in self.list()) or "none"
            raise ModelNotFoundError(f"model {ref} is not in the registry (have: {known}); `levante pull` or `levante import` it")
        return Manifest.from_json(path.read_text(), path)

    def exists(self, ref: ModelRef) -> bool:
        return self.manifest_path(ref).is_file()

    def list(self) -> list[Manifest]:
        if not self.manifests.is_dir():
            return []
        found = []
        for path in sorted(self.manifests.glob("*/*.json")):
            with contextlib.suppress(RegistryError):
                found.append(Manifest.from_json(path.read_text(), path))
        return found

    def commit(self, manifest: Manifest) -> Manifest:
        """Publish a manifest whose blobs are stored: view folder first, then the manifest, atomically."""
        for f in manifest.files:
            if not FILE_NAME_RE.fullmatch(f.name):
                raise RegistryError(f"refusing file name {f.name!r} in a model")
            if not self.blob_path(f.digest).is_file():
                raise RegistryError(f"blob {f.digest} for {f.name} is not stored")
        with self.lock():
            self._sweep_tmp()
            self._write_view(manifest)
            _atomic_write(self.manifest_path(manifest.ref), manifest.to_json())
        return manifest

    def _write_view(self, manifest: Manifest) -> None:
        view = self.views / manifest.name / manifest.tag
        view.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=view.parent, prefix=".tmp-"))
        for f in manifest.files:
            (tmp / f.name).symlink_to(os.path.relpath(self.blob_path(f.digest), tmp))
        old = None
        if view.exists():
            old = view.parent / f".tmp-old-{view.name}-{os.getpid()}"
            os.replace(view, old)
        os.replace(tmp, view)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def model_path(self, manifest: Manifest) -> Path:
        """What the loader opens: the GGUF file, or the folder of an HF model."""
        view = self.views / manifest.name / manifest.tag
        if not view.is_dir():
            with self.lock():
                self._write_view(manifest)
        if manifest.format == "gguf":
            return view / manifest.files[0].name
        return view

    def remove(self, ref: ModelRef) -> Manifest:
        with self.lock():
            manifest = self.get(ref)
            self.manifest_path(ref).unlink()
            with contextlib.suppress(OSError):
                self.manifest_path(ref).parent.rmdir()
            shutil.rmtree(self.views / ref.name / ref.tag, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.views / ref.name).rmdir()
            self._collect_garbage()
        return manifest

    def copy(self, src: ModelRef, dst: ModelRef) -> Manifest:
        manifest = self.get(src)
        if self.exists(dst):
            raise RegistryError(f"model {dst} already exists; remove it first")
        copy = Manifest(**{**asdict(manifest), "name": dst.name, "tag": dst.tag, "files": list(manifest.files)})
        copy.imported_at = time.time()
        return self.commit(copy)

    def _collect_garbage(self) -> None:
        """Delete blobs no manifest refers to (caller holds the lock).

        Blobs pinned by an import still running (in any live process) are kept.
        """
        used = {f.digest.replace(":", "-") for m in self.list() for f in m.files} | self._pinned()
        if not self.blobs.is_dir():
            return
        for blob in self.blobs.iterdir():
            if blob.name.startswith("sha256-") and blob.name not in used:
                with contextlib.suppress(OSError):
                    blob.unlink()

    @contextlib.contextmanager
    def importing(self) -> Iterator[Callable[[FileEntry], None]]:
        """Pin blobs for the duration of an import, so a concurrent `rm` does not collect them."""
        pins = self.root / "pins"
        pins.mkdir(parents=True, exist_ok=True)
        pin = pins / f"{os.getpid()}-{os.urandom(4).hex()}"
        pinned: list[str] = []

        def add(entry: FileEntry) -> None:
            pinned.append(entry.digest.replace(":", "-"))
            pin.write_text("\n".join(pinned))

        try:
            yield add
        finally:
            with contextlib.suppress(OSError):
                pin.unlink()

    def _pinned(self) -> set[str]:
        pins = self.root / "pins"
        found: set[str] = set()
        if not pins.is_dir():
            return found
        for pin in pins.iterdir():
            pid = pin.name.split("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                with contextlib.suppress(OSError):
                    found.update(pin.read_text().split())
            else:
                with contextlib.suppress(OSError):
                    pin.unlink()  # its process is gone
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
