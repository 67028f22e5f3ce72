"""Seed-OSS reasoning and tool-call parsing (services/reasoning.py, services/tool_calls.py) on crafted outputs,
whole and streamed split at every character boundary."""

import json

import pytest

from seedoss.services import reasoning, tool_calls
from seedoss.services.errors import InvalidRequest

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "lat": {"type": "number"}, "tags": {"type": "array"}, "opts": {"type": "object"},
        "maybe": {"type": ["integer", "null"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "q": {"type": "string"}}}}},
]
CALL = ("<seed:tool_call>\n<function=get_weather>\n<parameter=city>Zürich\n</parameter>\n<parameter=days>2</parameter>\n"
        "<parameter=metric>True</parameter>\n<parameter=lat>47.5</parameter>\n<parameter=tags>[\"a\", 1]</parameter>\n"
        "<parameter=opts>{'x': None}</parameter>\n<parameter=maybe>null</parameter>\n<parameter=extra>7</parameter>\n"
        "</function>\n</seed:tool_call>")
CALL_ARGS = {"city": "Zürich", "days": 2, "metric": True, "lat": 47.5, "tags": ["a", 1], "opts": {"x": None},
             "maybe": None, "extra": "7"}

REASONING_CASES = {
    "both_tags": ("<seed:think>Let me think.</seed:think>The answer is 4.", "Let me think.", "The answer is 4."),
    "no_opening_tag": ("I am thinking</seed:think>\nDone", "I am thinking", "\nDone"),
    "unfinished": ("<seed:think>still thinking", "still thinking", None),
    "no_tags": ("plain words", "plain words", None),
    "budget_notes": ("<seed:think>a<seed:cot_budget_reflect>I have used 129 tokens, 383 left.</seed:cot_budget_reflect>"
                     "b</seed:think>c", "a<seed:cot_budget_reflect>I have used 129 tokens, 383 left."
                     "</seed:cot_budget_reflect>b", "c"),
    "budget_zero_prompt_opened": ("<seed:cot_budget_reflect>budget 0</seed:cot_budget_reflect>\n</seed:think>Hi",
                                  "<seed:cot_budget_reflect>budget 0</seed:cot_budget_reflect>\n", "Hi"),
    "tags_in_answer_are_text": ("<seed:think>r</seed:think>a <seed:think> b </seed:think>", "r",
                                "a <seed:think> b </seed:think>"),
    "near_miss_tag": ("<seed:thinker>x</seed:thin", "<seed:thinker>x</seed:thin", None),
    "empty_thinking": ("<seed:think></seed:think>x", None, "x"),
}


@pytest.mark.parametrize("name", REASONING_CASES)
def test_reasoning_split(name):
    text, want_reasoning, want_content = REASONING_CASES[name]
    assert reasoning.split(text) == (want_reasoning, want_content)


def _stream(machine, text, cuts):
    outs, last = [], 0
    for cut in [*cuts, len(text)]:
        outs.append(machine.feed(text[last:cut], final=cut == len(text)))
        last = cut
    return outs


@pytest.mark.parametrize("name", REASONING_CASES)
def test_reasoning_streamed_at_every_boundary(name):
    text = REASONING_CASES[name][0]
    whole = reasoning.split(text)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            outs = _stream(reasoning.ReasoningStream(), text, [i, j])
            streamed = ("".join(r for r, _ in outs) or None, "".join(c for _, c in outs) or None)
            assert streamed == whole, (i, j)
    # character by character, a reasoning delta never holds a tag (held back until ruled in or out)
    outs = _stream(reasoning.ReasoningStream(), text, range(1, len(text)))
    assert all("<seed:think>" not in r and "</seed:think>" not in r for r, _ in outs)


def test_reasoning_off_for_constrained_output():
    assert reasoning.split('{"a": 1}', in_reasoning=False) == (None, '{"a": 1}')


def _args(call):
    return json.loads(call["function"]["arguments"])


def test_tool_call_values_cast_by_schema():
    content, calls = tool_calls.parse(CALL, TOOLS)
    assert content is None and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert _args(calls[0]) == CALL_ARGS


