"""OpenAI chat-completions request schema with Framewise's ``video_url`` part."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_SAMPLING_FPS = 1000.0  # frames sampled per second of video, at most (a finite span * fps stays finite)


class VideoURL(BaseModel):
    # finite numbers only: an infinite fps or time overflowed in frame planning (400 decode_failed, OverflowError)
    model_config = ConfigDict(allow_inf_nan=False)

    url: str
    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, le=MAX_SAMPLING_FPS)
    start: float | None = Field(None, ge=0)
    end: float | None = Field(None, gt=0)

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: float | None, info: ValidationInfo):
        start = info.data.get("start")  # absent when start itself was refused
        if end is not None and start is not None and end <= start:
            raise PydanticCustomError("end_not_after_start", "end ({end}) must be greater than start ({start})",
                                      {"end": end, "start": start})
        return end


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


def _content_kind(v) -> str:
    return "parts" if isinstance(v, list) else "text"


# a string or a list of parts, chosen by the input's own shape: an invalid part is reported as that part's error
# (a plain union reported the string branch first: "content.str: Input should be a valid string")
MessageContent = Annotated[Annotated[str, Tag("text")] | Annotated[list[ContentPart], Tag("parts")],
                           Discriminator(_content_kind)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: MessageContent | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class FramewiseOptions(BaseModel):
    """Framewise's request extensions (the OpenAI SDKs send them with ``extra_body``)."""

    return_frames: Literal["none", "thumbnails"] = Field(
        "none", description="`thumbnails`: each `framewise.media[]` item of the response carries `thumbnails`, "
        "the frames given to the model (after its image processor's resize and crop) as JPEG data URLs aligned "
        "with `timestamps`; longest side <= 160 px, each <= 16 KiB, at most 64 per response")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # vLLM refuses non-finite values

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed accepts
    n: int = Field(1, ge=1, le=8)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # vLLM's extensions to the OpenAI schema (the SDK sends them with extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    framewise: FramewiseOptions | None = None

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @model_validator(mode="after")
    def _min_tokens(self):
        limit = self.max_completion_tokens or self.max_tokens
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise ValueError("min_tokens must not exceed max_tokens / max_completion_tokens")
        return self
