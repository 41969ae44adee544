"""Random Chat Completions bodies built from every billed field (hypothesis strategies),
with what the oracle needs to bill them: the remote images' sizes and the uploaded files.

Messages of every role, text, images of every format, size and detail (data URLs and
remote ones), audio (WAV and MP3 at several bitrates), files (inline PDFs and file ids),
tools and functions with nested JSON schemas, ``tool_choice``, ``response_format``,
``n`` and both cap fields, on every model family of the vision guide and one it does
not name.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.support import media

#: Each family of the vision guide, and a model it does not list.
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
          "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4o-2024-08-06", "mystery-model"]  # fmt: skip
REMOTE = {f"https://images.test/{n}.png": size for n, size in enumerate(
    [(64, 64), (1024, 1024), (768, 2048), (4000, 3000), (513, 513), (2049, 513)])}  # fmt: skip
FILES = {"file-small": media.pdf(1), "file-book": media.pdf(12, "chapter " * 400)}

texts = st.text(max_size=200)
names = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
details = st.sampled_from([None, "auto", "low", "high"])


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["png", "jpeg", "gif", "webp", "VP8L", "VP8X", "remote"]))
    if kind == "remote":
        return media.image_part(draw(st.sampled_from(sorted(REMOTE))), draw(details))
    width, height = draw(sizes)
    if kind in ("webp", "VP8L", "VP8X"):
        width, height = min(width, 16383), min(height, 16383)
        data = media.webp(width, height, "VP8 " if kind == "webp" else kind)
    else:
        data = {"png": media.png, "gif": media.gif}.get(kind, media.jpeg)(width, height)
    return media.image_part(media.data_url(data, f"image/{kind}"), draw(details))


@st.composite
def audio(draw):
    seconds = draw(st.floats(0.1, 30))
    if draw(st.booleans()):
        rate = draw(st.sampled_from([8_000, 16_000, 24_000]))
        return media.audio_part(media.wav(seconds, rate), "wav")
    return media.audio_part(media.mp3(seconds, draw(st.sampled_from([8, 16, 64, 128]))), "mp3")


files = st.one_of(
    st.sampled_from(sorted(FILES)).map(lambda name: media.file_part(file_id=name)),
    st.integers(1, 4).map(lambda pages: media.file_part(media.pdf(pages))),
)
parts = st.one_of(texts.map(lambda text: {"type": "text", "text": text}), images(), audio(), files)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "developer", "assistant"]), "content": texts},
            optional={"name": names},
        ),
        st.fixed_dictionaries(
            {"role": st.just("user"), "content": st.one_of(texts, st.lists(parts, max_size=4))}
        ),
        st.fixed_dictionaries(
            {
                "role": st.just("assistant"),
                "content": st.none(),
                "tool_calls": st.lists(
                    st.fixed_dictionaries(
                        {
                            "id": names,
                            "type": st.just("function"),
                            "function": st.fixed_dictionaries({"name": names, "arguments": texts}),
                        }
                    ),
                    max_size=2,
                ),
            }
        ),
        st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": names, "content": texts}),
    ),  # fmt: skip
    min_size=1,
    max_size=5,
)
schemas = st.recursive(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "null"])},
        optional={"description": texts, "enum": st.lists(texts, min_size=1, max_size=5)},
    ),
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(names, inner, max_size=5)},
            optional={"description": texts, "required": st.lists(names, max_size=3)},
        ),
        st.fixed_dictionaries(
            {"type": st.just("array"), "items": inner}, optional={"description": texts}
        ),
        st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=3)}),
    ),  # fmt: skip
    max_leaves=12,
)
functions = st.fixed_dictionaries(
    {"name": names},
    optional={
        "description": texts,
        "parameters": st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(names, schemas, max_size=5)},
            optional={"required": st.lists(names, max_size=3)},
        ),
    },
)
response_formats = st.one_of(
    st.just({"type": "text"}),
    st.just({"type": "json_object"}),
    st.builds(
        lambda name, schema, strict: {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": strict},
        },
        names,
        schemas,
        st.booleans(),
    ),  # fmt: skip
)
tool_choices = st.one_of(
    st.sampled_from(["auto", "none", "required"]),
    names.map(lambda name: {"type": "function", "function": {"name": name}}),
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS), "messages": messages},
    optional={
        "tools": st.lists(functions.map(lambda f: {"type": "function", "function": f}),
                          max_size=4),
        "functions": st.lists(functions, min_size=1, max_size=3),
        "tool_choice": tool_choices,
        "response_format": response_formats,
        "n": st.integers(1, 3),
        "max_tokens": st.integers(1, 400),
        "max_completion_tokens": st.integers(1, 400),
    },
)  # fmt: skip