def test_several_calls_with_content():
    text = ("Checking two things.\n" + CALL + "\n" +
            "<seed:tool_call>\n<function=search>\n<parameter=q>a < b</parameter>\n</function>\n</seed:tool_call>"
            "<seed:tool_call><function=search><parameter=q>multi\nline</parameter></function>\n"
            "<function=search><parameter=q>second in block</parameter></function></seed:tool_call>\n")
    content, calls = tool_calls.parse(text, TOOLS)
    assert content == "Checking two things."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "search", "search", "search"]
    assert [_args(c) for c in calls[1:]] == [{"q": "a < b"}, {"q": "multi\nline"}, {"q": "second in block"}]
    assert len({c["id"] for c in calls}) == 4


@pytest.mark.parametrize("text", [
    "<seed:tool_call>no function here</seed:tool_call>",
    "<seed:tool_call><function=unknown_tool><parameter=a>1</parameter></function></seed:tool_call>",
    "<seed:tool_call><function=search</seed:tool_call>",
    "<seed:tool_call><function=search><parameter=q</function></seed:tool_call>",
    "text <seed:tool_call",
])
def test_malformed_calls_are_plain_content(text):
    assert tool_calls.parse(text, TOOLS) == (text, [])


def test_unclosed_block_at_the_end_is_a_call():
    """vLLM accepts a call whose closing tags were cut off (e.g. by max_tokens)."""
    content, calls = tool_calls.parse("<seed:tool_call>\n<function=search>\n<parameter=q>cut", TOOLS)
    assert content is None and [_args(c) for c in calls] == [{"q": "cut"}]


STREAM_TEXTS = [
    "Sure.\n" + CALL,
    "<seed:tool_call><function=search><parameter=q>x</parameter></function></seed:tool_call> and then"
    "<seed:tool_call>bad</seed:tool_call> end",
    "no calls at all, <seed:tool and trailing space  ",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_tool_calls_streamed_at_every_boundary(text):
    def key(content, calls):
        return content, [(c["function"]["name"], _args(c)) for c in calls]

    whole = key(*tool_calls.parse(text, TOOLS))
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 7):
            outs = _stream(tool_calls.ToolCallStream(TOOLS), text, [i, j])
            content = "".join(c for c, _ in outs) or None
            assert key(content, [call for _, calls in outs for call in calls]) == whole, (i, j)


def test_full_output_reasoning_then_calls():
    out = "<seed:think>need weather</seed:think>\n" + CALL
    thinking, answer = reasoning.split(out)
    assert thinking == "need weather"
    content, calls = tool_calls.parse(answer, TOOLS)
    assert content is None and _args(calls[0]) == CALL_ARGS


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ("x", None, "tools"),
    ([{"type": "function"}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools"),
    ([], "required", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    (TOOLS, {"type": "function", "function": "search"}, "tool_choice"),
    (TOOLS, {"type": "function"}, "tool_choice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": "x"}}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 1}}}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"required": "a"}}}], None, "tools"),
])
def test_bad_tool_requests(tools, choice, param):
    with pytest.raises(InvalidRequest) as e:
        tool_calls.check_tools(tools, choice)
    assert e.value.param == param


def test_tool_choice_forms():
    assert tool_calls.check_tools(TOOLS, None)[1] is None
    assert tool_calls.check_tools(TOOLS, "auto")[1] is None
    assert tool_calls.check_tools(TOOLS, "none")[1] == "none"
    assert tool_calls.check_tools(TOOLS, "required")[1] == "required"
    assert tool_calls.check_tools(TOOLS, {"type": "function", "function": {"name": "search"}})[1] == "search"


def test_call_grammar_forms(demo_checkpoint):
    """The grammar of a forced call compiles for every parameter form and holds exactly the offered calls."""
    from seedoss.structured import StructuredOutputs, check
    from seedoss.tokenizer import SeedOssTokenizer

    tokenizer = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    tools = TOOLS + [{"type": "function", "function": {"name": "bounds", "parameters": {"properties": {
        "a": {"type": "string", "minLength": 2, "maxLength": 5}, "b": {"type": "string", "maxLength": 10**9},
        "c": {"type": "string", "minLength": 3}, "d": {"enum": [1, "x", None]}}}}},
        {"type": "function", "function": {"name": "no_params"}}]
    named = tool_calls.call_grammar(tools, "bounds", tokenizer)
    assert "/[^<]{2,5}/" in named and "/[^<]*/" in named and "/[^<]{3,}/" in named and '"1" | "x" | "null"' in named
    assert "get_weather" not in named
    every = tool_calls.call_grammar(tools, None, tokenizer)
    assert every.startswith("start: call0 | call1 | call2 | call3")
    for grammar in (named, every):
        assert check(StructuredOutputs(grammar=grammar), tokenizer) is None
