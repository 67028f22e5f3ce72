"""SeedOssTokenizer against transformers' AutoTokenizer on the demo tokenizer (transformers is the reference)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from seedoss.tokenizer import SPECIAL_TOKENS, SeedOssTokenizer, train_demo_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF   \n  ",
    "Ça coûte 12,50 € — déjà vu? Straße, Mädchen, ¿qué tal? ñandú",
    "Ελληνικά: καλημέρα κόσμε. Русский: привет, мир! Українська: ґанок",
    "中文：你好，世界。日本語：こんにちは、カタカナ。한국어: 안녕하세요",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵 ✨ and a lone 😀",
    "def f(x):\n    return {'a': [1, 2.5e-3, None]}  # comment\n",
    "<seed:bos>user\nHi<seed:eos><seed:bos>assistant\n",
    "text with <seed:think>reasoning</seed:think> and <seed:tool_call>x</seed:tool_call> inside",
    "near-specials: <seed:bos <seed:eos> > <<seed:pad>> seed:think",
    "rare chars: \u0000 \u200b \ufeff \U0001f9ec \u0301e combining",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_tokenizer")
    train_demo_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return SeedOssTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_special_tokens(ours, hf):
    assert (ours.bos_token_id, ours.pad_token_id, ours.eos_token_id) == (0, 1, 2)
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id) == (0, 1, 2)
    assert ours.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert ours.all_special_ids == set(hf.all_special_ids) == {0, 1, 2}  # the tags are added tokens, not special


def test_tags_survive_skip_special_tokens(ours, hf):
    """The reasoning and tool parsers read the tags from text decoded with skip_special_tokens (vLLM's default)."""
    text = "<seed:think>a<seed:cot_budget_reflect>b</seed:cot_budget_reflect></seed:think>c<seed:tool_call>d</seed:tool_call>"
    ids = ours.encode(text)
    assert ids[0] == 0 and len(ids) < 14
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == text
    assert ours.vocab_size == len(hf) == 4096
    assert ours.model_max_length == hf.model_max_length


@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(ours, hf, text, add_special_tokens):
    ids = ours.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf.encode(text, add_special_tokens=add_special_tokens)
    if add_special_tokens:
        assert ids == [0] + ours.encode(text, add_special_tokens=False)


def test_special_token_strings_encode_to_single_ids(ours):
    assert ours.encode("<seed:think>x</seed:think>", add_special_tokens=False)[::2] == [3, 4]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_batch(ours, hf, add_special_tokens):
    batch = ours.encode_batch(TEXTS, add_special_tokens=add_special_tokens)
    assert batch == [ours.encode(t, add_special_tokens=add_special_tokens) for t in TEXTS]
    assert batch == hf(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf(ours, hf, text, skip_special_tokens):
    ids = ours.encode(text)
    decoded = ours.decode(ids, skip_special_tokens=skip_special_tokens)
    assert decoded == hf.decode(ids, skip_special_tokens=skip_special_tokens)
    if not skip_special_tokens:
        assert decoded == "<seed:bos>" + text  # byte-level BPE round-trips any Unicode


def test_decode_partial_utf8_matches_hf(ours, hf):
    """Single byte-level tokens of multi-byte characters decode to replacement characters, like HF."""
    ids = ours.encode("你好👩‍💻é", add_special_tokens=False)
    for end in range(1, len(ids) + 1):
        assert ours.decode(ids[:end]) == hf.decode(ids[:end])
    every_id = list(range(ours.vocab_size))
    assert ours.decode(every_id, skip_special_tokens=False) == hf.decode(every_id, skip_special_tokens=False)
    assert ours.convert_ids_to_tokens(every_id) == hf.convert_ids_to_tokens(every_id)


@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_offsets_match_hf(ours, hf, text, add_special_tokens):
    ids, offsets = ours.encode_with_offsets(text, add_special_tokens=add_special_tokens)
    reference = hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    assert ids == reference["input_ids"]
    assert len(offsets) == len(ids)
    assert [text[s:e] for s, e in offsets] == [text[s:e] for s, e in reference["offset_mapping"]]
    assert offsets == [tuple(o) for o in reference["offset_mapping"]]
    if add_special_tokens:
        assert offsets[0] == (0, 0)
    # Offsets are str indices: every token that decodes to whole characters spans exactly those characters.
    for token_id, (start, end) in zip(ids, offsets):
        piece = ours.decode([token_id], skip_special_tokens=False)
        if (start, end) != (0, 0) and "\ufffd" not in piece:
            assert text[start:end] == piece


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city (°C) — <b>fast</b> & cheap.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primes."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "  Why did the tokenizer split? It needed space.  "},
        {"role": "user", "content": "Another one."},
    ],
    "reasoning": [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "What is 17 * 3?"},
        {"role": "assistant", "reasoning_content": "17 * 3 = 51.\n", "content": "51"},
        {"role": "user", "content": "And 51 / 3?"},
    ],
    "unicode": [
        {"role": "user", "content": "Traduis « bonjour » en grec, russe et japonais 🙏"},
        {"role": "assistant", "content": "Γειά σου, привет, こんにちは ✨"},
        {"role": "user", "content": "  espaces  \n\n et 中文  "},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Zürich for 2 days?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "Call the tool.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}
            ],
        },
        {"role": "tool", "content": '{"temp_c": 21, "sky": "☀️"}'},
    ],
}
BUDGETS = {
    "not_passed": {},
    "unlimited": {"thinking_budget": -1},
    "zero": {"thinking_budget": 0},
    "512": {"thinking_budget": 512},
    "json_tooldef": {"use_json_tooldef": True},
}


