"""The OpenAI-compatible API over a real Ray Serve app, driven by the real `openai` client: completions and chat
(streaming and not) equal the native `/v1/generate` route for the same greedy and seeded requests; n, stop, logprobs,
usage chunks, chat template kwargs, tokenize/detokenize, models, and errors naming the field."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import httpx
import openai
import pytest

from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services import reasoning
from conftest import local_serve

pytestmark = pytest.mark.timeout(600)
MODEL = "seedoss"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the city."}]


def _single_label_head(demo_checkpoint, tmp_path_factory):
    """The demo classification head cut to its first label: a cross-encoder-like single-label head (/score)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("single_label")
    source = demo_checkpoint / "heads" / "classify"
    for f in source.iterdir():
        shutil.copy(f, out / f.name)
    config = json.loads((source / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "relevant"}, {"relevant": 0}
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(source / "model.safetensors")
    tensors["score.weight"] = tensors["score.weight"][:1].contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory):
    from ray import serve

    from seedoss.deployments.app import build_app

    with local_serve(tmp_path_factory) as ray_serve:
        serve.run(build_app({"checkpoint": str(demo_checkpoint), "num_stages": 1,
                             "head_checkpoints": {
                                 "embed": str(demo_checkpoint),
                                 "classify": str(_single_label_head(demo_checkpoint, tmp_path_factory))},
                             "model_name": MODEL,
                             # the Serve-call path of generation steps and the Serve stream items of generation
                             # streams are covered here; the other modules use the default direct connections
                             # (deployments/step_channel.py, deployments/stream_channel.py)
                             "stage_transport": "serve", "stream_transport": "serve"}),
                  name="seedoss", route_prefix="/")
        url = ray_serve.url
        with httpx.Client(base_url=url, timeout=120) as http:
            yield SimpleNamespace(url=url, http=http, tokenizer=SeedOssTokenizer.from_pretrained(demo_checkpoint),
                                  client=openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120))


def _native(server, body: dict) -> dict:
    r = server.http.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _extra(obj, name):
    return (obj.model_extra or {}).get(name)


def _joined_stream(chunks, index=0):
    """(text, token_ids, finish_reason) of one choice from OpenAI completion/chat chunks."""
    text, ids, finish = "", [], None
    for c in chunks:
        for ch in c.choices:
            if ch.index != index:
                continue
            text += ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            ids += _extra(ch, "token_ids") or []
            finish = ch.finish_reason or finish
    return text, ids, finish


def _message_parts(message):
    """(reasoning, content) of a chat message; both reasoning names must agree."""
    assert _extra(message, "reasoning_content") == _extra(message, "reasoning")
    return _extra(message, "reasoning_content"), message.content


def _streamed_parts(chunks, index=0):
    """(reasoning, content) joined from chat chunks (None when empty, like a whole message)."""
    thinking, content = "", ""
    for c in chunks:
        for ch in c.choices:
            if ch.index == index:
                assert _extra(ch.delta, "reasoning_content") == _extra(ch.delta, "reasoning")
                thinking += _extra(ch.delta, "reasoning_content") or ""
                content += ch.delta.content or ""
    return thinking or None, content or None


