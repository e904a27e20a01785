"""The request contract every role shares: torch-free types, checks and wire converters.

The gateway parses client input into these types, the language servicer converts the wire into
them once, and the engine trusts what it is given. No role imports another role's package; they
meet here and in `proto/`.

- `sampling`: `SamplingParams` (validated when built), `FinishReason`, `ContractError`
- `structured`: `StructuredOutput`, what a request's output must match (JSON schema, regex,
  choice, grammar), and its digest (the compiled-grammar cache key)
- `images`: `PreprocessConfig`, `smart_resize`, image token counts, placeholder expansion,
  `ImageRef`, `ImageLimits`
- `videos`: `VideoPreprocessConfig`, frame sampling, the resize budget across frames, grids,
  timestamps and placeholders (`plan_video`), `VideoRef`, `VideoLimits`
- `replica`: `ReplicaInfo`, `resolve_max_tokens` (the context budget of one request)
- `prompt`: `check_prompt`, the one check of a prompt against a replica's limits
- `faults`: the cause of a failed call, carried in gRPC trailing metadata
- `wire`: the only proto <-> dataclass converters
"""

from common.contract.faults import Cause, Fault, fault_of
from common.contract.images import (
    ImageLimits,
    ImageRef,
    PreprocessConfig,
    expand_image_pads,
    image_grid,
    image_pad_runs,
    image_token_count,
    smart_resize,
)
from common.contract.prompt import PromptLimits, PromptSpans, check_prompt
from common.contract.replica import ReplicaInfo, resolve_max_tokens
from common.contract.sampling import ContractError, FinishReason, SamplingParams, check_token_ids
from common.contract.structured import ConstraintKind, StructuredOutput
from common.contract.videos import (
    VideoInfo,
    VideoLimits,
    VideoPlan,
    VideoPreprocessConfig,
    VideoRef,
    VideoSampling,
    expand_video_placeholders,
    plan_video,
)

__all__ = [
    "Cause",
    "ConstraintKind",
    "ContractError",
    "Fault",
    "FinishReason",
    "ImageLimits",
    "ImageRef",
    "PreprocessConfig",
    "PromptLimits",
    "PromptSpans",
    "ReplicaInfo",
    "SamplingParams",
    "StructuredOutput",
    "VideoInfo",
    "VideoLimits",
    "VideoPlan",
    "VideoPreprocessConfig",
    "VideoRef",
    "VideoSampling",
    "check_prompt",
    "check_token_ids",
    "expand_image_pads",
    "expand_video_placeholders",
    "fault_of",
    "image_grid",
    "image_pad_runs",
    "image_token_count",
    "plan_video",
    "resolve_max_tokens",
    "smart_resize",
]
