"""The API fixture of tests/api, for the browser tests."""

from tests.api.conftest import api as api

__all__ = ["api"]