GREEDY = {"max_tokens": 10, "temperature": 0}
SEEDED = {"max_tokens": 10, "temperature": 0.8, "seed": 3, "top_p": 0.9}


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_completions_equal_native(server, sampling):
    prompt = "The history of the city is long"
    ref = _native(server, {"prompt": prompt, **sampling})
    ref_choice = ref["choices"][0]
    out = server.client.completions.create(model=MODEL, prompt=prompt, extra_body={"return_token_ids": True},
                                           **sampling)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    choice = out.choices[0]
    assert choice.text == ref_choice["text"] and _extra(choice, "token_ids") == ref_choice["token_ids"]
    assert choice.finish_reason == ref_choice["finish_reason"] and choice.logprobs is None
    assert _extra(choice, "prompt_token_ids") == server.tokenizer.encode(prompt)
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        tuple(ref["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens"))

    chunks = list(server.client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"return_token_ids": True}, **sampling))
    assert _joined_stream(chunks) == (ref_choice["text"], ref_choice["token_ids"], ref_choice["finish_reason"])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == ref["usage"]["total_tokens"]
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_chat_equal_native(server, sampling):
    ref = _native(server, {"messages": CHAT, **sampling})
    ref_choice = ref["choices"][0]
    out = server.client.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"return_token_ids": True},
                                                **sampling)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    # the random model writes no tags: Seed-OSS output is thinking until `</seed:think>` (vLLM's seed_oss parser)
    assert choice.message.role == "assistant" and _message_parts(choice.message) == reasoning.split(ref_choice["text"])
    assert _extra(choice, "token_ids") == ref_choice["token_ids"]
    assert choice.finish_reason == ref_choice["finish_reason"]
    assert out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert out.usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert _extra(out, "prompt_token_ids") == server.tokenizer.apply_chat_template(CHAT, tokenize=True)

    chunks = list(server.client.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                        extra_body={"return_token_ids": True}, **sampling))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    assert _joined_stream(chunks)[1:] == (ref_choice["token_ids"], ref_choice["finish_reason"])
    assert _streamed_parts(chunks) == reasoning.split(ref_choice["text"])
    assert chunks[-1].choices[0].finish_reason == ref_choice["finish_reason"]


