"""The gateway core (deployments/gateway_core.py) and its adapters without a cluster: the real FastAPI app of a core
(native + OpenAI routes) and the real gRPC methods, over head handles that record what they are sent.

What it shows: text reaches the tokenizer only through the core's pool (never on the event loop), whichever front
end a request came through; the Generation deployment is sent token ids, never text; each core builds its own app
(no state shared between two gateways); auth and the JSON checks are the core's, for every transport."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fastapi.testclient import TestClient

from seedoss.deployments.faults import RetryPolicy, Timeouts
from seedoss.deployments.gateway import http_app
from seedoss.deployments.gateway_core import GatewayCore
from seedoss.deployments.grpc_api import GrpcMethods
from seedoss.deployments.routing import Heads
from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb

CHUNK = {"id": "r", "choices": [{"index": 0, "text": "a", "token_ids": [5], "finish_reason": "length",
                                 "stop_reason": None}], "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                                                  "total_tokens": 4}}


class Recorder:
    """A Generation handle: records every body it is sent; `complete` answers CHUNK, `stream` yields it once."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.stream = self.complete = self.max_model_len = self

    def options(self, **_):
        return self

    def remote(self, body=None, resume=None):
        if body is None:  # max_model_len
            async def length():
                return 4096
            return length()
        self.bodies.append(body)
        return _Stream([dict(CHUNK)]) if resume is not None or self._streaming else _answer(dict(CHUNK))

    _streaming = False


async def _answer(value):
    return value


class _Stream:
    def __init__(self, chunks):
        self.chunks = chunks

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self):
        pass


class StreamingRecorder(Recorder):
    _streaming = True


class ThreadRecordingTokenizer:
    """The real tokenizer, noting the thread of every call that turns text into ids."""

    def __init__(self, tokenizer):
        self._tokenizer, self.threads = tokenizer, []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._tokenizer.encode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._tokenizer.apply_chat_template(*args, **kwargs)


def _core(tokenizer, generate, api_keys=None) -> GatewayCore:
    heads = Heads({"generate": generate, "classify": None, "tag": None, "qa": None, "embed": None},
                  RetryPolicy(), Timeouts())
    return GatewayCore(heads, tokenizer, "seedoss", api_keys=api_keys, tokenizer_threads=2)


@pytest.fixture
def tokenizer(demo_checkpoint):
    from seedoss.tokenizer import SeedOssTokenizer

    return ThreadRecordingTokenizer(SeedOssTokenizer.from_pretrained(demo_checkpoint))


def test_every_front_end_tokenizes_in_the_core_pool_and_sends_token_ids(tokenizer):
    unary, streaming = Recorder(), StreamingRecorder()
    messages = [{"role": "user", "content": "hello there"}]
    with TestClient(http_app(_core(tokenizer, unary))) as client:
        for route, body in [("/v1/generate", {"prompt": "Hello world", "max_tokens": 1}),
                            ("/v1/generate", {"messages": messages, "max_tokens": 1}),
                            ("/v1/completions", {"prompt": ["one", "two"], "max_tokens": 1}),
                            ("/v1/chat/completions", {"messages": messages, "max_tokens": 1}),
                            ("/tokenize", {"prompt": "Hello world"}),
                            ("/v1/tokenize", {"messages": messages})]:
            r = client.post(route, json=body)
            assert r.status_code == 200, (route, r.text)
    with TestClient(http_app(_core(tokenizer, streaming))) as client:
        r = client.post("/v1/generate", json={"prompt": "Hello world", "max_tokens": 1, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "stream": True})
        assert r.status_code == 200 and "chat.completion.chunk" in r.text

    class Gateway(GrpcMethods):
        core = _core(tokenizer, streaming)

    async def grpc_calls():
        got = [m async for m in Gateway().Generate(pb.GenerateRequest(prompt="Hello world", max_tokens=1))]
        tokens = await Gateway().Tokenize(pb.TokenizeRequest(prompt="Hello world"))
        return got, tokens

    got, tokens = asyncio.run(grpc_calls())
    assert got[0].choices[0].text == "a" and list(tokens.token_ids) == tokenizer.encode("Hello world")
    tokenizer.threads.pop()  # the check's own encode, just above

    # native 2, completions 2, chat 1, tokenize 2, streams 2, gRPC 2
    assert len(tokenizer.threads) == 11, tokenizer.threads
    assert all(name.startswith("gateway-tokenize") for name in tokenizer.threads), tokenizer.threads
    bodies = unary.bodies + streaming.bodies
    assert len(bodies) == 8
    for body in bodies:  # the Generation deployment never sees text
        assert "prompt_token_ids" in body and not {"prompt", "messages"} & set(body), body
    assert unary.bodies[0]["prompt_token_ids"] == tokenizer.encode("Hello world")
    assert unary.bodies[0]["max_tokens"] == 1


def test_each_core_builds_its_own_app_with_its_own_keys(tokenizer):
    open_app, locked_app = http_app(_core(tokenizer, Recorder())), http_app(_core(tokenizer, Recorder(), ["k1"]))
    assert open_app is not locked_app
    body = {"prompt": "x", "max_tokens": 1}
    with TestClient(open_app) as open_client, TestClient(locked_app) as locked:
        assert open_client.post("/v1/generate", json=body).status_code == 200
        r = locked.post("/v1/generate", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert locked.post("/v1/generate", json=body, headers={"Authorization": "Bearer k1"}).status_code == 200
        assert locked.get("/health/live").status_code == 200  # probes stay open
        r = locked.post("/v1/generate", content=b'{"prompt": "\\ud800"}', headers={"Authorization": "Bearer k1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
