"""Each model provider has its own endpoint, key and prices (real engine process, real HTTP
servers standing in for the providers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_py import AsyncEngineClient, InvalidArgumentError
from tests.engine.models.test_model_anthropic import text_stream as anthropic_text
from tests.processes import EngineProcess
from tests.sse_server import serve
from tests.system.test_acknowledged import openai_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

OPENAI_KEY = "sk-openai-test-key-0001"
ANTHROPIC_KEY = "sk-ant-test-key-0002"


async def test_a_run_choosing_another_provider_reaches_only_that_provider(tmp_path: Path) -> None:
    with serve() as openai, serve() as anthropic:
        anthropic.push(anthropic_text("Bonjour"))
        openai.push(openai_text("Hello"))
        env = {
            "MACHINA_STORAGE": str(tmp_path / "storage"),
            "MACHINA_WORKDIR_ROOT": str(tmp_path / "work"),
            # The default provider: OpenAI, with the historical variables.
            "MACHINA_MODEL_PROVIDER": "openai",
            "MACHINA_MODEL_BASE_URL": openai.url + "/v1",
            "OPENAI_API_KEY": OPENAI_KEY,
            "MACHINA_MODEL_OPENAI_PRICES": "gpt-test=1/2",
            # Anthropic's own endpoint, key variable and prices.
            "MACHINA_MODEL_ANTHROPIC_BASE_URL": anthropic.url,
            "MACHINA_MODEL_ANTHROPIC_API_KEY_ENV": "TEAM_ANTHROPIC_KEY",
            "TEAM_ANTHROPIC_KEY": ANTHROPIC_KEY,
            "MACHINA_MODEL_ANTHROPIC_PRICES": "claude-test=3/15",
        }
        engine = EngineProcess(tmp_path, env=env)
        try:
            async with AsyncEngineClient(engine.target) as client:
                run = await (await client.create("hi", model="anthropic:claude-test", max_cost_usd=1.0)).wait(
                    20
                )
                assert run.state == "DONE", run
                assert run.data == "Bonjour"
                # 25 input and 7 output tokens at Anthropic's prices, not OpenAI's.
                assert run.meta.cost_usd == pytest.approx((25 * 3 + 7 * 15) / 1e6)
                other = await (await client.create("hi", model="openai:gpt-test", max_cost_usd=1.0)).wait(20)
                assert other.state == "DONE", other
                assert other.meta.cost_usd == pytest.approx((10 * 1 + 2 * 2) / 1e6)
        finally:
            engine.close()
    ((a_path, a_headers),) = [(r.path, r.headers) for r in anthropic.requests]
    assert a_path == "/v1/messages"
    assert a_headers.get("x-api-key") == ANTHROPIC_KEY
    ((o_path, o_headers),) = [(r.path, r.headers) for r in openai.requests]
    assert o_path == "/v1/chat/completions"
    assert o_headers.get("authorization") == f"Bearer {OPENAI_KEY}"
    assert ANTHROPIC_KEY not in str(o_headers)
    assert OPENAI_KEY not in str(a_headers)


async def test_a_cost_budget_without_known_prices_is_refused_at_create(tmp_path: Path) -> None:
    env = {
        "MACHINA_STORAGE": str(tmp_path / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp_path / "work"),
        "MACHINA_MODEL_PROVIDER": "openai",
        "MACHINA_MODEL_BASE_URL": "http://127.0.0.1:9/v1",  # never reached
        "OPENAI_API_KEY": OPENAI_KEY,
        "MACHINA_MODEL_ANTHROPIC_PRICES": "claude-test=3/15",
    }
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            for model in ("openai:gpt-4o", "anthropic:claude-other"):
                with pytest.raises(InvalidArgumentError) as refused:
                    await client.create("spend", model=model, max_cost_usd=5.0)
                assert refused.value.code == "ERR_PRICE_UNKNOWN"
                assert refused.value.metadata["model"] == model
            assert [run async for run in client.list_runs()] == []
            # Without a budget an unknown price is no reason to refuse (it counts as 0).
            accepted = await client.create("free", model="openai:gpt-4o")
            assert accepted.run.meta.cost_usd == 0
    finally:
        engine.close()