def test_n2_seeded_and_usage_chunk(server):
    body = {"max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 2}
    ref = _native(server, {"prompt": "Once upon a time", **body})
    refs = {c["index"]: c for c in ref["choices"]}
    out = server.client.completions.create(model=MODEL, prompt="Once upon a time", **body)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [refs[0]["text"], refs[1]["text"]]
    assert out.usage.completion_tokens == ref["usage"]["completion_tokens"]

    ref = _native(server, {"messages": CHAT, **body})
    refs = {c["index"]: c for c in ref["choices"]}
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                        stream_options={"include_usage": True}, **body))
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", "assistant"]
    for i in range(2):
        assert _streamed_parts(chunks, i) == reasoning.split(refs[i]["text"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert chunks[-1].usage.prompt_tokens == ref["usage"]["prompt_tokens"]


def test_second_chat_sharing_a_long_system_prompt_reports_cached_tokens(server):
    """The second of two chats with the same long system prompt takes its KV from the prefix cache: usage says how
    many prompt tokens (whole 16-token blocks of the shared part), natively too; a different `cache_salt` (vLLM's
    field) shares nothing. The answers are those of an uncached run (tests/test_prefix_cache.py holds that)."""
    system = {"role": "system", "content": "You are a patient guide to the history of old harbour towns. " * 8}
    ask = [[system, {"role": "user", "content": q}] for q in ("When was the lighthouse built?", "Who built it?")]
    first = server.client.chat.completions.create(model=MODEL, messages=ask[0], max_tokens=4, temperature=0)
    second = server.client.chat.completions.create(model=MODEL, messages=ask[1], max_tokens=4, temperature=0)
    a, b = (server.tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True) for m in ask)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 64 and first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == shared // 16 * 16
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=ask[1], max_tokens=4, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (second.usage.prompt_tokens - 1) // 16 * 16
    salted = server.client.chat.completions.create(model=MODEL, messages=ask[1], max_tokens=4, temperature=0,
                                                   extra_body={"cache_salt": "tenant-7"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    assert salted.choices[0].message.content == second.choices[0].message.content
    native = _native(server, {"messages": ask[1], "max_tokens": 4, "temperature": 0, "cache_salt": "tenant-7"})
    assert native["usage"]["prompt_tokens_details"] == {"cached_tokens": (second.usage.prompt_tokens - 1) // 16 * 16}
    r = server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": ask[1], "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_stop_strings(server):
    body = {"prompt": "Ελληνικά και 日本語", "max_tokens": 20, "temperature": 0, "stop": ["e"]}
    ref = _native(server, body)["choices"][0]
    out = server.client.completions.create(model=MODEL, **body).choices[0]
    assert (out.text, out.finish_reason, _extra(out, "stop_reason")) == (ref["text"], ref["finish_reason"],
                                                                          ref["stop_reason"])
    chunks = list(server.client.completions.create(model=MODEL, stream=True, **body))
    assert _joined_stream(chunks)[0] == ref["text"] and _joined_stream(chunks)[2] == ref["finish_reason"]


def test_logprobs_equal_native(server):
    tok = server.tokenizer
    prompt = "Hello world"
    ref = _native(server, {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3})["choices"][0]
    out = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    ref_tokens = [tok.decode([e["token_id"]], skip_special_tokens=False) for e in ref["logprobs"]]
    assert lp.tokens == ref_tokens
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in ref["logprobs"]], abs=1e-5)
    for top, e in zip(lp.top_logprobs, ref["logprobs"]):
        expected = {tok.decode([e["token_id"]], skip_special_tokens=False): e["logprob"]}
        for t in e["top_logprobs"]:
            expected.setdefault(tok.decode([t["token_id"]], skip_special_tokens=False), t["logprob"])
        assert top.keys() == expected.keys() and list(top.values()) == pytest.approx(list(expected.values()), abs=1e-5)
    offsets = [0]
    for t in ref_tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets

    ref = _native(server, {"messages": CHAT, "max_tokens": 6, "temperature": 0.7, "seed": 5, "logprobs": 2})
    ref = ref["choices"][0]
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.7, seed=5, logprobs=True, top_logprobs=2)
    content = server.client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [item for c in server.client.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    for items in (content, streamed):
        assert len(items) == len(ref["logprobs"])
        for item, e in zip(items, ref["logprobs"]):
            assert item.token == tok.decode([e["token_id"]], skip_special_tokens=False)
            assert item.bytes == list(item.token.encode("utf-8", errors="replace"))
            assert item.logprob == pytest.approx(e["logprob"], abs=1e-5)
            assert [t.token for t in item.top_logprobs] == [tok.decode([t["token_id"]], skip_special_tokens=False)
                                                           for t in e["top_logprobs"]]
            assert [t.logprob for t in item.top_logprobs] == pytest.approx(
                [t["logprob"] for t in e["top_logprobs"]], abs=1e-5)


def test_thinking_budget_changes_the_prompt_like_the_template(server):
    kwargs = {"thinking_budget": 0}
    expected = server.tokenizer.apply_chat_template(CHAT, tokenize=True, **kwargs)
    assert expected != server.tokenizer.apply_chat_template(CHAT, tokenize=True)
    r = server.http.post("/v1/tokenize", json={"messages": CHAT, "chat_template_kwargs": kwargs})
    assert r.status_code == 200 and r.json()["tokens"] == expected and r.json()["count"] == len(expected)
    ref = _native(server, {"messages": CHAT, "chat_template_kwargs": kwargs, "max_tokens": 8, "temperature": 0})
    out = server.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                extra_body={"chat_template_kwargs": kwargs, "return_token_ids": True})
    assert _extra(out, "prompt_token_ids") == expected and out.usage.prompt_tokens == len(expected)
    assert _message_parts(out.choices[0].message) == reasoning.split(ref["choices"][0]["text"])


def test_batch_token_and_echo_prompts(server):
    prompts = ["Hello world", "Once upon a time"]
    refs = [_native(server, {"prompt": p, "max_tokens": 5, "temperature": 0}) for p in prompts]
    out = server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.text for c in out.choices] == [r["choices"][0]["text"] for r in refs]
    assert out.usage.total_tokens == sum(r["usage"]["total_tokens"] for r in refs)
    chunks = list(server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0,
                                                   stream=True))
    assert [_joined_stream(chunks, i)[0] for i in range(2)] == [r["choices"][0]["text"] for r in refs]

    ids = server.tokenizer.encode(prompts[1])
    out = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True)
    echoed = server.tokenizer.decode(ids, skip_special_tokens=False)
    assert out.choices[0].text == echoed + refs[1]["choices"][0]["text"]
    out = server.client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=5, temperature=0, echo=True)
    assert out.choices[0].text == prompts[0] + refs[0]["choices"][0]["text"]


