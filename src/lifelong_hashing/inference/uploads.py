"""Photo queries as the service receives them: a multipart upload or base64 in JSON.

Content types are strict: a request body is ``application/json`` (also assumed when the header
is absent) or ``multipart/form-data``, anything else is a 415; in a multipart request every file
part is ``image/jpeg`` or ``image/png`` and agrees with its own magic bytes. What a photo may cost
once it is bytes (size, declared pixels, decoding) is ``images.decode_photo``'s, as for batches.
"""

from __future__ import annotations

import base64
import binascii
import json

from lifelong_hashing.engine.batch import shown
from lifelong_hashing.engine.images import PhotoError, photo_format
from lifelong_hashing.inference.retrieval import QueryError

PHOTO_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}
FILE_FIELD = "image"  # the multipart field of the photos, one part per query
INTEGER_FIELDS = ("k", "radius")
JSON_FIELDS = ("filter",)  # objects, sent as JSON text in a form field


class UnsupportedMedia(ValueError):
    """A body or part whose declared type the service does not take (HTTP 415)."""


def body_kind(content_type: str | None) -> str:
    """``json`` or ``multipart`` from the Content-Type header, or UnsupportedMedia."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media == "application/json":
        return "json"
    if media == "multipart/form-data":
        return "multipart"
    raise UnsupportedMedia(f"Content-Type {shown(media, 80)} is not taken: send application/json, or "
                           "multipart/form-data with photos in 'image' parts")


def base64_photos(items: list[str]) -> list[bytes]:
    """The ``images`` of a JSON query as bytes: strict base64, a ``data:image/...;base64,`` prefix allowed."""
    out = []
    for i, item in enumerate(items):
        head, comma, tail = item.partition(",")
        data = tail if comma and head.startswith("data:") else item
        try:
            out.append(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError) as err:
            raise QueryError(f"images[{i}]: not base64 ({err})") from None
    return out


async def multipart_query(request, max_files: int) -> tuple[dict, list[bytes]]:
    """A multipart request's form fields (``k`` and ``radius`` as integers where they are, a
    ``filter`` decoded from JSON) and its photos, in order; ``modality`` defaults to ``image``."""
    try:
        form = await request.form(max_files=max_files, max_fields=len(INTEGER_FIELDS) + len(JSON_FIELDS) + 3)
    except Exception as err:  # noqa: BLE001 - Starlette raises its own types for a malformed body
        raise QueryError(f"malformed multipart body: {shown(err, 120, quoted=False)}") from None
    fields: dict = {"modality": "image"}
    files: list[bytes] = []
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = _form_value(name, value)
        elif name != FILE_FIELD:
            raise QueryError(f"file part {shown(name)}: photos go in '{FILE_FIELD}' parts")
        else:
            files.append(await _photo_part(value, len(files)))
    await form.close()
    if not files:
        raise QueryError(f"no photos: send one or more '{FILE_FIELD}' file parts")
    return fields, files


def _form_value(name: str, value: str):
    if name in INTEGER_FIELDS and value.lstrip("-").isdigit():
        return int(value)
    if name in JSON_FIELDS:
        try:
            return json.loads(value)
        except ValueError as err:
            raise QueryError(f"form field {name!r}: not JSON ({err})") from None
    return value


async def _photo_part(upload, index: int) -> bytes:
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared not in PHOTO_TYPES:
        raise UnsupportedMedia(f"photo {index}: part type {shown(declared or 'none', 60)}; "
                               "send image/jpeg or image/png")
    data = await upload.read()
    try:
        actual = photo_format(data)
    except PhotoError as err:
        raise QueryError(f"photo {index}: {err}") from None
    if actual != PHOTO_TYPES[declared]:
        raise QueryError(f"photo {index}: declared {declared} but the file is a {actual}")
    return data


def multipart_schema(json_schema: dict) -> dict:
    """The OpenAPI schema of the multipart form beside a JSON body's schema: its scalar fields,
    plus the photos as binary parts."""
    props = {k: v for k, v in json_schema["properties"].items() if k not in ("features", "words", "images")}
    props.update({name: {"type": "string", "description": f"the {name} object as JSON text"}
                  for name in JSON_FIELDS if name in props})
    props[FILE_FIELD] = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                         "description": "JPEG or PNG photos (image/jpeg, image/png), one query each"}
    return {"type": "object", "properties": props, "required": [FILE_FIELD]}
