"""``fleetlog simulate`` against a gateway that stops answering: a frame without an
answer is sent again on a new connection after the answer timeout, and the run
still ends at its own timeout, saying so (it used to reconnect forever)."""

from __future__ import annotations

import asyncio
import time

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from fleetlog import protocol
from fleetlog.simulate import SimulationSummary, simulate


class _Server:
    """Answers the first ``answered`` frames of the run, then none; keeps every frame."""

    def __init__(self, answered: int) -> None:
        self.frames: list[dict[str, object]] = []
        self.connections = 0
        self.answered = answered

    def listener(self, request: WSUpgradeRequest) -> WSListener:
        server = self

        class Listener(WSListener):
            def on_ws_connected(self, transport: WSTransport) -> None:
                server.connections += 1

            def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
                if frame.msg_type != WSMsgType.TEXT:
                    return
                server.frames.append(orjson.loads(frame.get_payload_as_bytes()))
                if len(server.frames) <= server.answered:
                    transport.send(WSMsgType.TEXT, protocol.LOG_UPLOAD_RESPONSE)

        return Listener()


async def _run(server: _Server, **options: float) -> tuple[SimulationSummary, float]:
    """One device sending 3 records to ``server``: the summary, and how long the run took."""
    listening = await ws_create_server(server.listener, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        summary = await asyncio.wait_for(
            simulate(f"ws://127.0.0.1:{port}/", 1, 3, prefix="quiet-", **options), timeout=30)
    finally:
        listening.close()
    return summary, time.monotonic() - started


async def test_an_unanswered_frame_is_sent_again_and_the_run_ends_in_time() -> None:
    server = _Server(answered=1)
    summary, took = await _run(server, timeout=3.0, answer_timeout=0.4)

    assert took < 10, f"the run outlived its 3 s timeout: {took:.1f} s"
    assert summary.acked == 1 and summary.acked_through == {"quiet-0001": 1}
    assert summary.errors["TimeoutError"] == 1
    assert summary.failure == "TimeoutError: simulation ran out of time"
    # The second record went unanswered: it was sent again, on a new connection each time.
    seqs = [frame["data"]["seq"] for frame in server.frames]  # type: ignore[index]
    assert seqs[0] == 0 and set(seqs[1:]) == {1} and len(seqs) >= 3, seqs
    assert summary.reconnects >= 2 and server.connections >= 3  # the probe, then one per answer timeout


async def test_a_frame_in_flight_at_the_deadline_ends_the_run_then() -> None:
    """The run's timeout is shorter than the answer timeout (30 s): the run still ends on time."""
    server = _Server(answered=1)
    summary, took = await _run(server, timeout=2.0)

    assert took < 6, f"the run outlived its 2 s timeout: {took:.1f} s"
    assert summary.acked == 1 and summary.reconnects == 0
    assert summary.failure == "TimeoutError: simulation ran out of time"
    assert [frame["data"]["seq"] for frame in server.frames] == [0, 1]  # type: ignore[index]