def test_models_tokenize_detokenize(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    tok = server.tokenizer
    text = "Zoë met 日本語 friends"
    for path in ("/v1/tokenize", "/tokenize"):
        r = server.http.post(path, json={"model": MODEL, "prompt": text})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
        assert isinstance(body["max_model_len"], int) and body["max_model_len"] > body["count"]
    ids = server.http.post("/v1/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert ids == tok.encode(text, add_special_tokens=False)
    r = server.http.post("/v1/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    assert server.http.post("/detokenize", json={"tokens": tok.encode(text)}).json()["prompt"] == "<seed:bos>" + text
    for bad in ([-1], [tok.vocab_size], ["x"]):
        r = server.http.post("/v1/detokenize", json={"tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("tokens"), r.text
    r = server.http.post("/v1/tokenize", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_errors_name_the_field(server):
    client = server.client
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.param == "model" and e.value.type == "not_found_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=CHAT, stream=True)
    assert e.value.param == "model"

    cases = [
        (client.completions.create, dict(prompt="x", logit_bias={"5": 10}), "logit_bias"),
        (client.completions.create, dict(prompt="x", suffix="y"), "suffix"),
        (client.completions.create, dict(prompt="x", echo=True, logprobs=1), "echo"),
        (client.completions.create, dict(prompt="x", temperature=-1), "temperature"),
        (client.completions.create, dict(prompt="x", max_tokens=10**6), "max_tokens"),
        (client.completions.create, dict(prompt="x", max_tokens=4, stream=True, top_p=0), "top_p"),
        (client.completions.create, dict(prompt=[5] * 5000, max_tokens=4), "prompt"),
        (client.completions.create, dict(prompt="x", stream_options={"include_usage": True}), "stream_options"),
        (client.completions.create, dict(prompt="x", extra_body={"bogus": 1}), "bogus"),
        (client.chat.completions.create, dict(messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}],
                                              tool_choice={"type": "function", "function": {"name": "g"}}),
         "tool_choice"),
        (client.chat.completions.create, dict(messages=CHAT, tools=[{"type": "function"}]), "tools"),
        (client.chat.completions.create, dict(messages=CHAT, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}), "response_format"),
        (client.chat.completions.create, dict(messages=CHAT, response_format={"type": "xml"}), "response_format"),
        (client.chat.completions.create, dict(messages=CHAT, extra_body={"guided_json": {"type": "object"}}),
         "guided_json"),
        (client.completions.create, dict(prompt="x", extra_body={"guided_choice": ["a"]}), "guided_choice"),
        (client.completions.create, dict(prompt="x", extra_body={"structured_outputs": {"regex": "[a-"}}),
         "structured_outputs"),
        (client.completions.create, dict(prompt="x", extra_body={"structured_outputs": {"choice": ["a"], "regex": "a"}}),
         "structured_outputs"),
        (client.chat.completions.create, dict(messages=CHAT, response_format={"type": "json_object"},
                                              extra_body={"structured_outputs": {"choice": ["a"]}}), "structured_outputs"),
        (client.chat.completions.create, dict(messages=CHAT, reasoning_effort="low"), "reasoning_effort"),
        (client.chat.completions.create, dict(messages=CHAT, top_logprobs=2), "top_logprobs"),
        (client.chat.completions.create, dict(messages=CHAT, max_completion_tokens=10**6, stream=True),
         "max_completion_tokens"),
        (client.chat.completions.create, dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]), "messages"),
    ]
    for create, kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as e:
            create(model=MODEL, **kwargs)
        assert e.value.param == field and field in e.value.message, (field, e.value.message)

    # harmless OpenAI fields are accepted; text content parts are flattened like vLLM
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "more."}]}]
    out = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=3, temperature=0, user="u",
                                         metadata={"k": "v"}, store=False, response_format={"type": "text"})
    ref = _native(server, {"messages": [{"role": "user", "content": "Tell me\nmore."}], "max_tokens": 3,
                           "temperature": 0})
    assert _message_parts(out.choices[0].message) == reasoning.split(ref["choices"][0]["text"])

    r = server.http.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = server.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])


# --- the mapping alone (no server) ----------------------------------------------------------------------------

