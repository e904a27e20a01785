"""The only converters between the contract's dataclasses and the protobuf messages.

Reading from the wire validates (a `SamplingParams` checks itself when built), so a servicer that
converts an incoming message once holds values it can trust; writing to the wire never fails.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.contract.images import ImageRef
from common.contract.replica import ReplicaInfo
from common.contract.sampling import ContractError, FinishReason, SamplingParams
from common.contract.structured import ConstraintKind, StructuredOutput
from common.contract.videos import VideoRef
from common.rpc import encoder_pb2, language_pb2

_FINISH_TO_PROTO = {
    FinishReason.STOP: language_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: language_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: language_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: language_pb2.FINISH_REASON_ERROR,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def sampling_to_proto(p: SamplingParams) -> language_pb2.SamplingParams:
    m = language_pb2.SamplingParams(
        max_tokens=p.max_tokens or 0,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
    )
    if p.seed is not None:
        m.seed = p.seed
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        m.prompt_logprobs = p.prompt_logprobs
    if p.n != 1:
        m.n = p.n
    if p.structured is not None:
        m.structured.CopyFrom(structured_to_proto(p.structured))
    return m


def sampling_from_proto(m: language_pb2.SamplingParams) -> SamplingParams:
    """Raises ContractError naming the field for values out of range."""
    return SamplingParams(
        max_tokens=m.max_tokens or None,
        temperature=m.temperature,
        top_p=m.top_p if m.HasField("top_p") else 1.0,
        top_k=m.top_k,
        min_p=m.min_p,
        seed=m.seed if m.HasField("seed") else None,
        repetition_penalty=m.repetition_penalty if m.HasField("repetition_penalty") else 1.0,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        stop_token_ids=tuple(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        min_tokens=m.min_tokens,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        prompt_logprobs=m.prompt_logprobs if m.HasField("prompt_logprobs") else None,
        n=m.n or 1,
        structured=structured_from_proto(m.structured) if m.HasField("structured") else None,
    )


def structured_to_proto(s: StructuredOutput) -> language_pb2.StructuredOutput:
    m = language_pb2.StructuredOutput()
    if s.kind == ConstraintKind.JSON_SCHEMA:
        m.json_schema = s.spec
    elif s.kind == ConstraintKind.JSON_OBJECT:
        m.json_object = True
    elif s.kind == ConstraintKind.REGEX:
        m.regex = s.spec
    elif s.kind == ConstraintKind.CHOICE:
        m.choice.values.extend(s.choices)
    else:
        m.grammar = s.spec
    if not s.strict:
        m.strict = False
    if s.after_token is not None:
        m.after_token_id = s.after_token
    return m


def structured_from_proto(m: language_pb2.StructuredOutput) -> StructuredOutput:
    """Raises ContractError for an empty or malformed constraint."""
    kind = m.WhichOneof("kind")
    strict = m.strict if m.HasField("strict") else True
    after = m.after_token_id if m.HasField("after_token_id") else None
    if kind == "json_schema":
        return StructuredOutput(ConstraintKind.JSON_SCHEMA, m.json_schema, strict=strict,
                                after_token=after)  # fmt: skip
    if kind == "json_object":
        return StructuredOutput(ConstraintKind.JSON_OBJECT, strict=strict, after_token=after)
    if kind == "regex":
        return StructuredOutput(ConstraintKind.REGEX, m.regex, after_token=after)
    if kind == "choice":
        return StructuredOutput(ConstraintKind.CHOICE, choices=tuple(m.choice.values),
                                after_token=after)  # fmt: skip
    if kind == "grammar":
        return StructuredOutput(ConstraintKind.GRAMMAR, m.grammar, after_token=after)
    raise ContractError("structured output: no constraint set", "structured_outputs")


def image_ref_to_proto(r: ImageRef) -> language_pb2.ImageRef:
    t, h, w = r.grid
    return language_pb2.ImageRef(
        handle=r.handle, grid_thw=language_pb2.GridTHW(t=t, h=h, w=w), image_hash=r.content_hash
    )


def image_ref_from_proto(m: language_pb2.ImageRef, merge_size: int, index: int = 0) -> ImageRef:
    g = m.grid_thw
    if min(g.t, g.h, g.w) <= 0 or g.h % merge_size or g.w % merge_size:
        raise ContractError(
            f"images: image {index} has grid ({g.t}, {g.h}, {g.w}); t, h and w must be positive "
            f"and h, w multiples of {merge_size}",
            "images",
        )
    n = g.t * g.h * g.w // (merge_size * merge_size)
    return ImageRef(m.handle, (g.t, g.h, g.w), n, m.image_hash)


def image_ref_from_encoded(m: encoder_pb2.EncodedImage) -> ImageRef:
    g = m.grid_thw
    return ImageRef(m.handle, (g.t, g.h, g.w), m.n_tokens, m.image_hash)


def video_ref_to_proto(r: VideoRef) -> language_pb2.VideoRef:
    t, h, w = r.grid
    return language_pb2.VideoRef(
        handle=r.handle, grid_thw=language_pb2.GridTHW(t=t, h=h, w=w), video_hash=r.content_hash,
        first_patch=r.first_patch,
    )  # fmt: skip


def video_ref_from_proto(m: language_pb2.VideoRef, merge_size: int, index: int = 0) -> VideoRef:
    g = m.grid_thw
    if min(g.t, g.h, g.w) <= 0 or g.h % merge_size or g.w % merge_size:
        raise ContractError(
            f"videos: video {index} has grid ({g.t}, {g.h}, {g.w}); t, h and w must be positive "
            f"and h, w multiples of {merge_size}",
            "videos",
        )
    n = g.t * g.h * g.w // (merge_size * merge_size)
    return VideoRef(m.handle, (g.t, g.h, g.w), n, m.video_hash, m.first_patch)


def video_ref_from_encoded(m: encoder_pb2.EncodedVideo) -> VideoRef:
    g = m.grid_thw
    return VideoRef(m.handle, (g.t, g.h, g.w), m.n_tokens, m.video_hash, m.first_patch,
                    tuple(m.timestamps))  # fmt: skip


def generate_request(
    request_id: str,
    prompt_ids: Sequence[int],
    images: Sequence[ImageRef],
    params: SamplingParams,
    videos: Sequence[VideoRef] = (),
) -> language_pb2.GenerateRequest:
    return language_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt_ids),
        images=[image_ref_to_proto(r) for r in images],
        sampling=sampling_to_proto(params),
        videos=[video_ref_to_proto(r) for r in videos],
    )


def replica_info_to_proto(info: ReplicaInfo) -> language_pb2.GetInfoReply:
    return language_pb2.GetInfoReply(
        model_type=info.model_type,
        max_model_len=info.max_model_len,
        host_id=info.host_id,
        block_size=info.block_size,
        vocab_size=info.vocab_size,
    )


def replica_info_from_proto(m: language_pb2.GetInfoReply) -> ReplicaInfo:
    return ReplicaInfo(m.model_type, m.max_model_len, m.host_id, m.block_size, m.vocab_size)


def finish_to_proto(reason: FinishReason) -> language_pb2.FinishReason:
    return _FINISH_TO_PROTO[reason]


def finish_from_proto(value: language_pb2.FinishReason) -> FinishReason:
    return _FINISH_FROM_PROTO.get(value, FinishReason.ERROR)
