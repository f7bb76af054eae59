"""The one exception tree: every exception fleetlog raises on purpose, rooted and drawn in errors.py."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import fleetlog
from fleetlog import errors
from fleetlog.errors import CloseCode, FleetlogError


def _public_exceptions() -> dict[str, type[BaseException]]:
    """Every public exception class defined or exported by a fleetlog module."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(fleetlog.__path__, "fleetlog."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, BaseException)
                    and value.__module__.startswith("fleetlog") and not name.startswith("_")):
                found[f"{info.name}.{name}"] = value
    return found


def test_every_fleetlog_exception_derives_from_the_root_and_is_drawn_in_the_tree() -> None:
    found = _public_exceptions()
    assert "fleetlog.gateway.auth.Refused" in found and "fleetlog.simulate.CannotConnect" in found
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, FleetlogError))
    assert not outside, f"not under FleetlogError: {outside}"
    tree = errors.__doc__ or ""
    undrawn = sorted({cls.__name__ for cls in found.values()} - set(tree.split()))
    assert not undrawn, f"missing from the tree in errors.py's docstring: {undrawn}"
    # Defined once: each import path gives the class from errors.py.
    assert {cls.__module__ for cls in found.values()} == {"fleetlog.errors"}


@pytest.mark.parametrize("path", [
    "fleetlog.store.base.StoreUnavailable", "fleetlog.store.base.RecordRejected",
    "fleetlog.store.StoreUnavailable", "fleetlog.credentials.UnknownDevice",
    "fleetlog.device_id.InvalidDeviceId", "fleetlog.gateway.auth.Refused",
    "fleetlog.gateway.messages.MessageError", "fleetlog.gateway.messages.CloseCode",
    "fleetlog.simulate.CannotConnect",
])
def test_old_import_paths_still_work(path: str) -> None:
    module, _, name = path.rpartition(".")
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_embedded_server_errors_keep_their_builtin_bases() -> None:
    """Callers that caught FileNotFoundError/RuntimeError before still catch them."""
    assert issubclass(errors.ServerNotFound, FileNotFoundError)
    assert issubclass(errors.ServerNotReady, RuntimeError)
    assert issubclass(errors.InvalidDeviceId, ValueError)
    # The store's refusals of bad input were bare ValueErrors before they joined the tree.
    assert issubclass(errors.UnsupportedStore, ValueError)
    assert issubclass(errors.BatchTooLarge, ValueError)
    assert issubclass(errors.InvalidRequest, ValueError)


def test_close_codes_are_the_contracts() -> None:
    assert {code.name: int(code) for code in CloseCode} == {
        "NORMAL": 1000, "GOING_AWAY": 1001, "PROTOCOL_ERROR": 1002, "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009, "REVOKED": 4401, "TAKEN_OVER": 4409,
    }