def test_request_parsing_without_a_server(demo_checkpoint):
    from seedoss.services.errors import InvalidRequest
    from seedoss.services.openai import ChatCompletionRequest, CompletionRequest

    tok = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    req = CompletionRequest.parse({"model": MODEL, "prompt": [[5, 6], [7]], "n": None, "user": "u", "best_of": 1,
                                   "logit_bias": {}, "stop": "x", "seed": 1})
    bodies = req.native_bodies(tok)
    assert [b.body["prompt_token_ids"] for b in bodies] == [[5, 6], [7]] and req.n == 1
    assert bodies[0].body["stop"] == "x" and bodies[0].body["max_tokens"] == 16 and "temperature" not in bodies[0].body
    chat = ChatCompletionRequest.parse({"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 7,
                                        "logprobs": True})
    body = chat.native_bodies(tok)[0].body
    assert body["max_tokens"] == 7 and body["logprobs"] == 0 and "messages" not in body
    assert body["prompt_token_ids"] == tok.apply_chat_template(CHAT, tokenize=True)
    for cls, payload, param in [
        (CompletionRequest, {"prompt": "x", "best_of": 3}, "best_of"),
        (CompletionRequest, {"prompt": ["x", [1]]}, "prompt"),
        (CompletionRequest, {"prompt": ""}, "prompt"),
        (CompletionRequest, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (ChatCompletionRequest, {"messages": CHAT, "functions": [{"name": "f"}]}, "functions"),
        (ChatCompletionRequest, {"messages": CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
         "stream_options.continuous_usage_stats"),
        (ChatCompletionRequest, {"messages": [{"content": "no role"}]}, "messages"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            cls.parse(payload)
        assert e.value.param == param and "Value error" not in e.value.message, payload


def test_stream_mapping_without_a_server(demo_checkpoint):
    from seedoss.services.openai import ChatCompletionRequest, CompletionRequest, chat_mapper, completion_mapper

    tok = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    req = CompletionRequest.parse({"prompt": ["ab", "cd"], "n": 2, "echo": True, "stream": True,
                                   "stream_options": {"include_usage": True}})
    mapper = completion_mapper(req, MODEL, tok, req.native_bodies(tok))

    def choice(i, text, finish=None):
        return {"index": i, "text": text, "token_ids": [9] if text else [], "finish_reason": finish,
                "stop_reason": None}

    first = mapper.chunks(1, {"id": "r", "choices": [choice(1, "x")]})
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in first] == [(3, "cdx")]
    assert first[0]["usage"] is None
    assert mapper.chunks(1, {"id": "r", "choices": [choice(1, "")]}) == []  # nothing new: no chunk
    last = mapper.chunks(1, {"id": "r", "choices": [choice(1, "", "length")],
                             "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})
    assert last[0]["choices"][0]["finish_reason"] == "length"
    assert mapper.usage_chunk()["choices"] == [] and mapper.usage_chunk()["usage"]["total_tokens"] == 5

    chat = ChatCompletionRequest.parse({"messages": CHAT, "n": 2, "stream": True})
    mapper = chat_mapper(chat, MODEL, tok, chat.native_bodies(tok))
    assert [c["choices"][0]["delta"] for c in mapper.role_chunks()] == [{"role": "assistant", "content": ""}] * 2
    final = mapper.chunks({"id": "r", "choices": [choice(0, "", "stop")]})
    assert final[0]["choices"][0]["delta"] == {} and "usage" not in final[0]


EMBED_TEXTS = ["Hello world", "The history of the city is long and full of surprises", "a", "Ελληνικά και 日本語"]


@pytest.fixture(scope="module")
def backbone_states(demo_checkpoint):
    """transformers' SeedOssModel last hidden state per text (the reference for embeddings)."""
    import torch
    from transformers import SeedOssModel

    model = SeedOssModel.from_pretrained(demo_checkpoint).eval()
    tok = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    with torch.no_grad():
        return [model(torch.tensor([tok.encode(t)])).last_hidden_state[0].numpy() for t in EMBED_TEXTS]


def test_embeddings_with_the_openai_client_equal_transformers(server, backbone_states):
    import numpy as np

    # the client asks for base64 and decodes it: the packed format is exercised too
    response = server.client.embeddings.create(model=MODEL, input=EMBED_TEXTS)
    assert response.model == MODEL and [d.index for d in response.data] == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(len(s) for s in backbone_states)
    for got, states in zip(response.data, backbone_states):
        expected = states[-1] / np.linalg.norm(states[-1])  # last token, normalised (the decoder default)
        assert np.abs(np.array(got.embedding) - expected).max() <= 1e-5
    short = server.client.embeddings.create(model=MODEL, input=EMBED_TEXTS[1], dimensions=8, encoding_format="float")
    expected = backbone_states[1][-1][:8] / np.linalg.norm(backbone_states[1][-1][:8])
    assert np.abs(np.array(short.data[0].embedding) - expected).max() <= 1e-5
    mean = server.http.post("/v1/embeddings", json={"input": EMBED_TEXTS[:2], "pooling": "mean", "normalize": False})
    assert mean.status_code == 200
    for got, states in zip(mean.json()["data"], backbone_states):
        assert np.abs(np.array(got["embedding"]) - states.mean(axis=0)).max() <= 1e-5
    tokens = server.http.post("/pooling", json={"model": MODEL, "input": EMBED_TEXTS[2]})
    assert tokens.status_code == 200 and tokens.json()["data"][0]["object"] == "pooling"
    assert np.abs(np.array(tokens.json()["data"][0]["data"]) - backbone_states[2]).max() <= 1e-5


def test_many_concurrent_embedding_requests_each_get_their_own_answer(server, backbone_states):
    import asyncio

    import numpy as np

    async def one(client, i):
        r = await client.post("/v1/embeddings", json={"input": EMBED_TEXTS[i % 4], "encoding_format": "float"})
        assert r.status_code == 200, r.text
        return i, np.array(r.json()["data"][0]["embedding"])

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*[one(client, i) for i in range(32)])

    for i, got in asyncio.run(main()):
        states = backbone_states[i % 4]
        assert np.abs(got - states[-1] / np.linalg.norm(states[-1])).max() <= 1e-5


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"), ({"input": "a", "dimensions": 0}, "dimensions"), ({"model": "other", "input": "a"}, "model"),
    ({"input": "a", "pooling": "none"}, "pooling"), ({"input": [[10**9]]}, "input"), ({"input": "a", "extra": 1}, "extra"),
])
def test_embedding_errors_name_the_field(server, body, param):
    r = server.http.post("/v1/embeddings", json=body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {
            "city": {"type": "string", "maxLength": 16}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"enum": ["celsius", "fahrenheit"]}, "detailed": {"type": "boolean"}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 20}}, "required": ["query"]}}},
]
WEATHER = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


