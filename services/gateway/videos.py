"""A request's videos at the gateway: planned from their headers, cut into chunks to encode.

Before anything is encoded, every video is planned exactly as the encoder will process it
(`common.contract.videos.plan_video`: sampled frames, grid, timestamps), so the prompt (its
timestamp text and video-pad runs) is complete and checked against the replica first. A video
of more than `--video-chunk-patches` patches is cut into chunks of whole temporal patches; each
chunk is one Encode call. Chunk k goes to the k-th encoder in the video's rendezvous ranking, so
the chunks of one video spread over the encoders (one each while there are enough) and the same
chunk meets the same cache again.
The language service receives the chunks in order; each temporal patch is its own run of tokens
there, so a chunked video is exactly the whole one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from common.contract import VideoPlan, VideoPreprocessConfig, VideoSampling, plan_video
from common.contract.videos import chunk_patches
from common.rpc import encoder_pb2
from services.gateway.media import Video

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class VideoChunk:
    """Temporal patches first..first+count-1 of the request's video `index`."""

    index: int  # the video's place among the request's videos
    video: Video
    plan: VideoPlan
    sampling: VideoSampling
    first: int
    count: int
    ordinal: int = 0  # k: the video's k-th chunk

    def route(self, ranked: list[T]) -> list[T]:
        """The encoders in the order this chunk tries them: the video's ranking rotated by k."""
        if not ranked:
            return ranked
        k = self.ordinal % len(ranked)
        return ranked[k:] + ranked[:k]

    @property
    def timestamps(self) -> tuple[float, ...]:
        return self.plan.timestamps[self.first : self.first + self.count]

    def tokens(self, merge: int) -> int:
        return self.count * self.plan.tokens_per_patch(merge)

    def patch_counts(self, merge: int) -> list[int]:
        return [self.plan.tokens_per_patch(merge)] * self.count

    def encode_request(self, consumer_host: str) -> encoder_pb2.EncodeRequest:
        whole = self.first == 0 and self.count == self.plan.grid[0]
        data = encoder_pb2.VideoData(
            data=self.video.data,
            content_hash=self.video.sha256,
            fps=self.sampling.fps,
            max_frames=self.sampling.max_frames,
            first_patch=self.first,
            num_patches=0 if whole else self.count,
        )
        return encoder_pb2.EncodeRequest(videos=[data], consumer_host=consumer_host)


def plan_chunks(
    videos: list[Video], sampling: VideoSampling, cfg: VideoPreprocessConfig, max_patches: int
) -> tuple[list[VideoPlan], list[VideoChunk]]:
    """Every video's plan and its chunks, in order; ValueError("video i: ...") if one cannot be
    processed (too few frames, an aspect ratio beyond 200, ...)."""
    plans: list[VideoPlan] = []
    chunks: list[VideoChunk] = []
    for i, video in enumerate(videos):
        try:
            plan = plan_video(video.info, sampling, cfg)
        except ValueError as e:
            raise ValueError(f"video {i}: {e}") from None
        plans.append(plan)
        for k, (first, count) in enumerate(chunk_patches(plan.grid, max_patches)):
            chunks.append(VideoChunk(i, video, plan, sampling, first, count, k))
    return plans, chunks
