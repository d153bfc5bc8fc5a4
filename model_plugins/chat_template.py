"""Chat templates that place video parts.

llava-hf checkpoints ship a template that renders only ``text`` and ``image`` parts: a
``{"type": "video"}`` part would silently vanish from the prompt. ``with_video_parts``
extends any template that renders every image part as one image token, in document
order, so that a video part renders exactly where and how an image part would, with the
video token instead; it proves this on probe conversations before returning it.
"""

from __future__ import annotations

from collections.abc import Callable

# llava-1.5 conversation format (USER:/ASSISTANT:); content may be a string or typed parts
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% elif message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen-VL-Chat's ChatML with its own image tags (RED-VILLM): an image part is "Picture n: <img></img>",
# a video part "Video n: <img><imgpad></img>" (two distinct token sequences the processor expands
# to <img> + pads + </img>), each followed by a newline, text parts verbatim.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- set fw = namespace(pictures=0, videos=0) -%}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{% set fw.pictures = fw.pictures + 1 %}"
    "Picture {{ fw.pictures }}: <img></img>\n"
    "{% elif part['type'] in ('video', 'video_url') %}{% set fw.videos = fw.videos + 1 %}"
    "Video {{ fw.videos }}: <img><imgpad></img>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The source template runs unchanged inside a macro on the messages with every video part
# turned into an image part; the k-th image token it emits then becomes the k-th media
# part's own token. IMAGE/VIDEO/SOURCE are substituted by ``with_video_parts``.
_WRAPPER = (
    "{#- framewise: video parts render where the template below renders image parts -#}\n"
    "{%- set fw = namespace(messages=[], tokens=[]) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['content'] is string -%}\n"
    "{%- set fw.messages = fw.messages + [message] -%}\n"
    "{%- else -%}\n"
    "{%- set fw_parts = namespace(items=[]) -%}\n"
    "{%- for part in message['content'] -%}\n"
    "{%- if part['type'] == 'video' -%}\n"
    "{%- set fw_parts.items = fw_parts.items + [{'type': 'image'}] -%}\n"
    "{%- set fw.tokens = fw.tokens + [@VIDEO@] -%}\n"
    "{%- else -%}\n"
    "{%- if part['type'] == 'image' -%}{%- set fw.tokens = fw.tokens + [@IMAGE@] -%}{%- endif -%}\n"
    "{%- set fw_parts.items = fw_parts.items + [part] -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set fw.messages = fw.messages + [dict(message, content=fw_parts.items)] -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- macro fw_source(messages) %}@SOURCE@{% endmacro -%}\n"
    "{%- set fw_pieces = fw_source(fw.messages).split(@IMAGE@) -%}\n"
    "{%- if fw_pieces | length != fw.tokens | length + 1 -%}\n"
    "{{- raise_exception('the chat template placed ' ~ (fw_pieces | length - 1) ~ ' image tokens for '"
    " ~ (fw.tokens | length) ~ ' image/video parts') -}}\n"
    "{%- endif -%}\n"
    "{%- for piece in fw_pieces -%}\n"
    "{{- piece -}}{%- if not loop.last -%}{{- fw.tokens[loop.index0] -}}{%- endif -%}\n"
    "{%- endfor -%}"
)

Render = Callable[[str, list, bool], str]
"""``render(template, messages, add_generation_prompt)`` -> prompt text (e.g. the tokenizer's
``apply_chat_template(..., tokenize=False)``, so the template sees the checkpoint's globals)."""


class ChatTemplateError(ValueError):
    pass


def _text(s: str) -> dict:
    return {"type": "text", "text": s}


IMAGE = {"type": "image"}
VIDEO = {"type": "video"}

# image-only conversations; every image part of each is also tried as a video
PROBES: list[list[dict]] = [
    [{"role": "user", "content": [IMAGE, _text("What is shown here?")]}],
    [{"role": "user", "content": [_text("Compare"), IMAGE, _text("with"), IMAGE]}],
    [{"role": "system", "content": [_text("Answer briefly.")]},
     {"role": "user", "content": [IMAGE, _text("Describe it.")]},
     {"role": "assistant", "content": [_text("A red ball rolls.")]},
     {"role": "user", "content": [_text("And then?"), IMAGE]}],
]