def test_named_tool_choice_returns_a_call_that_fits_the_schema(server):
    import jsonschema

    named = {"type": "function", "function": {"name": "get_weather"}}
    out = server.client.chat.completions.create(model=MODEL, messages=WEATHER, tools=WEATHER_TOOLS, tool_choice=named,
                                                max_tokens=120, temperature=0.7, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _extra(choice.message, "reasoning_content") is None  # constrained from the first token: no thinking
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOLS[0]["function"]["parameters"])

    # streamed: the call arrives as a tool-call delta, then finish_reason tool_calls
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=WEATHER, tools=WEATHER_TOOLS,
                                                        tool_choice="required", max_tokens=120, temperature=0.7,
                                                        seed=2, stream=True))
    deltas = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name in ("get_weather", "search")
    schema = next(t["function"]["parameters"] for t in WEATHER_TOOLS if t["function"]["name"] == deltas[0].function.name)
    jsonschema.validate(json.loads(deltas[0].function.arguments), schema)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.delta.content for c in chunks for ch in c.choices)


def test_tool_results_render_back_and_auto_choice_parses_nothing_from_plain_text(server):
    history = WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    out = server.client.chat.completions.create(model=MODEL, messages=history, tools=WEATHER_TOOLS, max_tokens=6,
                                                temperature=0, extra_body={"return_token_ids": True})
    prompt = server.tokenizer.decode(_extra(out, "prompt_token_ids"), skip_special_tokens=False)
    assert ("<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n<parameter=days>3"
            "</parameter>\n</function>\n</seed:tool_call><seed:eos><seed:bos>tool\n{\"temp_c\": 21}<seed:eos>") in prompt
    assert "Function:\ndef get_weather(city: str, days: int, unit: Any, detailed: bool):" in prompt
    assert out.choices[0].message.tool_calls == [] and out.choices[0].finish_reason == "length"


