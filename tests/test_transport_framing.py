"""The transport's response framing against h11's, on the same byte streams.

Responses are generated from parts (status line, header fields, a body framed by
``Content-Length``, ``Transfer-Encoding: chunked`` or the connection's end, informational
heads before them, and malformed variants of each), cut at random points, and fed to
``worker.exchange.transport``'s connection (as the event loop hands it bytes, the connection's end
after the last piece) and to an ``h11`` client connection. Their decisions must be equal:
the same status, reason, header fields and body bytes, or both refusing the answer.

Where h11 is knowingly more lenient than llhttp (a line ending in a bare LF, a folded field
value, a repeated equal ``Content-Length``, an HTTP version other than 1.0 and 1.1, a control
character in a field value or the reason, blanks inside a chunk extension), the generated
answer says so, and then the transport must refuse it, whatever h11 does. h11 writes
``Transfer-Encoding``'s value in lower case; the comparison does too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.exchange.transport import MAX_HEAD_BYTES, _Connection

REFUSED = ("refused",)
Decision = tuple[Any, ...]


class _Wire(asyncio.Transport):
    """The connection's transport: nothing to write to, nothing to pause."""

    def __init__(self) -> None:
        super().__init__()
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _fields(headers: Any) -> list[tuple[bytes, bytes]]:
    """Names in lower case; h11 also writes Transfer-Encoding's value so."""
    fields = [(bytes(name).lower(), bytes(value)) for name, value in headers]
    return [(n, v.lower() if n == b"transfer-encoding" else v) for n, v in fields]


async def _transport_reads(pieces: list[bytes], head_request: bool) -> Decision:
    conn = _Connection(asyncio.get_running_loop())
    conn.connection_made(_Wire())

    async def feed() -> None:
        for piece in pieces:
            await asyncio.sleep(0)
            conn.data_received(piece)
        await asyncio.sleep(0)
        conn.eof_received()

    feeder = asyncio.create_task(feed())
    try:
        head = await conn.read_head(None, head_request=head_request)
        if head.length is not None and conn.buffered() >= head.length:
            body = conn.take(head.length)  # as FastTransport takes a body already here
        else:
            body = b"".join([chunk async for chunk in conn.body(head, None)])
    except httpx.RemoteProtocolError:
        return REFUSED
    finally:
        await feeder
    return ("answer", head.status, head.reason, _fields(head.headers), body)


def transport_reads(pieces: list[bytes], head_request: bool = False) -> Decision:
    return asyncio.run(_transport_reads(pieces, head_request))


def h11_reads(pieces: list[bytes], head_request: bool = False) -> Decision:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    method = "HEAD" if head_request else "GET"
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "papi.test")]))
    conn.send(h11.EndOfMessage())
    response: h11.Response | None = None
    body: list[bytes] = []
    for piece in [*pieces, b""]:  # b"": the connection's end
        conn.receive_data(piece)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return REFUSED
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                fields = _fields(response.headers.raw_items())
                return ("answer", response.status_code, response.reason, fields, b"".join(body))
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:  # ConnectionClosed before the end of the answer, PAUSED
                return REFUSED
    return REFUSED


# -- generating answers ---------------------------------------------------------------------


@dataclass
class Answer:
    wire: bytes
    head_request: bool = False
    strict: list[str] = field(default_factory=list)  # why h11 may accept what we refuse


TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
    min_size=1,
    max_size=12,
)
VALUE_CHARS = st.sampled_from([*b'abcXYZ019 ,;=/"()', 0x09, 0x80, 0xE9, 0xFF])
VALUE = st.lists(VALUE_CHARS, max_size=20).map(bytes)
REASON = st.sampled_from([b"OK", b"Not Found", b"", b"Service Unavailable", b"O\tK", b"\xe9t\xe9"])
ODD_REASON = st.lists(st.sampled_from([*b"aZ0 ", 0x09, 0x80, 0x7F, 0x01, 0x00]), max_size=8)
STATUS = st.sampled_from([b"200", b"201", b"204", b"304", b"400", b"404", b"429", b"503", b"999"])
ODD_STATUS = st.sampled_from([b"099", b"20", b"2000", b"2x0", b"-200"])
VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"])
ODD_VERSION = st.sampled_from(
    [b"RTSP/1.0", b"ICE/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/2", b"HTTP/1.1 ", b"http/1.1"]
)


RARELY = st.sampled_from([False] * 9 + [True])


def _rare_case(draw: Any, cases: int) -> int:
    """0 (nothing odd) about two times in three, else one of ``1..cases``."""
    return int(draw(st.sampled_from([0] * (2 * cases) + list(range(1, cases + 1)))))


def _mostly(draw: Any, usual: Any, odd: Any) -> Any:
    """A draw from ``odd`` one time in ten, else from ``usual``."""
    return draw(odd if draw(RARELY) else usual)


def _chunk_size(size: int, draw: Any) -> bytes:
    text = b"%x" % size
    return draw(st.sampled_from([text, text.upper(), b"0" + text]))


