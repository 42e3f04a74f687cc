"""What the per-call CPU savings must not change (issue 9): redaction of every line a run
appends, now done only where a key could be."""

from __future__ import annotations

import json

from vkr_core.log import REDACTED, redact, register_secrets


def test_every_key_shape_and_url_password_is_still_redacted_in_a_long_step_input():
    filler = "Describe the pancake flip at [Frame at 00:03]. " * 120  # a 6 KB step input
    keys = [
        "sk-" + "A1b2C3d4" * 3,
        "sk-ant-" + "x_y-z" * 5,
        "AIza" + "Q" * 35,
        "Bearer " + "tok.en_" * 4,
    ]
    for key in keys:
        line = json.dumps({"text": filler + key + " " + filler}, ensure_ascii=False)
        out = redact(line)
        assert key not in out and REDACTED in out, key
    url = "postgresql://vkr:hunter2-pass@db.example:5432/runs"
    assert redact(f"state at {url}") == f"state at postgresql://vkr:{REDACTED}@db.example:5432/runs"


def test_a_secret_registered_later_is_redacted_whole_even_inside_a_longer_one():
    short, long = "canary-secret-123", "canary-secret-123-and-more"
    register_secrets([short])
    register_secrets([long])
    assert redact(f"a {long} b {short} c") == f"a {REDACTED} b {REDACTED} c"


def test_text_without_any_key_comes_back_unchanged():
    text = "Skip the sk- prefix here: nothing after it looks like a key, nor Bearer x."
    assert redact(text) == text
