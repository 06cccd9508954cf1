"""``multipart/form-data`` bodies (RFC 7578), sans-IO: complete bytes in, named parts out.

Theory of operation: the body is already in memory and bounded (the caller stops reading at its
size limit), so parsing is a handful of ``bytes.find`` calls over it, linear in its size, with
no state carried between reads. A file part's content is a ``memoryview`` into the body, never a
copy, so a 25 MiB upload costs 25 MiB once.

Everything a client can get wrong raises :class:`MultipartError` with a message fit to send back:
a missing or malformed boundary, a body that stops before its closing delimiter (a truncated
upload), part heads that are too long or not ``form-data``, too many parts, a part without a
name. Nothing else escapes, whatever the bytes (a hypothesis test feeds arbitrary ones).
"""

from __future__ import annotations

import email.message
import re

import attrs

#: RFC 2046 boundary: 1 to 70 characters from a small alphabet (no trailing space).
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")

#: Bytes of one part's head (its header lines): real ones are under 300.
MAX_PART_HEAD = 8 * 1024

#: Parts in one body: the file API needs fewer than ten.
MAX_PARTS = 64


class MultipartError(ValueError):
    """The body is not well-formed ``multipart/form-data``; the message says how."""


class NotMultipart(MultipartError):
    """The request says its body is something else than ``multipart/form-data``."""


@attrs.frozen
class Part:
    name: str
    #: Present (possibly empty) for file parts, None for plain fields.
    filename: str | None
    content_type: str | None
    data: memoryview

    def text(self) -> str:
        """The part as a form field's value (UTF-8, as browsers and HTTP clients send it)."""
        try:
            return bytes(self.data).decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"field {self.name!r} is not valid UTF-8") from None


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type, or :class:`MultipartError`."""
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        raise NotMultipart("the body must be multipart/form-data")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not _BOUNDARY.match(boundary):
        raise MultipartError("multipart/form-data needs a valid boundary parameter")
    return boundary.encode("ascii")


def _part_head(raw: bytes) -> tuple[str, str | None, str | None]:
    """Name, filename and content type from a part's header lines."""
    # Browsers send non-ASCII filenames as raw UTF-8; nothing here depends on them being exact.
    lines = raw.decode("utf-8", errors="replace").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise MultipartError("malformed header line in a multipart part")
        headers[name.lower()] = value.strip()
    disposition = headers.get("content-disposition")
    if disposition is None:
        raise MultipartError("a multipart part has no Content-Disposition header")
    message = email.message.Message()
    message["content-disposition"] = disposition
    if message.get_content_disposition() != "form-data":
        raise MultipartError("multipart parts must be Content-Disposition: form-data")
    name = message.get_param("name", header="content-disposition")
    filename = message.get_filename()  # also decodes RFC 2231 filename*=UTF-8''...
    if not isinstance(name, str) or not name:
        raise MultipartError("a multipart part has no name")
    return name, filename, headers.get("content-type")


def parse_form(body: bytes | bytearray, boundary: bytes) -> list[Part]:
    """Every part of ``body``, in order. Preamble and epilogue are ignored (RFC 2046)."""
    view = memoryview(body)
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise MultipartError("the body has no multipart boundary")
        position = found + 2 + len(delimiter)
    parts: list[Part] = []
    while True:
        if body[position : position + 2] == b"--":
            return parts  # the close delimiter
        # Transport padding (RFC 2046: whitespace) may follow a delimiter before its CRLF.
        while body[position : position + 1] in (b" ", b"\t"):
            position += 1
        if body[position : position + 2] != b"\r\n":
            raise MultipartError("the body ends before its closing multipart boundary")
        position += 2
        if len(parts) >= MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts")
        if body[position : position + 2] == b"\r\n":
            raise MultipartError("a multipart part has no headers")
        head_end = body.find(b"\r\n\r\n", position, position + MAX_PART_HEAD + 4)
        if head_end < 0:
            if len(body) - position > MAX_PART_HEAD:
                raise MultipartError(f"a multipart part's head is over {MAX_PART_HEAD} bytes")
            raise MultipartError("the body ends inside a multipart part's head")
        name, filename, content_type = _part_head(bytes(view[position:head_end]))
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise MultipartError("the body ends before its closing multipart boundary")
        parts.append(Part(name, filename, content_type, view[start:end]))
        position = end + 2 + len(delimiter)
