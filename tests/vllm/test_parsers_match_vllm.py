"""Our Seed-OSS parsers (services/reasoning.py, services/tool_calls.py) against vLLM's `seed_oss` reasoning and tool
parsers (vllm/parser/seed_oss.py, composed the way vLLM's chat serving composes them: `ParserManager.get_parser`)
on the crafted outputs of tests/test_chat_parsers.py, whole and streamed (tracker issue 13).

Where our semantics are meant to agree, reasoning, content and tool calls (name + JSON arguments) are identical.
Where they deliberately differ (README, "Seed-OSS chat"), the difference itself is asserted, so this fails when
either side changes. Runs only where vllm is installed (`.venv-vllm`); the main suite skips it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.v1.engine.async_llm")  # not plain "vllm": this directory is a namespace package of that name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the crafted cases
from test_chat_parsers import CALL, CALL_ARGS, REASONING_CASES, STREAM_TEXTS, TOOLS  # noqa: E402

from seedoss.services import reasoning, tool_calls  # noqa: E402

THINK = "<seed:think>need a tool</seed:think>"
SEVERAL = ("Checking two things.\n" + CALL + "\n"
           "<seed:tool_call>\n<function=search>\n<parameter=q>a < b</parameter>\n</function>\n</seed:tool_call>"
           "<seed:tool_call><function=search><parameter=q>multi\nline</parameter></function>\n"
           "<function=search><parameter=q>second in block</parameter></function></seed:tool_call>\n")
SEARCH = "<seed:tool_call>\n<function=search>\n<parameter=q>x</parameter>\n</function>\n</seed:tool_call>"
# Answers (after THINK) both parse the same, whole and streamed.
TOOL_AGREE = {
    "one_call_after_text": STREAM_TEXTS[0].replace(CALL, SEARCH),
    "calls_only": SEARCH + "\n" + SEARCH,
    "open_tag_fragment_is_text": STREAM_TEXTS[2],
    "no_tools_written": "Just an answer.",
}
# Reasoning cases both split the same; "tags_in_answer_are_text" is a difference (test below).
REASONING_AGREE = [name for name in REASONING_CASES if name != "tags_in_answer_are_text"]


@pytest.fixture(scope="module")
def vllm_parser(demo_checkpoint):
    """A fresh vLLM parser per output (they are stateful), with the request's tools."""
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager

    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    cls = ParserManager.get_parser(tool_parser_name="seed_oss", reasoning_parser_name="seed_oss",
                                   enable_auto_tools=True)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    return lambda: (cls(tokenizer, tools=request.tools), request)


def _calls(calls) -> list[tuple[str, dict]]:
    return [(name, json.loads(arguments)) for name, arguments in calls]


def vllm_whole(vllm_parser, text):
    parser, request = vllm_parser()
    thinking, content, calls = parser.parse(text, request, enable_auto_tools=True)
    return thinking, content, _calls((c.name, c.arguments) for c in calls or [])


def vllm_streamed(vllm_parser, text, step):
    parser, request = vllm_parser()
    thinking = content = ""
    calls: dict[int, list[str]] = {}
    for i in range(0, len(text), step):
        delta = parser.parse_delta(text[i:i + step], [], request, finished=i + step >= len(text))
        if delta is None:
            continue
        thinking += delta.reasoning or ""
        content += delta.content or ""
        for call in delta.tool_calls or []:
            name_args = calls.setdefault(call.index, ["", ""])
            name_args[0] += (call.function and call.function.name) or ""
            name_args[1] += (call.function and call.function.arguments) or ""
    return thinking or None, content or None, _calls(calls[i] for i in sorted(calls))


def ours_whole(text):
    thinking, answer = reasoning.split(text)
    content, calls = tool_calls.parse(answer or "", TOOLS)
    return thinking, content, _calls((c["function"]["name"], c["function"]["arguments"]) for c in calls)


def ours_streamed(text, step):
    """As services/openai.py chains them: each delta through the reasoning split, its answer part through the
    tool-call parser."""
    split, calls_stream = reasoning.ReasoningStream(), tool_calls.ToolCallStream(TOOLS)
    thinking = content = ""
    calls = []
    for i in range(0, len(text), step):
        final = i + step >= len(text)
        r, answer = split.feed(text[i:i + step], final=final)
        c, new = calls_stream.feed(answer, final=final)
        thinking, content, calls = thinking + r, content + c, calls + new
    return thinking or None, content or None, _calls((c["function"]["name"], c["function"]["arguments"])
                                                     for c in calls)


@pytest.mark.parametrize("name", REASONING_AGREE)
def test_reasoning_split_equals_vllm(vllm_parser, name):
    text, want_thinking, want_content = REASONING_CASES[name]
    assert ours_whole(text) == vllm_whole(vllm_parser, text) == (want_thinking, want_content, [])
    for step in (1, 5):
        assert ours_streamed(text, step) == vllm_streamed(vllm_parser, text, step) == (want_thinking,
                                                                                       want_content, []), step


