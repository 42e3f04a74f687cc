"""The worked pool in docs/PROVIDERS.md is one a user can paste: it loads, every entry passes
its provider's checks (structured output on a route that sends the schema, vLLM options),
and the page names the variable of every key it uses."""

from __future__ import annotations

import re
from pathlib import Path

from vkr_core.config import load_pool
from vkr_core.plugins import get_plugin_manager

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROVIDERS.md"


def test_the_worked_pool_loads_and_passes_every_providers_checks(tmp_path: Path) -> None:
    text = DOC.read_text()
    [block] = re.findall(r"```yaml\n(# pool\.yaml.*?)```", text, re.S)
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(block)
    pool = load_pool(pool_file)

    paper = {
        "gpt-5.2",
        "gpt-5-mini",
        "claude-4.5-sonnet",
        "gemini-3-flash",
        "deepseek-v3.2",
        "qwen3-vl-235b",
        "glm-4.6v",
        "internvl3.5-38b",
        "qwen3-vl-32b",
    }
    assert set(pool.names()) == paper
    assert pool.steps["video_dependency"].models == ["internvl3.5-38b", "qwen3-vl-32b"]

    providers = get_plugin_manager().registry.providers
    for spec in pool.models:
        providers[spec.provider].check_entry(spec)  # raises InputError naming the entry
        if spec.api_key_env:
            assert f"`{spec.api_key_env}`" in text, spec.api_key_env
    assert {s.provider for s in pool.models} == {"litellm", "vllm"}
    assert sum(s.structured_output for s in pool.models) == 8  # all but DeepSeek
    # Every hosted entry is on a journalled route (docs/PROTOCOLS.md): exactly once.
    litellm = providers["litellm"]
    assert all(litellm.journals(s) for s in pool.models if s.provider == "litellm")
