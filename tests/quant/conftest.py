"""Fixtures shared with the engine tests."""

from tests.engine.conftest import text_model_dir  # noqa: F401