@st.composite
def answers(draw: Any) -> Answer:
    strict: list[str] = []
    strict_body: list[str] = []  # what counts only when the body is read
    version = _mostly(draw, VERSION, ODD_VERSION)
    if version in (b"HTTP/1.2", b"HTTP/2.0"):
        strict.append("version")
    status = _mostly(draw, STATUS, ODD_STATUS)
    reason = bytes(_mostly(draw, REASON, ODD_REASON))
    if any((c < 0x20 and c != 0x09) or c == 0x7F for c in reason):
        strict.append("control character")
    status_line = (
        version + b" " + status + (b" " + reason if draw(st.booleans()) or reason else b"")
    )
    fields: list[bytes] = []
    for _ in range(draw(st.integers(0, 4))):
        fields.append(
            draw(TOKEN).encode()
            + b":"
            + draw(st.sampled_from([b"", b" ", b"  ", b"\t"]))
            + draw(VALUE)
            + draw(st.sampled_from([b"", b" ", b"\t "]))
        )
    body = draw(st.binary(min_size=1, max_size=40))
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close", "none"]))
    payload = b""
    if framing == "length":
        name = draw(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"]))
        sent = len(body)
        fields.append(name + b": " + b"%d" % sent)
        payload = body[: draw(st.integers(0, len(body)))] if draw(RARELY) else body
        odd = _rare_case(draw, 3)
        if odd == 1:
            fields.append(b"Content-Length: %d" % sent)  # the same again
            strict.append("repeated Content-Length")
        elif odd == 2:
            fields.append(b"Content-Length: %d" % (sent + 1))
        elif odd == 3:
            fields[-1] = (
                name + b": " + draw(st.sampled_from([b"-1", b"+1", b"1x", b"", b"0x1", b"1 1"]))
            )
    elif framing == "chunked":
        fields.append(
            draw(st.sampled_from([b"Transfer-Encoding: chunked", b"transfer-encoding: Chunked"]))
        )
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for part in parts:
            if not part:
                continue
            ext = draw(st.sampled_from([b"", b";a=1", b";a=1;b", b';q="x"', b" ", b"; q=x", b";"]))
            if ext in (b"; q=x", b";"):
                strict_body.append("chunk extension")  # llhttp holds them to RFC 9112's syntax
            payload += _chunk_size(len(part), draw) + ext + b"\r\n" + part + b"\r\n"
        payload += (
            b"0\r\n"
            + draw(st.sampled_from([b"", b"X-Trailer: 1\r\n", b"A: b\r\nC: d\r\n"]))
            + b"\r\n"
        )
        odd = _rare_case(draw, 7)
        if odd == 1:
            fields.append(b"Content-Length: 5")  # both framings: chunked wins
        elif odd == 2:
            fields[-1] = b"Transfer-Encoding: gzip, chunked"
        elif odd == 3:
            payload = b"zz\r\n" + payload
        elif odd == 4 and body:
            payload = b"1\r\n" + body[:2] + b"X\r\n0\r\n\r\n"  # a chunk longer than its size
        elif odd == 5:
            payload = payload[: draw(st.integers(0, len(payload)))]  # cut short
        elif odd == 6:
            fields.append(b"Transfer-Encoding: chunked")
        elif odd == 7:
            fields[-1] = b"Transfer-Encoding: gzip"
    elif framing == "close":
        payload = body
    fields = draw(st.permutations(fields))
    odd = _rare_case(draw, 7)
    if odd == 1 and fields:
        fields[0] = fields[0].replace(b":", b" :", 1)
    elif odd == 2:
        fields.append(b"no colon here")
    elif odd == 3 and fields:
        fields.insert(draw(st.integers(1, len(fields))), b" folded")
        strict.append("obs-fold")
    elif odd == 4 and fields:
        fields[0] += b"\n" + b"X-Bare: 1"
        strict.append("bare LF")
    elif odd == 5:
        fields.append(b": empty name")
    elif odd == 6:
        fields.append(b"X-Ctl: a\x01b")
        strict.append("control character")  # h11 takes anything but NUL and blanks
    elif odd == 7:
        fields.append(b"X-Del: a\x7fb")
        strict.append("control character")
    head = b"\r\n".join([status_line, *fields]) + b"\r\n\r\n"
    informational = b"".join(
        draw(
            st.sampled_from(
                [
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                ]
            )
        )
        for _ in range(draw(st.integers(0, 2)))
    )
    head_request = draw(RARELY)
    if not (head_request or status in (b"204", b"304")):
        strict += strict_body
    return Answer(informational + head + payload, head_request, strict)


@st.composite
def cut(draw: Any, wire: bytes) -> list[bytes]:
    points = sorted(set(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=6))))
    return [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True) if wire[a:b]]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_transport_frames_answers_as_h11_does(data: st.DataObject) -> None:
    answer = data.draw(answers())
    pieces = data.draw(cut(answer.wire))
    ours = transport_reads(pieces, answer.head_request)
    if answer.strict:
        assert ours == REFUSED, (answer, ours)
        return
    theirs = h11_reads(pieces, answer.head_request)
    assert ours == theirs, answer
