"""The OpenAI-compatible API over a real Ray Serve app, driven by the real `openai` client: completions and chat
(streaming and not) equal the native `/v1/generate` route for the same greedy and seeded requests; n, stop, logprobs,
usage chunks, chat template kwargs, tokenize/detokenize, models, and errors naming the field."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import httpx
import openai
import pytest

from seedoss.tokenizer import SeedOssTokenizer

pytestmark = pytest.mark.timeout(600)
MODEL = "seedoss"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the city."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app({"checkpoint": str(demo_checkpoint), "num_stages": 1,
                         "head_checkpoints": {"embed": str(demo_checkpoint)}, "model_name": MODEL}),
              name="seedoss", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=120) as http:
        yield SimpleNamespace(url=url, http=http, tokenizer=SeedOssTokenizer.from_pretrained(demo_checkpoint),
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120))
    serve.shutdown()
    ray.shutdown()


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
    assert choice.message.role == "assistant" and choice.message.content == ref_choice["text"]
    assert _extra(choice, "token_ids") == ref_choice["token_ids"]
    assert choice.finish_reason == ref_choice["finish_reason"]
    assert out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert out.usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert _extra(out, "prompt_token_ids") == server.tokenizer.apply_chat_template(CHAT, tokenize=True)

    chunks = list(server.client.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                        extra_body={"return_token_ids": True}, **sampling))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    assert _joined_stream(chunks) == (ref_choice["text"], ref_choice["token_ids"], ref_choice["finish_reason"])
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
        assert _joined_stream(chunks, i)[0] == refs[i]["text"]
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
    assert out.choices[0].message.content == ref["choices"][0]["text"]


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
        (client.chat.completions.create, dict(messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}]),
         "tools"),
        (client.chat.completions.create, dict(messages=CHAT, response_format={"type": "json_object"}),
         "response_format"),
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
    assert out.choices[0].message.content == ref["choices"][0]["text"]

    r = server.http.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = server.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])


# --- the mapping alone (no server) ----------------------------------------------------------------------------

def test_request_parsing_without_a_server(demo_checkpoint):
    from services.errors import InvalidRequest
    from services.openai import ChatCompletionRequest, CompletionRequest

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
    from services.openai import ChatCompletionRequest, CompletionRequest, chat_mapper, completion_mapper

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
