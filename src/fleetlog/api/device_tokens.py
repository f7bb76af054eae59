"""Device credentials over HTTP: the same operations as ``fleetlog device ...``.

Each route calls :class:`fleetlog.credentials.Credentials` (blocking, so the
routes are plain functions that FastAPI runs in its thread pool); like the
CLI, a change returns once every live gateway confirmed it.  No token (404), one
already (409) and Redis down (503) are answered by the app's handlers (:mod:`.failures`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel

from fleetlog.api.deps import ERRORS, AdminToken, Found, ReadToken, invalid
from fleetlog.credentials import Credentials
from fleetlog.device_id import InvalidDeviceId

__all__ = ["router"]

router = APIRouter(tags=["device tokens"], responses=ERRORS)

DeviceId = Annotated[str, Path(description="The device's id.")]


class DeviceCredential(BaseModel):
    device_id: str
    created_at: str
    rotated_at: str | None


class NewDevice(BaseModel):
    device_id: str


class IssuedToken(BaseModel):
    """A device token, shown this once (only its hash is kept)."""

    device_id: str
    token: str
    unconfirmed_gateways: int


def _credentials(found: Found) -> Credentials:
    return Credentials(found.redis)


@router.get("/api/device-tokens", response_model=list[DeviceCredential],
            summary="Every device with a token (never the token)")
def list_device_tokens(_token: ReadToken, found: Found) -> list[DeviceCredential]:
    return [DeviceCredential(device_id=c.device_id, created_at=c.created_at, rotated_at=c.rotated_at)
            for c in _credentials(found).list()]


@router.post("/api/device-tokens", response_model=IssuedToken, status_code=201,
             responses={409: {"description": "The device has a token already."}},
             summary="Create a device's token")
def add_device_token(new: NewDevice, _token: AdminToken, found: Found) -> IssuedToken:
    credentials = _credentials(found)
    try:
        token = credentials.add(new.device_id)
    except InvalidDeviceId as exc:
        raise invalid("body", "device_id", str(exc)) from exc
    return IssuedToken(device_id=new.device_id, token=token, unconfirmed_gateways=credentials.unconfirmed)


@router.post("/api/device-tokens/{device_id:device}/rotate", response_model=IssuedToken,
             responses={404: {"description": "The device has no token."}},
             summary="Replace a device's token; its connections are closed")
def rotate_device_token(device_id: DeviceId, _token: AdminToken, found: Found) -> IssuedToken:
    credentials = _credentials(found)
    token = credentials.rotate(device_id)
    return IssuedToken(device_id=device_id, token=token, unconfirmed_gateways=credentials.unconfirmed)


@router.delete("/api/device-tokens/{device_id:device}", status_code=204, response_class=Response,
               responses={404: {"description": "The device has no token."}},
               summary="Delete a device's token; its connections are closed")
def revoke_device_token(device_id: DeviceId, _token: AdminToken, found: Found) -> Response:
    _credentials(found).revoke(device_id)
    return Response(status_code=204)
