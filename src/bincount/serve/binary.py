"""The V2 binary tensor data extension, read at the edge of the server.

Such a request is a JSON header (`Inference-Header-Content-Length` gives its length) followed by raw tensor bytes:
each input whose `parameters` hold `binary_data_size` takes that many bytes, in input order; a BYTES tensor is its
elements, each a 4-byte little-endian length and that many bytes. kserve's client sends BYTES this way by default,
and kserve 0.21 decodes such elements as UTF-8 text, which image files are not. So the request is rewritten into
the same request in plain JSON, BYTES elements as base64 strings, before kserve reads it: the predictor reads one
form, and checks it the same way.
"""

from __future__ import annotations

import base64

import orjson

from bincount.serve.errors import RequestError

LENGTH_BYTES = 4


def to_json(body: bytes, header_length: bytes) -> bytes:
    """The JSON form of a binary-extension request; a `RequestError` (400) names what does not add up."""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise RequestError(f"Inference-Header-Content-Length {header_length.decode(errors='replace')!r} is not a "
                           f"length within the {len(body)}-byte body")
    offset = int(header_length)
    try:
        request = orjson.loads(body[:offset])
    except orjson.JSONDecodeError as e:
        raise RequestError(f"the JSON header of the binary request is not JSON ({e})") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(tensor, dict) for tensor in inputs):
        raise RequestError('the JSON header of the binary request needs "inputs": [{...}, ...]')
    for tensor in inputs:
        parameters = tensor.get("parameters")
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue
        where = f"input {tensor.get('name')}"
        size = parameters.pop("binary_data_size")
        if tensor.get("datatype") != "BYTES":
            raise RequestError(f"{where}: binary data is read for BYTES inputs only, got {tensor.get('datatype')}")
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise RequestError(f"{where}: binary_data_size {size!r} runs past the end of the body")
        tensor["data"] = [base64.b64encode(e).decode() for e in _elements(body[offset:offset + size], where)]
        offset += size
    if offset != len(body):
        raise RequestError(f"{len(body) - offset} byte(s) after the inputs' binary data")
    return orjson.dumps(request)


def _elements(data: bytes, where: str) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        size = int.from_bytes(data[i:i + LENGTH_BYTES], "little")
        i += LENGTH_BYTES
        if i + size > len(data):
            raise RequestError(f"{where}: element {len(out)}'s length {size} runs past the input's binary data")
        out.append(data[i:i + size])
        i += size
    return out