def test_response_format_json_schema_validates(server):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "score": {"type": "number", "minimum": 0, "maximum": 1},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "score", "ok"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "result", "schema": schema, "strict": True}}
    out = server.client.chat.completions.create(model=MODEL, messages=CHAT, response_format=rf, max_tokens=80,
                                                temperature=1.0, seed=4)
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    streamed = list(server.client.chat.completions.create(model=MODEL, messages=CHAT, response_format=rf,
                                                          max_tokens=80, temperature=1.0, seed=4, stream=True))
    assert _streamed_parts(streamed) == (None, out.choices[0].message.content)
    # the json_object form and a completions request
    obj = server.client.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "json_object"},
                                                max_tokens=60, temperature=0)
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)


def test_structured_outputs_choice_and_regex(server):
    choices = ["red", "green", "deep blue"]
    for seed in range(3):
        out = server.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=1.0,
                                                    seed=seed, extra_body={"structured_outputs": {"choice": choices}})
        assert out.choices[0].message.content in choices and out.choices[0].finish_reason == "stop"
    out = server.client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=0,
                                           extra_body={"structured_outputs": {"regex": r"\+1-[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", out.choices[0].text)
    native = _native(server, {"prompt": "Call me at", "max_tokens": 20, "temperature": 0,
                              "structured_outputs": {"regex": r"\+1-[0-9]{3}-[0-9]{4}"}})
    assert native["choices"][0]["text"] == out.choices[0].text
    r = server.http.post("/v1/generate", json={"prompt": "x", "guided_regex": "a"})
    assert r.status_code == 400 and "structured_outputs.regex" in r.json()["error"]["message"]


def test_streaming_reasoning_deltas(server):
    """The random model writes no tags, so (as for Seed-OSS, whose template may open the block) it is all thinking:
    several reasoning deltas, both names, no content."""
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                        stream=True))
    deltas = [_extra(ch.delta, "reasoning_content") for c in chunks for ch in c.choices
              if _extra(ch.delta, "reasoning_content")]
    assert len(deltas) > 3
    whole = server.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert "".join(deltas) == _extra(whole.choices[0].message, "reasoning") and whole.choices[0].message.content is None


