"""The router: eligible models only, uniform and reproducible choice, step constraints."""

from __future__ import annotations

from collections import Counter

import pytest

from vkr_core.config import EligibilityRegistry, Pool
from vkr_core.router import Router, RoutingError

STEPS = ("example_generation", "self_consistency", "video_dependency", "cot_verification")


def make_pool(**steps) -> Pool:
    return Pool.model_validate(
        {
            "models": [
                {"name": "a", "model": "openai/a"},
                {"name": "b", "model": "openai/b"},
                {"name": "c", "model": "openai/c"},
                {"name": "blind", "model": "openai/blind", "modality": ["text"]},
            ],
            "steps": steps or {"video_dependency": {"models": ["a", "b"]}},
        }
    )


def make_registry(
    pm, eligible=("a", "b", "c", "blind"), version=None, **overrides
) -> EligibilityRegistry:
    steps = {}
    for step in STEPS:
        steps[step] = {
            m: {
                "eligible": True,
                "error_rate": 0.01,
                "n": 100,
                "prompt_version": version or pm.registry.steps[step].version(),
            }
            for m in eligible
        }
    for key, value in overrides.items():
        step, model = key.split("__")
        steps[step][model] = value
    return EligibilityRegistry.model_validate({"steps": steps})


def test_choice_is_reproducible_and_covers_every_eligible_model(vkr_plugin_manager):
    pm = vkr_plugin_manager
    router = Router(make_pool(), make_registry(pm), pm.registry.steps, seed=7)
    again = Router(make_pool(), make_registry(pm), pm.registry.steps, seed=7)
    picks = [router.choose("example_generation", f"v{i}", "VidR", 0).name for i in range(300)]
    assert picks == [
        again.choose("example_generation", f"v{i}", "VidR", 0).name for i in range(300)
    ]
    counts = Counter(picks)
    # "blind" cannot see images, and example_generation shows frames.
    assert set(counts) == {"a", "b", "c"}
    assert all(80 <= n <= 120 for n in counts.values()), counts
    other_seed = Router(make_pool(), make_registry(pm), pm.registry.steps, seed=8)
    assert picks != [
        other_seed.choose("example_generation", f"v{i}", "VidR", 0).name for i in range(300)
    ]


def test_ineligible_models_are_never_chosen(vkr_plugin_manager):
    pm = vkr_plugin_manager
    registry = make_registry(
        pm, example_generation__b={"eligible": False, "error_rate": 0.09, "n": 100}
    )
    router = Router(make_pool(), registry, pm.registry.steps)
    picks = {router.choose("example_generation", f"v{i}").name for i in range(200)}
    assert picks == {"a", "c"}


def test_exclude_generator_never_returns_the_generator(vkr_plugin_manager):
    pm = vkr_plugin_manager
    router = Router(make_pool(), make_registry(pm), pm.registry.steps)
    for i in range(100):
        gen = router.choose("example_generation", f"v{i}").name
        checker = router.choose("cot_verification", f"v{i}", exclude=(gen,)).name
        assert checker != gen


def test_fixed_set_is_every_named_model(vkr_plugin_manager):
    pm = vkr_plugin_manager
    router = Router(make_pool(), make_registry(pm), pm.registry.steps)
    assert [m.name for m in router.fixed("video_dependency")] == ["a", "b"]


def test_step_without_eligible_model_fails_before_any_call(vkr_plugin_manager):
    pm = vkr_plugin_manager
    registry = make_registry(pm)
    registry.steps["self_consistency"] = {}
    router = Router(make_pool(), registry, pm.registry.steps)
    with pytest.raises(RoutingError, match="'self_consistency' has no eligible model"):
        router.check(STEPS)


def test_cot_verification_needs_two_eligible_models(vkr_plugin_manager):
    pm = vkr_plugin_manager
    registry = make_registry(pm)
    registry.steps["cot_verification"] = {"a": registry.steps["cot_verification"]["a"]}
    router = Router(make_pool(), registry, pm.registry.steps)
    with pytest.raises(RoutingError, match="other than the generator"):
        router.check(STEPS)


def test_fixed_model_that_is_not_eligible_is_reported(vkr_plugin_manager):
    pm = vkr_plugin_manager
    registry = make_registry(pm, video_dependency__b={"eligible": False})
    router = Router(make_pool(), registry, pm.registry.steps)
    with pytest.raises(RoutingError, match="fixed model.*b.*not eligible"):
        router.check(STEPS)


def test_pool_with_unknown_step_is_an_error(vkr_plugin_manager):
    pm = vkr_plugin_manager
    with pytest.raises(RoutingError, match="unknown step.*'example_genration'"):
        Router(
            make_pool(example_genration={"temperature": 0.5}), make_registry(pm), pm.registry.steps
        )


def test_stale_entries_are_refused_unless_allowed(vkr_plugin_manager):
    pm = vkr_plugin_manager
    registry = make_registry(pm, version="v0-old")
    router = Router(make_pool(), registry, pm.registry.steps)
    with pytest.raises(RoutingError, match="stale"):
        router.check(STEPS)
    lenient = Router(make_pool(), registry, pm.registry.steps, allow_stale=True)
    lenient.check(STEPS)
    assert lenient.stale and lenient.stale[0][2] == "v0-old"
