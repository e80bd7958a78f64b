"""Shared fixtures: the embedded digits demo run, prepared once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_config(tmp_path_factory) -> Path:
    """Path of a finished demo run's ``run.toml`` (trained, logged with capture(), indexed)."""
    from gradstore.demos.digits import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"), progress=False)