@pytest.mark.parametrize("tokenize", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_hf(ours, hf, name, budget, add_generation_prompt, tokenize):
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    kwargs = dict(BUDGETS[budget], add_generation_prompt=add_generation_prompt, tools=tools)
    got = ours.apply_chat_template(messages, tokenize=tokenize, **kwargs)
    assert got == hf.apply_chat_template(messages, tokenize=tokenize, return_dict=False, **kwargs)
    if tokenize:
        rendered = ours.apply_chat_template(messages, **kwargs)
        assert got == ours.encode(rendered, add_special_tokens=False)
        assert got.count(ours.bos_token_id) == rendered.count("<seed:bos>")


def test_chat_format(ours):
    user = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(user) == "<seed:bos>user\nHi<seed:eos><seed:bos>assistant\n"
    assert ours.apply_chat_template(user, add_generation_prompt=False) == "<seed:bos>user\nHi<seed:eos>"
    assert ours.apply_chat_template(user, thinking_budget=-1) == ours.apply_chat_template(user)
    assert ours.apply_chat_template(CONVERSATIONS["system_user"]).startswith(
        "<seed:bos>system\nYou are a terse assistant.<seed:eos><seed:bos>user\nName three primes.<seed:eos>"
    )
    assert "<seed:bos>assistant\n<seed:think>17 * 3 = 51.</seed:think>\n51<seed:eos>" in ours.apply_chat_template(
        CONVERSATIONS["reasoning"]
    )
    tool_turn = ours.apply_chat_template(CONVERSATIONS["tools"], tools=TOOLS, add_generation_prompt=False)
    assert tool_turn.startswith("<seed:bos>system\nYou are a helpful AI assistant.")
    assert (  # the released template's default tool form: a Python signature and docstring per tool
        'Function:\ndef get_weather(city: str, days: int):\n    """\n    Current weather for a city (°C) — <b>fast</b> '
        "& cheap.\n\n    Args:\n    - city (str) [required]: \n    - days (int) [optional]: \n    \"\"\""
    ) in tool_turn
    json_turn = ours.apply_chat_template(CONVERSATIONS["tools"], tools=TOOLS, use_json_tooldef=True)
    assert '"Current weather for a city (°C) — <b>fast</b> & cheap."' in json_turn  # tojson: no HTML escaping
    assert (
        "<seed:bos>assistant\n<seed:think>Call the tool.</seed:think>\n<seed:tool_call>\n<function=get_weather>\n"
        "<parameter=city>Zürich</parameter>\n<parameter=days>2</parameter>\n</function>\n</seed:tool_call><seed:eos>"
        '<seed:bos>tool\n{"temp_c": 21, "sky": "☀️"}<seed:eos>'
    ) in tool_turn


@pytest.mark.parametrize(
    ("budget", "interval"), [(1, 128), (512, 128), (513, 256), (4000, 512), (8192, 1024), (100000, 1024)]
)
def test_thinking_budget(ours, budget, interval):
    prompt = ours.apply_chat_template(CONVERSATIONS["single_user"], thinking_budget=budget)
    system = prompt.split("<seed:eos>")[0]
    assert system.startswith("<seed:bos>system\nYou are an intelligent assistant with reflective ability.")
    assert f"which is {budget}. That is, you need to complete your thinking within {budget} tokens" in system
    assert f"reflect on your thinking process every {interval} tokens" in system
    assert prompt.endswith("<seed:bos>assistant\n")


def test_thinking_budget_zero(ours):
    prompt = ours.apply_chat_template(CONVERSATIONS["system_user"], thinking_budget=0)
    assert prompt.count("<seed:bos>system\n") == 2
    assert "your thinking budget is 0" in prompt
    assert prompt.endswith("<seed:bos>assistant\n<seed:think><seed:cot_budget_reflect>")
    history = ours.apply_chat_template(CONVERSATIONS["system_user"], thinking_budget=0, add_generation_prompt=False)
    assert history.endswith("Name three primes.<seed:eos>")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": ["a", "list"]}], "Message content must be a string"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]}],
            "Tool call arguments must be a mapping",
        ),
    ],
)
def test_template_errors_match_hf(ours, hf, messages, match):
    with pytest.raises(jinja2.TemplateError, match=match):
        ours.apply_chat_template(messages)
    with pytest.raises(jinja2.TemplateError, match=match):
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_empty_conversation(ours):
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])