def _as_video(messages: list[dict], which: set[int]) -> list[dict]:
    """A copy of ``messages`` with the image parts numbered in ``which`` turned into video parts."""
    out, k = [], 0
    for m in messages:
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                parts.append(VIDEO if k in which else p)
                k += 1
            else:
                parts.append(p)
        out.append({**m, "content": parts})
    return out


def _replace_nth(text: str, old: str, new: str, which: set[int]) -> str:
    pieces = text.split(old)
    out = pieces[0]
    for i, piece in enumerate(pieces[1:]):
        out += (new if i in which else old) + piece
    return out


def check_video_parts(template: str, reference: str, render: Render, image_token: str, video_token: str) -> None:
    """Raise ``ChatTemplateError`` unless ``template`` renders every probe conversation as
    ``reference`` does, and each with any of its image parts as video parts as ``reference``
    renders it with those image tokens replaced by ``video_token``."""
    checked = 0
    for probe in PROBES:
        n = sum(p["type"] == "image" for m in probe for p in m["content"])
        for gen in (True, False):
            try:
                expected = render(reference, probe, gen)
            except Exception:  # noqa: BLE001 - a conversation shape the template rejects
                continue
            if expected.count(image_token) != n:
                raise ChatTemplateError(f"the template renders {expected.count(image_token)} {image_token} "
                                        f"for {n} image parts, so a video part has no place to go")
            for which in [set(), *({i} for i in range(n)), set(range(n))]:
                got = render(template, _as_video(probe, which), gen)
                want = _replace_nth(expected, image_token, video_token, which)
                if got != want:
                    raise ChatTemplateError(f"with video parts {sorted(which)} the template renders {got!r}, "
                                            f"expected {want!r}")
            checked += 1
    if not checked:
        raise ChatTemplateError("the template rejects every probe conversation of typed content parts")


def with_video_parts(template: str | None, render: Render, *, image_token: str = "<image>",
                     video_token: str = "<video>") -> str:
    """``template`` if it already places video parts, else ``template`` wrapped so it does
    (same conversation format); the llava-1.5 template when there is none."""
    if template is None:
        return LLAVA_15_CHAT_TEMPLATE
    try:
        check_video_parts(template, template, render, image_token, video_token)
        return template
    except ChatTemplateError:
        pass
    wrapped = (_WRAPPER.replace("@IMAGE@", repr(image_token)).replace("@VIDEO@", repr(video_token))
               .replace("@SOURCE@", template))
    check_video_parts(wrapped, template, render, image_token, video_token)
    return wrapped


def as_string_content(messages: list[dict], placeholders: dict[str, str]) -> list[dict]:
    """``messages`` with typed content joined into one string per message, for templates that concatenate
    ``message.content`` as a string (Qwen2.5's, which Video-CCAM v1.2 ships): each media part becomes its
    placeholder and a newline (the authors' ``"<video>\\n{question}"``), text parts are kept verbatim."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(p.get("text", "") if p["type"] == "text" else placeholders[p["type"]] + "\n"
                              for p in content)
        out.append({**m, "content": content})
    return out


def takes_typed_parts(render: Callable[[list[dict]], str], placeholders: dict[str, str]) -> bool:
    """Whether the template places a ``{"type": "video"}`` part itself; False when it fails on typed content or
    renders no placeholder for it (then :func:`as_string_content` is what it needs)."""
    kind = "video" if "video" in placeholders else next(iter(placeholders), None)
    if kind is None:
        return True
    probe = [{"role": "user", "content": [{"type": kind}, _text("What happens?")]}]
    try:
        return placeholders[kind] in render(probe)
    except Exception:  # noqa: BLE001 - the template rejects typed content
        return False
