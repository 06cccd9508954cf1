"""multipart/form-data parsing and request-body framing, without sockets."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stt_server.http import MIN_PIECES, BadRequest, RequestBody
from stt_server.multipart import (
    MAX_PART_HEAD,
    MAX_PARTS,
    MultipartError,
    NotMultipart,
    boundary_of,
    parse_form,
)

BOUNDARY = b"----stt-boundary-7f3a"


def form(*parts: tuple[str, bytes, str | None], boundary: bytes = BOUNDARY) -> bytes:
    """A body as HTTP clients build it: (name, data, filename) per part."""
    out = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += b"--" + boundary + b"\r\n"
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def test_fields_and_a_file_come_out_in_order_with_binary_content_intact() -> None:
    audio = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n"
    parts = parse_form(
        form(("model", b"whisper-1", None), ("file", audio, "a.wav"), ("language", b"en", None)),
        BOUNDARY,
    )
    assert [(p.name, p.filename) for p in parts] == [
        ("model", None),
        ("file", "a.wav"),
        ("language", None),
    ]
    assert bytes(parts[1].data) == audio
    assert parts[1].content_type == "application/octet-stream"
    assert parts[0].text() == "whisper-1"


def test_the_file_is_a_view_into_the_body_not_a_copy() -> None:
    body = bytearray(form(("file", b"x" * 1000, "a.wav")))
    (part,) = parse_form(body, BOUNDARY)
    assert part.data.obj is body


def test_preamble_epilogue_padding_and_an_empty_part() -> None:
    body = (
        b"this is a preamble\r\n--" + BOUNDARY + b"  \t\r\n"
        b'Content-Disposition: form-data; name="prompt"\r\n\r\n\r\n--' + BOUNDARY + b"--\r\n"
        b"epilogue"
    )
    (part,) = parse_form(body, BOUNDARY)
    assert part.name == "prompt" and part.text() == ""


def test_utf8_and_rfc2231_filenames_and_quoted_names() -> None:
    body = (
        b"--" + BOUNDARY + b"\r\n"
        b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''sch%C3%B6n.wav\r\n\r\n"
        b"abc\r\n--" + BOUNDARY + b"--"
    )
    assert parse_form(body, BOUNDARY)[0].filename == "schön.wav"
    raw = form(("file", b"abc", "für.mp3"))
    assert parse_form(raw, BOUNDARY)[0].filename == "für.mp3"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "no multipart boundary"),
        (b"hello", "no multipart boundary"),
        (form(("file", b"abc", "a.wav"))[:-10], "ends before its closing"),  # truncated
        (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=x\r\n", "inside"),
        (b"--" + BOUNDARY + b"\r\nNo-Colon-Here\r\n\r\nabc\r\n--" + BOUNDARY + b"--", "header"),
        (b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\nabc\r\n--" + BOUNDARY + b"--",
         "no Content-Disposition"),
        (b"--" + BOUNDARY + b"\r\nContent-Disposition: attachment; name=x\r\n\r\na\r\n--"
         + BOUNDARY + b"--", "form-data"),
        (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data\r\n\r\na\r\n--" + BOUNDARY + b"--",
         "no name"),
        (b"--" + BOUNDARY + b"\r\n\r\nabc\r\n--" + BOUNDARY + b"--", "no headers"),
        (b"--" + BOUNDARY + b"garbage", "ends before"),
    ],
)  # fmt: skip
def test_malformed_bodies_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse_form(body, BOUNDARY)


def test_limits_on_part_heads_and_part_count() -> None:
    long_head = (
        b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=x\r\nX: "
        + b"a" * (MAX_PART_HEAD + 10) + b"\r\n\r\nabc\r\n--" + BOUNDARY + b"--"
    )  # fmt: skip
    with pytest.raises(MultipartError, match="head is over"):
        parse_form(long_head, BOUNDARY)
    many = form(*[("f", b"1", None)] * (MAX_PARTS + 1))
    with pytest.raises(MultipartError, match="more than"):
        parse_form(many, BOUNDARY)
    assert len(parse_form(form(*[("f", b"1", None)] * MAX_PARTS), BOUNDARY)) == MAX_PARTS


def test_text_fields_must_be_utf8() -> None:
    (part,) = parse_form(form(("language", b"\xff\xfe", None)), BOUNDARY)
    with pytest.raises(MultipartError, match="UTF-8"):
        part.text()


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ('multipart/form-data; boundary="a b:c"', b"a b:c"),
        ("Multipart/Form-Data;boundary=----WebKitFormBoundaryX1", b"----WebKitFormBoundaryX1"),
    ],
)
def test_boundaries_from_content_types(content_type: str, boundary: bytes) -> None:
    assert boundary_of(content_type) == boundary


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        ("", NotMultipart),
        ("application/json", NotMultipart),
        ("audio/wav", NotMultipart),
        ("multipart/form-data", MultipartError),
        ("multipart/form-data; boundary=", MultipartError),
        ("multipart/form-data; boundary=" + "x" * 71, MultipartError),
        ('multipart/form-data; boundary="trailing "', MultipartError),
    ],
)
def test_bad_content_types(content_type: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        boundary_of(content_type)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([b"", b"--" + BOUNDARY + b"\r\n"]))
def test_arbitrary_bytes_give_parts_or_a_multipart_error(data: bytes, prefix: bytes) -> None:
    try:
        for part in parse_form(prefix + data, BOUNDARY):
            with contextlib.suppress(MultipartError):
                part.text()
    except MultipartError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_content_types_give_a_boundary_or_a_multipart_error(value: str) -> None:
    with contextlib.suppress(MultipartError):
        boundary_of(value)


# -- request bodies (h11 framing) ---------------------------------------------------------------

HEAD = b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"


def test_a_body_with_content_length_arriving_in_pieces() -> None:
    body = RequestBody(HEAD + b"Content-Length: 10\r\n\r\nabc", limit=100)
    assert not body.advance()
    assert not body.receive(b"defg")
    assert body.receive(b"hij")
    assert bytes(body.data) == b"abcdefghij"


def test_a_chunked_body() -> None:
    body = RequestBody(HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", limit=100)
    assert not body.advance()
    assert body.receive(b"6\r\n world\r\n0\r\n\r\n")
    assert bytes(body.data) == b"hello world"


def test_limits_declared_and_counted() -> None:
    with pytest.raises(BadRequest) as declared:
        RequestBody(HEAD + b"Content-Length: 10000000000000\r\n\r\n", limit=100)
    assert declared.value.status == 413
    chunked = RequestBody(HEAD + b"Transfer-Encoding: chunked\r\n\r\n", limit=100)
    chunked.advance()
    with pytest.raises(BadRequest) as counted:
        chunked.receive(b"64\r\n" + b"x" * 100 + b"\r\n5\r\nhello\r\n")
    assert counted.value.status == 413


def test_no_length_is_411_and_broken_framing_is_400() -> None:
    with pytest.raises(BadRequest) as missing:
        RequestBody(HEAD + b"\r\n", limit=100)
    assert missing.value.status == 411
    truncated = RequestBody(HEAD + b"Content-Length: 10\r\n\r\nabc", limit=100)
    with pytest.raises(BadRequest, match="malformed request body") as closed:
        truncated.receive(b"")  # the client hung up with 7 bytes owed
    assert closed.value.status == 400
    bad_chunk = RequestBody(HEAD + b"Transfer-Encoding: chunked\r\n\r\n", limit=100)
    with pytest.raises(BadRequest) as garbage:
        bad_chunk.receive(b"zz\r\nhello\r\n")
    assert garbage.value.status == 400


def test_expect_100_continue_is_seen_until_the_body_starts() -> None:
    waiting = RequestBody(HEAD + b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n", limit=10)
    assert not waiting.advance()
    assert waiting.expects_continue
    assert waiting.receive(b"abc")
    eager = RequestBody(HEAD + b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\nab", limit=10)
    eager.advance()
    assert not eager.expects_continue  # it sent its body without waiting: no 100 needed


def test_a_chunked_body_of_tiny_chunks_is_refused_early() -> None:
    """One-byte chunks would cost the event loop microseconds each for 25 MiB: refused once
    they average under MIN_PIECE_SIZE bytes, long before the size limit."""
    body = RequestBody(HEAD + b"Transfer-Encoding: chunked\r\n\r\n", limit=25 << 20)
    body.advance()
    with pytest.raises(BadRequest) as tiny:
        for _ in range(MIN_PIECES + 2):
            body.receive(b"1\r\nx\r\n")
    assert tiny.value.status == 400 and "chunks" in str(tiny.value)
    # Ordinary chunk sizes pass, however many there are.
    body = RequestBody(HEAD + b"Transfer-Encoding: chunked\r\n\r\n", limit=25 << 20)
    body.advance()
    for _ in range(4 * MIN_PIECES):
        assert not body.receive(b"400\r\n" + b"y" * 1024 + b"\r\n")
    assert body.receive(b"0\r\n\r\n") and len(body.data) == 4 * MIN_PIECES * 1024
