"""End to end, ``KV_CONNECTOR``: 1P1D with vLLM's own ExampleConnector (KV through
safetensors files) instead of ours, through the same front door. The decode engine
loads the prompt's KV from the files the prefill engine wrote, the greedy output equals
the prefill engine's alone, and ``clean`` removes the files. (How it compares with ours
is a benchmark, not a test.)"""

from __future__ import annotations

import pytest

from testkit.deployment import ENGINE_PARAMS, complete, deployed, external_kv_tokens, same_greedy_output, token_prompt

pytestmark = pytest.mark.e2e

LONG_ENGINE_PARAMS = f"{ENGINE_PARAMS} --max-model-len 1024"
LOADED_TOKENS = 256  # the 300-token prompt's full 128-token blocks


def test_pd_through_vllms_example_connector(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("example-connector")
    settings = {"KV_CONNECTOR": "ExampleConnector", "PREFILL_STARTUP_PARAMS": ENGINE_PARAMS, "DECODE_STARTUP_PARAMS": ENGINE_PARAMS}
    with deployed(tmp, **settings) as deployment:
        body = {"model": deployment.state.served_model_name, "prompt": token_prompt(300), "max_tokens": 16,
                "temperature": 0, "logprobs": 1}  # fmt: skip
        decode = deployment.engine_url("decode")
        before = external_kv_tokens(decode)
        through_pd = complete(deployment.url, body)
        loaded = external_kv_tokens(decode) - before
        alone = deployment.engine_complete("prefill", body)
        print(f"ExampleConnector: the decode loaded {loaded:.0f} prompt tokens' KV")
        assert same_greedy_output(through_pd, alone)
        assert loaded == LOADED_TOKENS
        assert any((tmp / "run" / "example_kv").iterdir())  # the prefill's KV files
    assert not (tmp / "run" / "example_kv").exists()  # clean removed them

