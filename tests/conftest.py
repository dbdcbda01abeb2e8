"""Shared fixtures: the real SmolLM2 tokenizer (fast to load) and tiny random models."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    from tinkerkit.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