def test_no_chat_template(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = SeedOssTokenizer.from_pretrained(tmp_path)
    assert tokenizer.encode("hi") == SeedOssTokenizer.from_pretrained(tokenizer_dir).encode("hi")
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# Exercises what transformers adds to jinja: tojson's options, raise_exception's absence, strftime_now, dict(),
# namespace, loop controls, the {% generation %} tag, special-token variables and template kwargs.
CUSTOM_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role == 'skip' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
{%- if m.role == 'assistant' %}{% generation %}[A:{{ m.content }}]{% endgeneration %}
{%- else %}[{{ m.role }}:{{ m.content }}]{% endif %}
{% endfor -%}
{{ dict(a=1, b='ü') | tojson }}|{{ tools | tojson(indent=2, sort_keys=True) }}|{{ ns.n }}
{{- bos_token }}{{ pad_token }}|{{ extra }}|{{ strftime_now('%Y') }}
{%- if add_generation_prompt %}<gen>{% endif %}"""


def test_chat_template_jinja_takes_precedence(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    ours = SeedOssTokenizer.from_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "user", "content": "<b>1</b>"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "é"},
    ]
    for add_generation_prompt in (True, False):
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=TOOLS, extra="kw")
        expected = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=TOOLS, extra="kw", tokenize=False
        )
        assert got == expected
    assert got.startswith('[user:<b>1</b>][A:é]{"a": 1, "b": "ü"}|[\n')  # the config's template is not used
    assert '|2<seed:bos><seed:pad>|kw|' in got


def test_template_sandbox(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{% set ns = namespace(_x=1) %}", encoding="utf-8")
    with pytest.raises(jinja2.exceptions.SecurityError):
        SeedOssTokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages.append(1) }}", encoding="utf-8")
    with pytest.raises(jinja2.exceptions.SecurityError):
        SeedOssTokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_training_is_deterministic(tokenizer_dir, tmp_path):
    """Train again in a fresh process (new hash seeds in Python and Rust) and compare bytes."""
    code = "import sys; from seedoss.tokenizer import train_demo_tokenizer; train_demo_tokenizer(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=REPO_ROOT)
    train_demo_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        reference = (tokenizer_dir / name).read_bytes()
        assert (tmp_path / name).read_bytes() == reference
        assert (tmp_path / "again" / name).read_bytes() == reference


@pytest.mark.parametrize("vocab_size", [100, 100_000])
def test_unreachable_vocab_size(tmp_path, vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size}"):
        train_demo_tokenizer(tmp_path, vocab_size)


def test_config_is_hf_layout(tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["pad_token"], config["eos_token"]) == tuple(SPECIAL_TOKENS[:3])
    assert [config["added_tokens_decoder"][str(i)]["content"] for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert [entry["special"] for entry in config["added_tokens_decoder"].values()] == [True] * 3 + [False] * 6


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SeedOssTokenizer.from_pretrained(tmp_path)


def test_invalid_tokenizer_json(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        SeedOssTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"valid": "json, but not a tokenizer"}', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        SeedOssTokenizer.from_pretrained(tmp_path)


def test_missing_or_invalid_config(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        SeedOssTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        SeedOssTokenizer.from_pretrained(tmp_path)