def test_text_before_the_opening_tag_is_reasoning_in_both(vllm_parser):
    """Once a documented difference (older vLLM dropped it when not streaming); vLLM 0.32 keeps it, as we do."""
    text = "prefix<seed:think>r</seed:think>c"
    assert ours_whole(text) == vllm_whole(vllm_parser, text) == ("prefixr", "c", [])
    assert ours_streamed(text, 1) == vllm_streamed(vllm_parser, text, 1) == ("prefixr", "c", [])


@pytest.mark.parametrize("name", TOOL_AGREE)
def test_tool_calls_equal_vllm(vllm_parser, name):
    text = THINK + TOOL_AGREE[name]
    whole = ours_whole(text)
    assert whole == vllm_whole(vllm_parser, text)
    assert whole[0] == "need a tool"
    for step in (1, 7):
        ours, theirs = ours_streamed(text, step), vllm_streamed(vllm_parser, text, step)
        assert ours == whole, step
        # vLLM streams the whitespace before a call as content (its whole parse strips it): the rest is equal
        assert theirs[0] == ours[0] and theirs[2] == ours[2], step
        assert (theirs[1] or "").strip() == (ours[1] or "").strip(), step


def test_schema_casts_equal_vllm_except_python_literals(vllm_parser):
    """Every cast of CALL agrees (string, integer, boolean "True", number, JSON array, null, unknown parameter
    kept as text, one newline trimmed) but one: an object/array value in Python-literal syntax (`{'x': None}`) is
    parsed by ours (JSON, then Python literal, like vLLM's earlier seed_oss parser) and left a string by vLLM 0.32."""
    for text in (THINK + CALL, THINK + SEVERAL):
        ours, theirs = ours_whole(text), vllm_whole(vllm_parser, text)
        assert ours[:2] == theirs[:2]
        assert [name for name, _ in ours[2]] == [name for name, _ in theirs[2]]
        assert ours[2][0][1] == CALL_ARGS and CALL_ARGS["opts"] == {"x": None}
        assert theirs[2][0][1] == {**CALL_ARGS, "opts": "{'x': None}"}
        assert ours[2][1:] == theirs[2][1:]
    for step in (1, 7):
        assert vllm_streamed(vllm_parser, THINK + CALL, step)[2] == theirs[2][:1]
        assert ours_streamed(THINK + CALL, step)[2] == ours[2][:1]


# The deliberate differences: ours keeps as content what is not a valid call to an offered function; vLLM makes
# something of it (a call, or nothing). Each entry: answer text -> (ours: content, calls; vLLM: content, calls).
DIFFERENCES = {
    "function_not_offered": (
        "<seed:tool_call><function=unknown_tool><parameter=a>1</parameter></function></seed:tool_call>",
        "same", [], None, [("unknown_tool", {"a": "1"})]),
    "function_without_wrapper": (
        "<function=search><parameter=q>x</parameter></function>",
        "same", [], None, [("search", {"q": "x"})]),
    "function_without_wrapper_after_text": (
        "Sure, <function=search><parameter=q>x</parameter></function>",
        "same", [], "Sure,", [("search", {"q": "x"})]),
    "block_without_function": (
        "<seed:tool_call>no function here</seed:tool_call>", "same", [], None, []),
    "unclosed_function_name": (
        "<seed:tool_call><function=search</seed:tool_call>", "same", [], None, [("search</seed:tool_call>", {})]),
    "unclosed_parameter_tag": (
        "<seed:tool_call><function=search><parameter=q</function></seed:tool_call>", "same", [], None,
        [("search", {})]),
    "text_after_a_call": (  # vLLM's whole parse drops the answer after a call (its stream keeps it)
        STREAM_TEXTS[1], " and then<seed:tool_call>bad</seed:tool_call> end", [("search", {"q": "x"})], None,
        [("search", {"q": "x"})]),
    "parameter_cut_off": (  # e.g. by max_tokens: ours keeps the value written so far, vLLM's whole parse drops it
        "<seed:tool_call>\n<function=search>\n<parameter=q>cut", None, [("search", {"q": "cut"})], None,
        [("search", {})]),
}


@pytest.mark.parametrize("name", DIFFERENCES)
def test_documented_tool_call_differences(vllm_parser, name):
    answer, our_content, our_calls, their_content, their_calls = DIFFERENCES[name]
    our_content = answer if our_content == "same" else our_content
    text = THINK + answer
    assert ours_whole(text) == ("need a tool", our_content, our_calls)
    assert vllm_whole(vllm_parser, text) == ("need a tool", their_content, their_calls)
    assert ours_streamed(text, 1) == ours_whole(text)  # ours: streamed adds up to whole, whatever the text


def test_stray_closing_think_tag_in_the_answer(vllm_parser):
    """Ours keeps a second `</seed:think>` in the answer as text; vLLM drops it (whole and streamed)."""
    text, thinking, content = REASONING_CASES["tags_in_answer_are_text"]
    assert ours_whole(text) == (thinking, content, [])
    assert vllm_whole(vllm_parser, text) == (thinking, content.replace("</seed:think>", ""), [])
    assert vllm_streamed(vllm_parser, text, 1) == vllm_whole(vllm_parser, text)
