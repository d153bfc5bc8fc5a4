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
    # "keyframe": the nearest keyframe inside each sampled instant's segment (far less decoding on long videos
    # with sparse keyframes), else the exact frame; default: the server's --video-seek, the model's, "exact"
    seek: Literal["exact", "keyframe"] | None = None

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
    return_token_ids: bool = Field(False, description="vLLM's extension: the prompt's token ids "
                                   "(`prompt_token_ids`) and each choice's generated ids (`token_ids`) in the answer "
                                   "(streamed: the prompt's in the first chunk, the new ids in each delta's choice)")
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None = (
        Field(None, description="token id (a decimal string) -> bias added to its logit, -100 to 100 (OpenAI's "
              "rule); ids outside the vocabulary are refused (400 `invalid_request`)"))
    # OpenAI fields Framewise does not implement: accepted in their no-op form only (`response_format`
    # {"type": "text"}, `tool_choice`/`function_call` "none", empty `tools`/`functions`), else refused
    # (400 `unsupported_parameter` naming the field: see :meth:`unsupported_parameter`), never silently dropped
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    audio: dict | None = None
    prediction: dict | None = None
    framewise: FramewiseOptions | None = None

    def unsupported_parameter(self) -> tuple[str, str] | None:
        """``(field, reason)`` for the first field set to something Framewise would have to ignore."""
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return "response_format", (f"response_format type {self.response_format.get('type')!r} is not "
                                       "supported (structured outputs are not implemented); only 'text'")
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, f"{name} (function calling) is not supported"
        for name in ("tool_choice", "function_call"):
            value = getattr(self, name)
            if value is not None and value != "none":
                return name, f"{name} other than 'none' is not supported (function calling is not implemented)"
        for name in ("audio", "prediction"):
            if getattr(self, name) is not None:
                return name, f"{name} is not supported"
        return None

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
