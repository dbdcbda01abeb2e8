"""Protobuf wire format of ``tinkerkit serve``: the SDK's own generated messages, the other way round.

The ``tinker`` SDK (0.38.0) sends ``forward_backward`` requests as a
``tinker.proto.tinker_public_pb2.ForwardBackwardRequest`` (optionally zstd-compressed) and accepts
``ForwardBackwardOutput`` and ``SampleResponse`` results only as protobuf. The SDK ships the
encoder of requests (``tinker.proto.request_conv``) and the decoder of responses
(``tinker.proto.response_conv``); this module is their inverse for the server side:

* :func:`parse_forward_backward` and :func:`forward_backward_request`: request bytes -> the
  message -> ``tinker.types.ForwardBackwardRequest``.
* :func:`encode_forward_backward_output`: ``ForwardBackwardOutput`` -> bytes. Each
  ``loss_fn_outputs`` field becomes one ``BatchedTensor``: the per-datum arrays concatenated in
  ``data``, their byte offsets (int64, ``n + 1`` entries) in ``offsets``, and the shape after the
  first dimension in ``trailing_shape`` (the layout ``response_conv`` reads back).
* :func:`encode_sample_response`: ``SampleResponse`` -> bytes (tokens int32, logprobs float32,
  prompt logprobs float32 with NaN where there is none, top-k as row-major ``[N, K]`` matrices).
"""

from __future__ import annotations

import math

import numpy as np
import pydantic
from google.protobuf.message import DecodeError
from tinker import types
from tinker.proto import tinker_public_pb2 as public_pb

# The SDK's inverse of its own request encoder (`request_conv._tensor_data_to_proto`): dense and
# sparse CSR tensors, dtypes collapsed to float32/int64. The SDK is pinned (pyproject.toml).
from tinker.proto.response_conv import _tensor_data_from_proto

from tinkerkit.errors import RequestError

