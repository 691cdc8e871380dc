"""Tokenizers behind one small interface, with chat templates rendered like transformers.

Three implementations share `Tokenizer`:

* `HFTokenizer`: a local Hugging Face folder (`tokenizer.json`, plus `tokenizer_config.json`
  whose `chat_template`, `bos_token`, `eos_token`, `pad_token` and `add_bos_token` are
  honoured; a `chat_template.jinja` file next to it is used too).
* `SentencePieceTokenizer`: a sentencepiece `.model` file.
* `ByteTokenizer`: 256 byte ids plus a few special tokens and a built-in chat template; it
  needs no files and is what the CPU demo trains with.

`load_tokenizer(spec)` picks one: `"byte"`, a folder path, or a `.model` path.

Conventions shared by all three:

* `encode(text)` never adds BOS/EOS by itself; special-token *strings* inside the text
  (e.g. `"<|im_end|>"` that a chat template rendered) become their ids, as in transformers.
  Whether a sequence starts with BOS is decided by the caller (`jaxpost.data.sft`) from
  `add_bos` (the tokenizer's own default) or by the chat template (`{{ bos_token }}`).
* `encode_with_offsets(text)` also returns each token's `(start, end)` character span in
  `text`; the SFT code uses it to find which tokens belong to assistant turns.
* `apply_chat_template(messages, add_generation_prompt=...)` renders with a sandboxed jinja2
  environment with the same helpers transformers provides (`raise_exception`, `tojson`,
  `strftime_now`, `bos_token`, `eos_token`, ...), and returns text.
"""

from __future__ import annotations

import abc
import datetime
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

Offsets = list[tuple[int, int]]
Message = Mapping[str, Any]


# --------------------------------------------------------------------------- templates


class ChatTemplateError(ValueError):
    """A chat template could not be compiled or rendered (the template raised, or is bad)."""


