"""Tokenizer and chat template for SeedOss checkpoints.

`SeedOssTokenizer` reads an HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``, optional
``chat_template.jinja``) with the `tokenizers` library and renders chat templates with jinja2 exactly the way
transformers does, so ids, offsets, decoded text and prompts match ``AutoTokenizer`` without importing transformers.

`train_demo_tokenizer` builds a small Seed-style byte-level BPE tokenizer from the corpus shipped in
``seedoss/data`` for demo and test checkpoints.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from tokenizers import AddedToken, Encoding, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = [
    "<seed:bos>",
    "<seed:pad>",
    "<seed:eos>",
    "<seed:think>",
    "</seed:think>",
    "<seed:cot_budget_reflect>",
    "</seed:cot_budget_reflect>",
    "<seed:tool_call>",
    "</seed:tool_call>",
]
BOS_TOKEN, PAD_TOKEN, EOS_TOKEN = SPECIAL_TOKENS[:3]
# The thinking, budget-note and tool-call tags are added tokens (one id each, never split) but not *special*: decoding
# with `skip_special_tokens` keeps them, so the reasoning and tool parsers (ours and vLLM's `seed_oss`, which read
# text) see them. Only the turn tokens above are special.
TAG_TOKENS = SPECIAL_TOKENS[3:]
MODEL_MAX_LENGTH = 524288  # Seed-OSS-36B's native context (512K)

# GPT-4/Qwen2-style pre-tokenization: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, and whitespace that does not swallow the space before the next word.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The names of HF's named special tokens; the chat template receives each one the config sets (HF passes
# `tokenizer.special_tokens_map` to the template).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Seed-OSS chat template for the demo tokenizer. It follows Seed-OSS-36B-Instruct's released template: an optional
# system turn (the system message and/or the tool list: by default each tool as a Python-style signature with its
# docstring, with `use_json_tooldef` the JSON list), a system turn about the thinking budget (none for -1 =
# unlimited), one `<seed:bos>{role}\n{content}<seed:eos>` turn per message (`tool` results included), assistant
# reasoning in `<seed:think>...</seed:think>`, tool calls in Seed's XML-like format, and for a budget of 0 a
# generation prompt that opens the think block with a budget reflection. Deviations, on purpose: English wording
# where the released one is Chinese, and non-string tool-call arguments rendered as JSON (`tojson`, which the
# tool parser reads back) where the released one writes Python's `str()`.
CHAT_TEMPLATE = r"""{#- Seed-OSS chat format. -#}
{%- if thinking_budget is not defined or thinking_budget is none %}
    {%- set thinking_budget = -1 %}
{%- endif %}
{#- The model reports its remaining budget every `interval` tokens: the interval of the smallest tier >= budget. #}
{%- set ns = namespace(interval=1024) %}
{%- for tier, interval in [[16384, 1024], [8192, 1024], [4096, 512], [2048, 512], [1024, 256], [512, 128], [0, 0]] %}
    {%- if thinking_budget <= tier %}{% set ns.interval = interval %}{% endif %}
{%- endfor %}
{%- macro py_type(t) -%}
    {%- if t == "string" -%}str
    {%- elif t in ("number", "integer") -%}int
    {%- elif t == "boolean" -%}bool
    {%- elif t == "array" -%}list
    {%- else -%}Any{%- endif -%}
{%- endmacro -%}
{%- if messages[0].role == "system" %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if system_message is defined or tools %}
    {{- bos_token + "system\n" }}
    {%- if system_message is defined %}
        {{- system_message }}
    {%- else %}
        {{- "You are a helpful AI assistant. You may call one or more functions to assist with the user query." }}
    {%- endif %}
    {%- if tools and use_json_tooldef is defined and use_json_tooldef %}
        {{- "\n\nTool List:\nYou are authorized to use the following tools (described in JSON Schema format). " }}
        {{- "Before performing any task, you must decide how to call them based on the descriptions and parameters " }}
        {{- "of these tools.\n" }}
        {{- tools | tojson }}
    {%- elif tools %}
        {%- for item in tools if item.type == "function" %}
            {%- set parameters = item.function.parameters or {} %}
            {%- set properties = parameters.properties or {} %}
            {{- "\n\nFunction:\ndef " + item.function.name + "(" }}
            {%- for name, spec in properties.items() %}
                {{- name + ": " + py_type(spec.type) }}{% if not loop.last %}{{ ", " }}{% endif %}
            {%- endfor %}
            {{- "):\n    \"\"\"\n    " + (item.function.description or "") | trim + "\n" }}
            {%- if properties %}
                {{- "\n    Args:" }}
                {%- for name, spec in properties.items() %}
                    {{- "\n    - " + name + " (" + py_type(spec.type) + ")" }}
                    {{- " [required]:" if name in (parameters.required or []) else " [optional]:" }}
                    {{- " " ~ (spec.description or "") }}
                {%- endfor %}
                {{- "\n" }}
            {%- endif %}
            {{- "    \"\"\"" }}
        {%- endfor %}
    {%- endif %}
    {%- if tools %}
        {{- "\n\nCall tools in the following format:\n<seed:tool_call>\n<function=example_function_name>\n" }}
        {{- "<parameter=example_parameter_1>value_1</parameter>\n" }}
        {{- "<parameter=example_parameter_2>This is the value for the second parameter\nthat can span\n" }}
        {{- "multiple lines</parameter>\n</function>\n</seed:tool_call>\n" }}
    {%- endif %}
    {{- eos_token }}
{%- endif %}
{%- if thinking_budget == 0 %}
    {{- bos_token + "system\n" }}
    {{- "You are an intelligent assistant that can answer questions in one step without the need for reasoning " }}
    {{- "and thinking, that is, your thinking budget is 0. Next, please skip the thinking process and directly " }}
    {{- "start answering the user's questions.\n" + eos_token }}
{%- elif thinking_budget != -1 %}
    {{- bos_token + "system\n" }}
    {{- "You are an intelligent assistant with reflective ability. In the process of thinking and reasoning, " }}
    {{- "you need to strictly follow the thinking budget, which is " ~ thinking_budget ~ ". " }}
    {{- "That is, you need to complete your thinking within " ~ thinking_budget ~ " tokens and start answering " }}
    {{- "the user's questions. You will reflect on your thinking process every " ~ ns.interval ~ " tokens, " }}
    {{- "stating how many tokens have been used and how many are left.\n" + eos_token }}
{%- endif %}
{%- for message in loop_messages %}
    {{- bos_token + message.role }}
    {%- if message.role == "assistant" %}
        {%- if message.reasoning_content is string and message.reasoning_content | trim %}
            {{- "\n<seed:think>" + message.reasoning_content | trim + "</seed:think>" }}
        {%- endif %}
        {%- if message.content is string and message.content | trim %}
            {{- "\n" + message.content | trim }}
            {%- if message.tool_calls %}{{ "\n" }}{% endif %}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
            {%- set arguments = call.arguments if call.arguments is defined else {} %}
            {%- if arguments is not mapping %}
                {{- raise_exception("Tool call arguments must be a mapping, not a JSON string: parse them first.") }}
            {%- endif %}
            {{- "\n<seed:tool_call>\n<function=" + call.name + ">\n" }}
            {%- for name, value in arguments.items() %}
                {{- "<parameter=" + name + ">" + (value if value is string else value | tojson) + "</parameter>\n" }}
            {%- endfor %}
            {{- "</function>\n</seed:tool_call>" }}
        {%- endfor %}
    {%- elif message.content is string %}
        {{- "\n" + message.content }}
    {%- else %}
        {{- raise_exception("Message content must be a string (role " ~ message.role ~ ").") }}
    {%- endif %}
    {{- eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- bos_token + "assistant\n" }}
    {%- if thinking_budget == 0 %}
        {{- "<seed:think><seed:cot_budget_reflect>" }}
    {%- endif %}
{%- endif %}"""


def train_demo_tokenizer(out_dir: str | Path, vocab_size: int = 4096) -> None:
    """Train a byte-level BPE on ``seedoss/data/corpus.txt`` and write ``tokenizer.json`` and
    ``tokenizer_config.json`` (HF layout) to `out_dir`.

    The result is byte-identical on every call: BPE merge ties are broken by pair ids, and the trainer sees the
    corpus as one sequence in a fixed order. Added tokens take ids 0.. in `SPECIAL_TOKENS` order, and the
    post-processor prepends ``<seed:bos>`` when special tokens are added, so HF's ``AutoTokenizer`` encodes the same.
    """
    corpus = (Path(__file__).parent / "data" / "corpus.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([corpus], trainer)
    if tokenizer.get_vocab_size() != vocab_size:  # below the byte alphabet + special tokens, or out of merges
        raise ValueError(f"vocab_size={vocab_size}: the demo corpus gives {tokenizer.get_vocab_size()} tokens")
    tokenizer_json = json.loads(tokenizer.to_str())
    tokenizer_json["post_processor"] = _prepend_bos_processor(tokenizer.token_to_id(BOS_TOKEN))
    for token in tokenizer_json["added_tokens"]:  # the trainer marks every added token special
        token["special"] = token["content"] not in TAG_TOKENS
    tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))

    added = tokenizer.get_added_tokens_decoder()
    config = {
        "added_tokens_decoder": {
            str(token_id): {
                "content": token.content,
                "lstrip": token.lstrip,
                "normalized": token.normalized,
                "rstrip": token.rstrip,
                "single_word": token.single_word,
                "special": token.special,
            }
            for token_id, token in sorted(added.items())
        },
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    config_json = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(config_json, encoding="utf-8")


def _prepend_bos_processor(bos_id: int) -> dict:
    """JSON of a TemplateProcessing post-processor that prepends ``<seed:bos>`` to each sequence. Written as JSON
    because TemplateProcessing's string syntax ("<s> $A:0") splits on ":", which ``<seed:bos>`` contains."""

    def bos(type_id: int) -> dict:
        return {"SpecialToken": {"id": BOS_TOKEN, "type_id": type_id}}

    def sequence(name: str, type_id: int) -> dict:
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {
        "type": "TemplateProcessing",
        "single": [bos(0), sequence("A", 0)],
        "pair": [bos(0), sequence("A", 0), bos(1), sequence("B", 1)],
        "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [bos_id], "tokens": [BOS_TOKEN]}},
    }


class SeedOssTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of its tokenizer config."""

    def __init__(self, tokenizer: Tokenizer, config: Mapping[str, Any], chat_template: str | None):
        self._tokenizer = tokenizer
        self._windowing: Tokenizer | None = None  # a copy with truncation set, for `encode_pair_windows`
        self.model_max_length: int | None = config.get("model_max_length")
        self.special_tokens_map: dict[str, str] = {}
        for name in _NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(name))
            if content is not None:
                self.special_tokens_map[name] = content
        special_ids = {self._token_id(content) for content in self.special_tokens_map.values()}
        extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        for content in extras.values() if isinstance(extras, Mapping) else extras:  # v5 also allows {name: token}
            special_ids.add(self._token_id(_token_content(content)))
        special_ids.update(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
        self.all_special_ids: set[int] = special_ids
        self.bos_token_id = self._named_token_id("bos_token")
        self.cls_token_id = self._named_token_id("cls_token")
        self.eos_token_id = self._named_token_id("eos_token")
        self.pad_token_id = self._named_token_id("pad_token")
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._compiled_template = None if chat_template is None else _JINJA_ENV.from_string(chat_template)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SeedOssTokenizer:
        """Load from an HF tokenizer directory. Like transformers, ``chat_template.jinja`` takes precedence over
        the ``chat_template`` of ``tokenizer_config.json``."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        tokenizer_json = _read_text(tokenizer_file)
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{tokenizer_file}: not a valid tokenizer.json ({exc})") from exc
        config_file = path / "tokenizer_config.json"
        config_json = _read_text(config_file)
        try:
            config = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_file}: not valid JSON ({exc})") from exc
        template_file = path / "chat_template.jinja"
        chat_template = _read_text(template_file) if template_file.is_file() else config.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            # transformers also knows lists of named templates; SeedOss checkpoints have one template.
            raise ValueError(f"{config_file}: chat_template must be a string")
        return cls(tokenizer, config, chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per token, ``(start, end)`` character offsets into `text` (str indices, not bytes). Tokens
        added by the post-processor get ``(0, 0)``; byte-level tokens holding part of a character span that
        whole character."""
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, [tuple(offset) for offset in encoding.offsets]

    def encode_pair_windows(self, text: str, pair: str, max_length: int, stride: int) -> list[Encoding]:
        """The encodings of HF's ``tokenizer(text, pair, truncation="only_second", max_length=max_length,
        stride=stride, return_overflowing_tokens=True)``: the pair with special tokens, `pair` cut into windows
        that repeat the last `stride` tokens of the previous one. Truncation is tokenizer state, so this uses a
        private copy of the tokenizer; the caller checks that the windows can be made (`tokenizers` panics when
        `stride` is not below the room left for `pair`)."""
        if self._windowing is None:
            self._windowing = copy.deepcopy(self._tokenizer)
        self._windowing.enable_truncation(max_length, stride=stride, strategy="only_second")
        encoding = self._windowing.encode(text, pair)
        return [encoding, *encoding.overflowing]

    def num_special_tokens_to_add(self, pair: bool) -> int:
        return self._tokenizer.post_processor.num_special_tokens_to_add(pair) if self._tokenizer.post_processor else 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tokenizer.id_to_token(i) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template as transformers does; extra keyword arguments (for example
        ``thinking_budget``) become template variables and override the special-token variables. With
        `tokenize`, the rendered text is encoded without adding special tokens again (the template wrote them).
        Note the default ``add_generation_prompt=True`` (transformers defaults to False)."""
        if not messages:
            raise ValueError("Cannot apply a chat template to an empty conversation.")
        if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
            raise TypeError("Tools must be JSON-schema dicts.")
        context = {"documents": None, **self.special_tokens_map, **template_kwargs}
        if self._compiled_template is None:
            raise ValueError("This tokenizer has no chat template.")
        rendered = self._compiled_template.render(
            messages=_normalize_messages(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def _token_id(self, content: str) -> int:
        token_id = self._tokenizer.token_to_id(content)
        if token_id is None:
            raise ValueError(f"Special token {content!r} from the tokenizer config is not in the vocabulary.")
        return token_id

    def _named_token_id(self, name: str) -> int | None:
        content = self.special_tokens_map.get(name)
        return None if content is None else self._token_id(content)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None


def _token_content(value: Any) -> str | None:
    """Special tokens are plain strings in current configs and ``{"content": ...}`` dicts in older ones."""
    return value.get("content") if isinstance(value, Mapping) else value


# Names a message's reasoning may come under; transformers fills `reasoning_content` (and `thinking`) from them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: list[dict]) -> list[dict]:
    """Copy messages the way transformers prepares them: drop keys whose value is None (OpenAI clients send
    ``content: null`` next to ``tool_calls``) and alias the reasoning fields."""
    normalized = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"Chat messages must be dicts, got {message!r}.")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used by templates to mark assistant tokens for
    transformers' assistant masks) and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes, as transformers' sandbox does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot set underscore attributes ({name!r})")


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (no attribute tricks on the class)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """transformers' `tojson`: plain `json.dumps` (jinja's own escapes HTML characters and sorts keys)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _make_jinja_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (chat templates are untrusted code: sandboxed)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_JINJA_ENV = _make_jinja_env()