PROTO_CONTENT_TYPE = "application/x-protobuf"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest ``forward_backward`` message accepted, as sent or after zstd decompression (64 MiB).
The SDK sends a batch in chunks of about 5 MB (``ClientConfigResponse.fwdbwd_max_chunk_bytes_count``),
so only a single datum of millions of tokens comes near it."""

_STOP_REASONS = {"stop": public_pb.STOP_REASON_STOP, "length": public_pb.STOP_REASON_LENGTH}
_DTYPES = {np.dtype(np.float32): public_pb.DTYPE_FLOAT32, np.dtype(np.int64): public_pb.DTYPE_INT64}


def decompress(body: bytes, encoding: str | None) -> bytes:
    """Undo a request's ``Content-Encoding`` (``zstd`` or none).

    Raises:
        RequestError: 400 for another encoding, a corrupted frame or a frame that would
            decompress past :data:`MAX_MESSAGE_BYTES` (413).
    """
    if not encoding or encoding == "identity":
        return body
    if encoding != "zstd":
        raise RequestError(400, f"Content-Encoding '{encoding}' is not supported (zstd only)")
    import zstandard

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body)
        data = reader.read(MAX_MESSAGE_BYTES + 1)
    except zstandard.ZstdError as e:
        raise RequestError(400, f"request body is not a valid zstd frame: {e}") from e
    if len(data) > MAX_MESSAGE_BYTES:
        raise RequestError(413, f"request body decompresses to more than {MAX_MESSAGE_BYTES} "
                                "bytes")
    return data


def _chunk(datum_index: int, chunk: public_pb.Chunk) -> types.EncodedTextChunk:
    kind = chunk.WhichOneof("chunk")
    if kind != "encoded_text":
        raise RequestError(400, f"datum {datum_index}: model_input chunk '{kind or 'empty'}' is "
                                "not supported by tinkerkit serve (token chunks only)")
    raw = chunk.encoded_text.tokens
    if len(raw) % 4:
        raise RequestError(400, f"datum {datum_index}: encoded_text.tokens is not int32 bytes")
    return types.EncodedTextChunk(tokens=np.frombuffer(raw, dtype=np.int32).tolist())


def _tensor(msg: public_pb.Tensor) -> types.TensorData:
    """A dense ``TensorData`` of a ``Tensor`` message; a sparse CSR one is checked and densified
    here, so a bad one is a 400 and not an engine failure.

    Raises:
        ValueError: Unknown dtype, data that do not fit the shape, invalid CSR indices, or a
            sparse tensor of more elements than a dense one of the message size limit holds.
    """
    tensor = _tensor_data_from_proto(msg)
    if tensor.sparse_crow_indices is None:
        return tensor
    if any(size < 0 for size in tensor.shape) or math.prod(tensor.shape) > MAX_MESSAGE_BYTES // 4:
        raise ValueError(f"sparse tensor of shape {tensor.shape} is negative or too large")
    try:
        return types.TensorData.from_numpy(tensor.to_numpy())
    except (RuntimeError, AssertionError, IndexError, TypeError) as e:
        raise ValueError(f"invalid sparse CSR tensor: {e}") from e


def _datum(index: int, msg: public_pb.Datum) -> types.Datum:
    chunks = [_chunk(index, chunk) for chunk in msg.model_input]
    inputs = {}
    for name, tensor in msg.loss_fn_inputs.items():
        try:
            inputs[name] = _tensor(tensor)
        except ValueError as e:
            raise RequestError(400, f"datum {index}: loss_fn_inputs['{name}']: {e}") from e
    # Provenance spans only feed features tinkerkit serve does not offer (stability records).
    return types.Datum(model_input=types.ModelInput(chunks=chunks), loss_fn_inputs=inputs)


def _loss_fn_config(msg: public_pb.ForwardBackwardRequest) -> dict[str, float | str] | None:
    if msg.loss_fn_config_v2:  # servers prefer v2 when it is set (SDK request_conv)
        return {key: getattr(value, value.WhichOneof("value") or "number")
                for key, value in msg.loss_fn_config_v2.items()}
    return dict(msg.loss_fn_config) or None


def parse_forward_backward(body: bytes) -> public_pb.ForwardBackwardRequest:
    """Parse the protobuf ``ForwardBackwardRequest`` message (its datums are read by
    :func:`forward_backward_request`).

    Args:
        body: The (decompressed) request body.

    Raises:
        RequestError: 400 when the bytes are not the message or the model id is missing.
    """
    msg = public_pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except (DecodeError, RuntimeWarning) as e:
        raise RequestError(400, f"body is not a protobuf ForwardBackwardRequest: {e}") from e
    if not msg.model_id:
        raise RequestError(400, "ForwardBackwardRequest.model_id is missing")
    return msg


def forward_backward_request(msg: public_pb.ForwardBackwardRequest
                             ) -> types.ForwardBackwardRequest:
    """The SDK request type of a parsed message; ``seq_id`` is None when the message carries 0
    (the SDK numbers training requests from 1). ``msg.forward_only`` tells ``forward`` from
    ``forward_backward``.

    Raises:
        RequestError: 400 when a datum holds a non-token chunk or an unreadable tensor, or a
            field does not validate as the SDK's type.
    """
    try:
        data = [_datum(i, datum) for i, datum in enumerate(msg.data)]
        return types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(
                data=data, loss_fn=msg.loss_fn, loss_fn_config=_loss_fn_config(msg)),
            model_id=msg.model_id, seq_id=msg.seq_id or None)
    except pydantic.ValidationError as e:
        raise RequestError.invalid("ForwardBackwardRequest", e) from e


def _batched(arrays: list[np.ndarray], trailing: list[int]) -> public_pb.BatchedTensor:
    dtype = arrays[0].dtype
    sizes = [a.nbytes for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return public_pb.BatchedTensor(
        data=b"".join(np.ascontiguousarray(a).tobytes() for a in arrays),
        offsets=offsets.tobytes(), dtype=_DTYPES[dtype], trailing_shape=trailing)


def encode_forward_backward_output(output: types.ForwardBackwardOutput) -> bytes:
    """Serialize a ``ForwardBackwardOutput`` as the SDK's protobuf message.

    Raises:
        ValueError: Datums with other field names, or a field whose dtype or trailing shape
            differs between datums (the engine never produces either).
    """
    msg = public_pb.ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type,
                                          metrics=output.metrics)
    outputs = output.loss_fn_outputs
    record = msg.loss_fn_outputs.add(num_datums=len(outputs))
    names = sorted(outputs[0]) if outputs else []
    for name in names:
        arrays, trailing = [], None
        for i, fields in enumerate(outputs):
            if sorted(fields) != names:
                raise ValueError(f"loss_fn_outputs[{i}] has fields {sorted(fields)}, not {names}")
            tensor = fields[name]
            array = tensor.to_numpy()
            array = array.astype(np.float32 if tensor.dtype == "float32" else np.int64)
            shape = list(tensor.shape) if tensor.shape is not None else [array.size]
            if trailing is not None and shape[1:] != trailing:
                raise ValueError(f"loss_fn_outputs[{i}]['{name}'] has trailing shape "
                                 f"{shape[1:]}, the first datum {trailing}")
            trailing = shape[1:]
            arrays.append(array.reshape(-1))
        if {a.dtype for a in arrays} != {arrays[0].dtype}:
            raise ValueError(f"loss_fn_outputs field '{name}' mixes dtypes between datums")
        record.fields[name].CopyFrom(_batched(arrays, trailing or []))
    return msg.SerializeToString()


def _topk(topk) -> public_pb.TopkLogprobs:
    length, k = topk.token_ids.shape
    return public_pb.TopkLogprobs(
        token_ids=np.ascontiguousarray(topk.token_ids, dtype=np.int32).tobytes(),
        logprobs=np.ascontiguousarray(topk.logprobs, dtype=np.float32).tobytes(),
        k=k, length=length)


def encode_sample_response(response: types.SampleResponse) -> bytes:
    """Serialize a ``SampleResponse`` as the SDK's protobuf message.

    Sequence ids are not part of the message: the SDK stamps the ids that the request's future
    listed (``UntypedAPIFuture.sample_sequence_ids``) onto the decoded sequences.
    """
    msg = public_pb.SampleResponse()
    for sequence in response.sequences:
        seq = msg.sequences.add(
            stop_reason=_STOP_REASONS[sequence.stop_reason],
            tokens=np.asarray(sequence.tokens, dtype=np.int32).tobytes())
        if sequence.logprobs_np is not None:
            seq.logprobs = np.asarray(sequence.logprobs_np, dtype=np.float32).tobytes()
        if sequence.topk_logprobs_np is not None:
            seq.topk_sampled_logprobs.CopyFrom(_topk(sequence.topk_logprobs_np))
    if response.prompt_logprobs_np is not None:
        msg.prompt_logprobs = np.asarray(response.prompt_logprobs_np, dtype=np.float32).tobytes()
    if response.topk_prompt_logprobs_np is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk(response.topk_prompt_logprobs_np))
    return msg.SerializeToString()