@functools.lru_cache(maxsize=32)
def _compile_chat_template(template: str):
    """Compiles a jinja chat template the way transformers does (sandboxed, trim/lstrip)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        # transformers' `{% generation %}...{% endgeneration %}` marks assistant text for
        # its own mask computation; jaxpost finds assistant spans by rendering prefixes,
        # so the tag only has to render its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template does not compile (line {e.lineno}: {e.message}); it must be "
            "a jinja2 template as in tokenizer_config.json['chat_template']") from e


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """Renders `messages` with a jinja chat template, as transformers' apply_chat_template.

    Args:
        template: jinja2 source of the template.
        messages: conversation, each a mapping with at least `role` and `content`.
        add_generation_prompt: append the header that starts an assistant turn.
        **variables: further template variables (`bos_token`, `eos_token`, `tools`, ...).

    Returns:
        The rendered text.

    Raises:
        ChatTemplateError: if the template raises (e.g. `raise_exception(...)`) or fails.
    """
    import jinja2

    compiled = _compile_chat_template(template)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e


# --------------------------------------------------------------------------- interface


class Tokenizer(abc.ABC):
    """The interface the data pipeline, the sampler and the evals use."""

    #: jinja chat template (None: the tokenizer has none, apply_chat_template raises).
    chat_template: str | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are in [0, vocab_size))."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the tokenizer has none (e.g. Qwen)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id (for chat models, the end-of-turn token), or None."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id written into padding positions (never a target; EOS or 0 if none declared)."""

    @property
    def bos_token(self) -> str | None:
        """Text of the BOS token (what `{{ bos_token }}` renders to)."""
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        """Text of the EOS token (what `{{ eos_token }}` renders to)."""
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    @property
    def add_bos(self) -> bool:
        """Whether sequences that are not chat-templated should start with BOS."""
        return self.bos_id is not None

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens (BOS/EOS/pad, chat-role markers, control pieces): the
        ids `decode(..., skip_special_tokens=True)` drops. Gaze credit gives them nothing."""
        return frozenset(i for i in (self.bos_id, self.eos_id) if i is not None)

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The token string of one id (special tokens as written in text, e.g. "<eos>")."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Token ids of `text` and each token's (start, end) character span in `text`."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added, special-token strings become their ids."""
        return self.encode_with_offsets(text)[0]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are dropped when `skip_special_tokens`."""

    def chat_template_variables(self) -> dict[str, Any]:
        """Variables every chat template sees besides messages/add_generation_prompt."""
        return {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """Renders a conversation with this tokenizer's chat template.

        Args:
            messages: conversation, each `{"role": ..., "content": ...}`.
            add_generation_prompt: end with the header of an assistant turn, so that a
                model continues with the assistant's reply.
            **kwargs: extra template variables (e.g. `tools`, `enable_thinking`).

        Returns:
            The rendered text; encode it with `encode` (it already holds BOS if the
            template writes `{{ bos_token }}`).

        Raises:
            ChatTemplateError: if the tokenizer has no template or the template raises.
        """
        if not self.chat_template:
            raise ChatTemplateError(
                f"{type(self).__name__} has no chat template; give the folder a "
                "tokenizer_config.json with 'chat_template' (or a chat_template.jinja), "
                "or use prompt/completion records instead of chat messages")
        variables = self.chat_template_variables()
        variables.update(kwargs)
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            **variables)


def _special_splitter(specials: Mapping[str, int]) -> re.Pattern | None:
    """A regex that splits text around any of the special-token strings (longest first)."""
    if not specials:
        return None
    alternatives = sorted(specials, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")


def _byte_to_char_offsets(text: str) -> list[int]:
    """Maps every UTF-8 byte index of `text` (and its end) to a character index."""
    if text.isascii():
        return list(range(len(text) + 1))
    out = []
    for i, ch in enumerate(text):
        out.extend([i] * len(ch.encode("utf-8")))
    out.append(len(text))
    return out


# --------------------------------------------------------------------------- byte-level

#: Built-in chat template of ByteTokenizer: role markers are single special tokens, an
#: assistant turn ends with EOS, other turns end where the next marker starts.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the byte tokenizer chat template knows the roles system, user "
    "and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then `<pad>`, `<bos>`, `<eos>` and chat-role markers.

    Needs no files; `decode(encode(s)) == s` for every string. Its chat template renders
    `[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]` as
    `"<bos><|user|>2+2?<|assistant|>4<eos>"` (each `<...>` one token).
    """

    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>")

    def __init__(self):
        self._special_to_id = {s: 256 + i for i, s in enumerate(self.SPECIAL_TOKENS)}
        self._id_to_special = {i: s for s, i in self._special_to_id.items()}
        self._splitter = _special_splitter(self._special_to_id)
        self.chat_template = BYTE_CHAT_TEMPLATE

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        if self.chat_template != BYTE_CHAT_TEMPLATE or kwargs:
            return super().apply_chat_template(messages, add_generation_prompt, **kwargs)
        # The built-in template in plain Python: the same text as the jinja rendering
        # (pinned by tests), ~20x cheaper, which matters for the CPU demo's data rate.
        out = ["<bos>"]
        for m in messages:
            role = m["role"]
            if role not in ("system", "user", "assistant"):
                raise ChatTemplateError(
                    "chat template failed to render: the byte tokenizer chat template "
                    f"knows the roles system, user and assistant, not {role}")
            out.append(f"<|{role}|>{m['content']}")
            if role == "assistant":
                out.append("<eos>")
        if add_generation_prompt:
            out.append("<|assistant|>")
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIAL_TOKENS)

    @property
    def pad_id(self) -> int:
        return self._special_to_id["<pad>"]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._id_to_special)

    @property
    def bos_id(self) -> int:
        return self._special_to_id["<bos>"]

    @property
    def eos_id(self) -> int:
        return self._special_to_id["<eos>"]

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        if 0 <= token_id < 256:
            return bytes([token_id]).decode("latin-1")
        raise ValueError(f"id {token_id} is outside the byte tokenizer's [0, {self.vocab_size})")

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        ids: list[int] = []
        offsets: Offsets = []
        pieces = self._splitter.split(text) if text else []
        pos = 0
        for piece in pieces:
            if not piece:
                continue
            if piece in self._special_to_id:
                ids.append(self._special_to_id[piece])
                offsets.append((pos, pos + len(piece)))
            else:
                raw = piece.encode("utf-8")
                ids.extend(raw)
                if len(raw) == len(piece):  # ASCII: byte i is character i
                    offsets.extend((pos + i, pos + i + 1) for i in range(len(raw)))
                else:  # a multi-byte character's bytes all span that one character
                    char_of_byte = _byte_to_char_offsets(piece)
                    offsets.extend((pos + char_of_byte[i], pos + char_of_byte[i] + 1)
                                   for i in range(len(raw)))
            pos += len(piece)
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._id_to_special:
                raise ValueError(
                    f"id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self._id_to_special[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


# --------------------------------------------------------------------------- sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`; its control pieces (`<s>`, `</s>`, ...) are special tokens.

    Args:
        path: path of the `.model` file.
        chat_template: optional jinja chat template (sentencepiece files carry none).
    """

    def __init__(self, path: str | os.PathLike, chat_template: str | None = None):
        self._path = os.fspath(path)
        self.chat_template = chat_template
        with open(self._path, "rb") as f:
            self._proto = f.read()
        self._setup()

    def _setup(self):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        sp = self._sp
        self._special_to_id = {
            sp.id_to_piece(i): i for i in range(sp.get_piece_size())
            if sp.is_control(i) and sp.id_to_piece(i)}
        self._splitter = _special_splitter(self._special_to_id)

    def __getstate__(self):  # picklable for grain worker processes
        return {"path": self._path, "proto": self._proto, "chat_template": self.chat_template}

    def __setstate__(self, state):
        self._path, self._proto = state["path"], state["proto"]
        self.chat_template = state["chat_template"]
        self._setup()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self._path!r})"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        i = self._sp.bos_id()
        return None if i < 0 else i

    @property
    def eos_id(self) -> int | None:
        i = self._sp.eos_id()
        return None if i < 0 else i

    @property
    def pad_id(self) -> int:
        for i in (self._sp.pad_id(), self._sp.eos_id()):
            if i >= 0:
                return i
        return 0

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special_to_id.values())

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"id {token_id} is outside [0, {self.vocab_size}) of {self._path}")
        return self._sp.id_to_piece(int(token_id))

    def _encode_plain(self, text: str, base: int) -> tuple[list[int], Offsets]:
        proto = self._sp.encode(text, out_type="proto")
        char_of_byte = _byte_to_char_offsets(text)
        ids, offsets = [], []
        for p in proto.pieces:
            ids.append(p.id)
            offsets.append((base + char_of_byte[p.begin], base + char_of_byte[p.end]))
        return ids, offsets

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        if self._splitter is None:
            return self._encode_plain(text, 0)
        ids: list[int] = []
        offsets: Offsets = []
        pos = 0
        for piece in self._splitter.split(text):
            if not piece:
                continue
            if piece in self._special_to_id:
                ids.append(self._special_to_id[piece])
                offsets.append((pos, pos + len(piece)))
            else:
                i, o = self._encode_plain(piece, pos)
                ids += i
                offsets += o
            pos += len(piece)
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if not self._sp.is_control(i)])
        # sentencepiece drops control pieces on decode; keep them as their text.
        out, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                out.append(self._sp.decode(run))
                out.append(self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


# --------------------------------------------------------------------------- Hugging Face


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a token from {value!r}; expected a string or "
                     "{'content': str}")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder: `tokenizer.json` (+ `tokenizer_config.json`).

    Args:
        path: folder holding `tokenizer.json`; `tokenizer_config.json`,
            `special_tokens_map.json` and `chat_template.jinja` are read when present.
        chat_template: overrides the folder's template.
    """

    def __init__(self, path: str | os.PathLike, chat_template: str | None = None):
        from tokenizers import Tokenizer as _RustTokenizer

        self._path = os.fspath(path)
        tok_file = os.path.join(self._path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(
                f"{tok_file} not found: an HF tokenizer folder needs tokenizer.json (a "
                "sentencepiece-only folder: pass the .model path instead)")
        self._tok = _RustTokenizer.from_file(tok_file)
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = os.path.join(self._path, name)
            if os.path.isfile(f):
                with open(f, encoding="utf-8") as fh:
                    try:
                        config.update(json.load(fh))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f} is not valid JSON: {e}") from e
        self.config = config
        template = chat_template
        jinja_file = os.path.join(self._path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as fh:
                template = fh.read()
        if template is None:
            template = config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default") or next(iter(named.values()), None)
        self.chat_template = template

        self._bos_token = _token_content(config.get("bos_token"))
        self._eos_token = _token_content(config.get("eos_token"))
        self._pad_token = _token_content(config.get("pad_token"))
        self._unk_token = _token_content(config.get("unk_token"))
        self._bos = self._required_id(self._bos_token, "bos_token")
        self._eos = self._required_id(self._eos_token, "eos_token")
        self._pad = self._required_id(self._pad_token, "pad_token")
        if "add_bos_token" in config:
            self._add_bos = bool(config["add_bos_token"]) and self._bos is not None
        else:  # what the post-processor does when special tokens are added
            ids = self._tok.encode("a", add_special_tokens=True).ids
            self._add_bos = self._bos is not None and bool(ids) and ids[0] == self._bos
        self._special_ids = {
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def _required_id(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(
                f"{self._path}: tokenizer_config.json sets {key}={token!r}, which is not in "
                "the vocabulary of tokenizer.json")
        return i

    def __repr__(self) -> str:
        return f"HFTokenizer({self._path!r})"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int:
        for i in (self._pad, self._eos):
            if i is not None:
                return i
        return 0

    @property
    def special_ids(self) -> frozenset[int]:
        declared = (self._bos, self._eos, self._pad)
        return frozenset(self._special_ids) | {i for i in declared if i is not None}

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    def chat_template_variables(self) -> dict[str, Any]:
        variables = super().chat_template_variables()
        variables["pad_token"] = self._pad_token or ""
        variables["unk_token"] = self._unk_token or ""
        return variables

    def id_to_token(self, token_id: int) -> str:
        t = self._tok.id_to_token(int(token_id))
        if t is None:
            raise ValueError(f"id {token_id} is outside [0, {self.vocab_size}) of {self._path}")
        return t

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------- loading


def load_tokenizer(spec: str | os.PathLike, chat_template: str | None = None) -> Tokenizer:
    """Loads a tokenizer from a spec.

    Args:
        spec: `"byte"` (built-in byte-level tokenizer), a folder with `tokenizer.json`
            (Hugging Face), or a path ending in `.model` (sentencepiece). A folder with
            only `tokenizer.model` loads that sentencepiece model.
        chat_template: overrides the tokenizer's chat template (jinja source).

    Returns:
        The tokenizer.

    Raises:
        ValueError: if the spec names none of these.
    """
    spec = os.fspath(spec)
    if spec == "byte":
        tok: Tokenizer = ByteTokenizer()
        if chat_template is not None:
            tok.chat_template = chat_template
        return tok
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "tokenizer.json")):
            return HFTokenizer(spec, chat_template=chat_template)
        sp_file = os.path.join(spec, "tokenizer.model")
        if os.path.isfile(sp_file):
            return SentencePieceTokenizer(sp_file, chat_template=chat_template)
        raise ValueError(
            f"tokenizer folder {spec!r} has neither tokenizer.json nor tokenizer.model")
    if spec.endswith(".model"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"sentencepiece model {spec!r} does not exist")
        return SentencePieceTokenizer(spec, chat_template=chat_template)
    raise ValueError(
        f"unknown tokenizer spec {spec!r}: expected 'byte', a folder with tokenizer.json, "
        "or a path to a sentencepiece .model file")