def test_chat_mapping_of_reasoning_and_tool_calls_without_a_server(demo_checkpoint):
    """Crafted native outputs through the chat mapper: reasoning and tool-call deltas, finish_reason tool_calls,
    the whole response equal to the joined stream, parallel_tool_calls false keeping the first call."""
    from seedoss.services.openai import ChatCompletionRequest, chat_mapper

    tok = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    text = ("<seed:think>Two cities.<seed:cot_budget_reflect>8 used</seed:cot_budget_reflect></seed:think>On it.\n"
            "<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n<parameter=days>3"
            "</parameter>\n</function>\n</seed:tool_call>\n<seed:tool_call>\n<function=search>\n<parameter=query>"
            "Rome</parameter>\n</function>\n</seed:tool_call>")

    def native(pieces):
        return [{"id": "r", "choices": [{"index": 0, "text": p, "token_ids": [9], "stop_reason": None,
                                         "finish_reason": "stop" if k == len(pieces) - 1 else None}]}
                for k, p in enumerate(pieces)]

    def mapper(**extra):
        req = ChatCompletionRequest.parse({"messages": WEATHER, "tools": WEATHER_TOOLS, "stream": True, **extra})
        return chat_mapper(req, MODEL, tok, req.native_bodies(tok))

    whole = mapper().response({"id": "r", "choices": native([text])[0]["choices"],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == (
        "Two cities.<seed:cot_budget_reflect>8 used</seed:cot_budget_reflect>")
    assert message["content"] == "On it." and whole["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "days": 3}), ("search", {"query": "Rome"})]

    for size in (1, 5, 17):  # streamed in pieces of `size` characters
        m = mapper()
        chunks = [c for n in native([text[i:i + size] for i in range(0, len(text), size)]) for c in m.chunks(n)]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
        assert all(d.get("reasoning_content") == d.get("reasoning") for d in deltas)
        assert "".join(d.get("content", "") for d in deltas) == "On it."
        calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
        assert [(tc["index"], tc["function"]["name"]) for tc in calls] == [(0, "get_weather"), (1, "search")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    m = mapper(parallel_tool_calls=False)
    calls = [tc for n in native([text[i:i + 9] for i in range(0, len(text), 9)]) for c in m.chunks(n)
             for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [tc["function"]["name"] for tc in calls] == ["get_weather"]
    none = mapper(tool_choice="none").response({"id": "r", "choices": native([text])[0]["choices"]})
    assert none["choices"][0]["message"]["tool_calls"] == [] and "<seed:tool_call>" in none["choices"][0]["message"]["content"]
    assert none["choices"][0]["finish_reason"] == "stop"


def test_thinking_token_budget_splits_thinking_from_the_answer(server):
    body = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    out = server.client.chat.completions.create(**body, extra_body={"thinking_token_budget": 4,
                                                                    "return_token_ids": True})
    ids = _extra(out.choices[0], "token_ids")
    end = server.tokenizer.encode("</seed:think>", add_special_tokens=False)[0]
    assert ids.index(end) == 4
    thinking, answer = _message_parts(out.choices[0].message)
    assert thinking == server.tokenizer.decode(ids[:4]) and answer == server.tokenizer.decode(ids[5:])
    free = server.client.chat.completions.create(**body)
    assert free.choices[0].message.content is None  # without the cap the random model never stops thinking


def test_vllm_pooling_routes(server):
    """vLLM's /classify, /score and /rerank shapes over the (single-label) classification head, equal to the
    native /v1/classify answer for the same texts and pairs."""
    texts = ["what a lovely day", "the weather is awful"]
    native = server.http.post("/v1/classify", json={"inputs": texts, "full_probabilities": True}).json()
    r = server.http.post("/classify", json={"model": MODEL, "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL and body["id"].startswith("classify-")
    assert [(d["index"], d["label"], d["num_classes"]) for d in body["data"]] == [(0, "relevant", 1), (1, "relevant", 1)]
    assert [d["probs"] for d in body["data"]] == [res["probs"] for res in native["results"]]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == native["usage"]["prompt_tokens"]
    assert server.http.post("/classify", json={"input": "one"}).json()["data"][0]["index"] == 0

    query, docs = "weather today", ["sunny and warm", "a recipe for bread", "rain expected"]
    pairs = server.http.post("/v1/classify", json={"inputs": [query] * 3, "text_pairs": docs,
                                                   "full_probabilities": True}).json()
    want = [res["probs"][0] for res in pairs["results"]]
    for path in ("/score", "/v1/score"):
        r = server.http.post(path, json={"model": MODEL, "text_1": query, "text_2": docs})
        assert r.status_code == 200, r.text
        assert [(d["index"], d["object"], d["score"]) for d in r.json()["data"]] == [
            (i, "score", s) for i, s in enumerate(want)]
    zipped = server.http.post("/score", json={"text_1": [query] * 3, "text_2": docs}).json()
    assert [d["score"] for d in zipped["data"]] == want
    # a pair is the tokenizer's pair encoding, not the texts glued together
    glued = server.http.post("/v1/classify", json={"inputs": [query + docs[0]], "full_probabilities": True}).json()
    assert glued["results"][0]["probs"][0] != want[0]

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = server.http.post(path, json={"model": MODEL, "query": query, "documents": [docs[0], {"text": docs[1]},
                                                                                       docs[2]], "top_n": 2})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        best = sorted(range(3), key=lambda i: -want[i])[:2]
        assert [(x["index"], x["relevance_score"], x["document"]["text"]) for x in results] == [
            (i, want[i], docs[i]) for i in best]

    for path, payload, param in [
        ("/classify", {"input": []}, "input"), ("/classify", {"input": "x", "model": "gpt-4"}, "model"),
        ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
        ("/score", {"text_1": "a"}, "text_2"), ("/rerank", {"query": "q", "documents": [{"txt": 1}]}, "documents"),
        ("/rerank", {"query": "q", "documents": ["d"], "bogus": 1}, "bogus"),
    ]:
        r = server.http.post(path, json=payload)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (path, r.text)


def test_the_steps_and_streams_went_through_serve_as_configured(server):
    from ray import serve

    chunks = list(server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                                   stream=True))
    assert chunks
    stats = serve.get_deployment_handle("Generation", "seedoss").stats.remote().result()
    assert stats["stage_transport"] == "serve" and stats["steps"] > 0
    assert stats["relayed_streams"] == 0  # streams came as Serve stream items
