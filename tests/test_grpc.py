"""The typed gRPC API (proto/seedoss/v1/seedoss.proto) through Serve's gRPC proxy: every RPC answers what the HTTP API
answers for the same request, a cancelled stream frees its sequence in the engine, bad input is INVALID_ARGUMENT
naming the field, and the committed stubs are what scripts/gen_proto.sh generates."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest

from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc as pb_grpc
from seedoss.services import reasoning

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.hostile import HTTP_BAD_INPUTS, grpc_bad_inputs
from conftest import local_serve

pytestmark = pytest.mark.timeout(600)
APP = "seedoss"
METADATA = (("application", APP),)
ROOT = Path(__file__).resolve().parent.parent
STUBS = ("seedoss_pb2.py", "seedoss_pb2.pyi", "seedoss_pb2_grpc.py")


def test_committed_stubs_are_what_the_script_generates(tmp_path):
    from importlib.metadata import version

    committed = (ROOT / "proto/seedoss/v1/seedoss_pb2_grpc.py").read_text()
    generated_with = committed.split("GRPC_GENERATED_VERSION = '")[1].split("'")[0]
    assert version("grpcio-tools") == generated_with, (
        f"grpcio-tools {version('grpcio-tools')} is installed but the stubs come from {generated_with}: install "
        f"grpcio-tools=={generated_with}, or regenerate with scripts/gen_proto.sh and bump the pin")
    subprocess.run([str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)], check=True, capture_output=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in STUBS:
        fresh = (tmp_path / "proto/seedoss/v1" / name).read_bytes()
        assert (ROOT / "proto/seedoss/v1" / name).read_bytes() == fresh, f"{name} is stale: run scripts/gen_proto.sh"


class _Context:
    """Stands in for Serve's RayServegRPCContext."""

    def __init__(self, metadata=()):
        self.code, self.details, self.trailers, self.metadata = None, None, [], list(metadata)

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailers = metadata


class _Handle:
    """A head handle answering `outcome` (raised when it is an exception); as a stream, yields its chunks."""

    def __init__(self, outcome=None, chunks=()):
        self.outcome, self.chunks, self.cancelled = outcome, list(chunks), False
        self.stream = self.ready = self

    def options(self, **_):
        return self

    def remote(self, body=None):
        async def answer():
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome
        return answer() if not self.chunks else self

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.chunks:
            raise StopAsyncIteration
        chunk = self.chunks.pop(0)
        if isinstance(chunk, BaseException):
            raise chunk
        return chunk

    def cancel(self):
        self.cancelled = True


def _gateway(api_key=None, tokenizer=None, **handles):
    """The gRPC adapter over a real `GatewayCore` whose heads are `_Handle`s."""
    from seedoss.deployments.faults import RetryPolicy, Timeouts
    from seedoss.deployments.gateway_core import GatewayCore
    from seedoss.deployments.grpc_api import GrpcMethods
    from seedoss.deployments.routing import Heads

    class FakeGateway(GrpcMethods):
        core = GatewayCore(Heads({"generate": handles.get("generate", _Handle()), "classify": handles.get("classify"),
                                  "tag": handles.get("tag"), "qa": None}, RetryPolicy(), Timeouts()),
                           tokenizer, "seedoss", api_keys=[api_key] if api_key else None)

    return FakeGateway()


def test_answer_request_maps_the_fields_it_sets():
    from seedoss.deployments.grpc_api import answer_body
    from seedoss.services.qa import QARequest

    assert answer_body(pb.AnswerRequest(question="q", context="c")) == {"question": "q", "context": "c"}
    message = pb.AnswerRequest(question="q", context="c", top_k=3, max_answer_len=5, max_seq_len=128, doc_stride=32,
                               handle_impossible_answer=True, align_to_words=False, strip_whitespace=True)
    assert answer_body(message) == {"question": "q", "context": "c", "top_k": 3, "max_answer_len": 5,
                                    "max_seq_len": 128, "doc_stride": 32, "handle_impossible_answer": True,
                                    "align_to_words": False, "strip_whitespace": True}
    assert set(answer_body(message)) == set(QARequest.model_fields)


def test_task_responses_are_what_parse_dict_makes_of_real_results(demo_checkpoint, monkeypatch):
    """`grpc_api.fill` stands in for `json_format.ParseDict` on the gateway's hot path: the same message for the
    results of every head (the real services on the demo heads, as the heads return them: JSON with None dropped),
    an unknown key skipped, a None left unset, and a generation's usage."""
    import asyncio

    from google.protobuf import json_format

    from seedoss.config import SeedOssConfig
    from seedoss.demo import head_dir
    from seedoss.deployments import grpc_api
    from seedoss.deployments.grpc_api import fill, task_response
    from seedoss.loader import load_head, load_stage
    from seedoss.services.classification import ClassificationService
    from seedoss.services.embeddings import EmbeddingService
    from seedoss.services.qa import QAService
    from seedoss.services.schemas import local_forward
    from seedoss.services.tagging import TaggingService
    from seedoss.tokenizer import SeedOssTokenizer

    stage, texts = load_stage(demo_checkpoint), ["John lives in Paris.", "Short", "Café in Zürich — 東京"]

    def service(task, cls):
        path = head_dir(demo_checkpoint, task)
        tokenizer, labels = SeedOssTokenizer.from_pretrained(path), SeedOssConfig.from_pretrained(path).labels
        forward = local_forward(stage, load_head(path, task))
        return cls(tokenizer, forward, max_length=4096) if task == "qa" else cls(tokenizer, labels, forward,
                                                                                 max_length=4096)

    classify, tag, qa = (service("classify", ClassificationService), service("tag", TaggingService),
                         service("qa", QAService))
    config = SeedOssConfig.from_pretrained(demo_checkpoint)
    embed = EmbeddingService(SeedOssTokenizer.from_pretrained(demo_checkpoint), local_forward(stage, lambda h: h),
                             max_length=config.max_position_embeddings, vocab_size=config.vocab_size)
    calls = [("classify", classify.classify({"inputs": texts})),
             ("classify", classify.classify({"inputs": texts, "top_k": 1, "full_probabilities": True})),
             ("tag", tag.tag({"inputs": texts, "ignore_labels": []})),
             ("tag", tag.tag({"inputs": texts, "aggregation_strategy": "simple", "ignore_labels": []})),
             ("qa", qa.answer({"question": "Where does John live?", "context": texts[0] + " " + texts[2],
                               "top_k": 3})),
             ("embed", embed.embed({"input": texts}))]
    results = [(task, asyncio.run(call).model_dump(mode="json", exclude_none=True)) for task, call in calls]
    ours = [task_response(task, result) for task, result in results]
    monkeypatch.setattr(grpc_api, "fill", lambda message, data: json_format.ParseDict(data, message,
                                                                                      ignore_unknown_fields=True))
    for (task, result), message in zip(results, ours):
        assert message == task_response(task, result), task
        assert len(json_format.MessageToDict(message)) == 2, (task, message)  # its items and usage were filled
    monkeypatch.undo()
    # what ParseDict(ignore_unknown_fields=True) does with a key the message lacks and with None
    result = {"results": [{"predictions": [{"label": "a", "score": 0.5, "new": 1}], "probs": None}],
              "usage": {"prompt_tokens": 3}, "later": {"x": 1}}
    assert task_response("classify", result) == json_format.ParseDict(result, pb.ClassifyResponse(),
                                                                      ignore_unknown_fields=True)
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
             "prompt_tokens_details": {"cached_tokens": 0}}
    expected = json_format.ParseDict(usage, pb.Usage())
    assert fill(pb.Usage(), usage) == expected and fill(pb.Usage(), usage).HasField("prompt_tokens_details")


def test_errors_become_grpc_statuses_without_a_cluster(demo_checkpoint):
    import asyncio

    from seedoss.tokenizer import SeedOssTokenizer

    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from seedoss.services.errors import InvalidRequest

    def classify(gateway, metadata=()):
        context = _Context(metadata)
        response = asyncio.run(gateway.Classify(pb.ClassifyRequest(inputs=["a"]), grpc_context=context))
        return response, context

    ok = {"results": [{"predictions": [{"label": "POS", "score": 0.75}]}], "usage": {"prompt_tokens": 2}}
    response, context = classify(_gateway(classify=_Handle(ok)))
    assert context.code is None and response.results[0].predictions[0].label == "POS"
    _, context = classify(_gateway(classify=_Handle(BackPressureError(8, 8))))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED and ("retry-after", "1") in context.trailers
    _, context = classify(_gateway(classify=_Handle(DeploymentUnavailableError(DeploymentID("Classification", APP)))))
    assert context.code == grpc.StatusCode.UNAVAILABLE and ("retry-after", "5") in context.trailers
    _, context = classify(_gateway(classify=_Handle(RuntimeError("secret detail"))))
    assert context.code == grpc.StatusCode.INTERNAL and "secret" not in context.details and "id" in context.details
    _, context = classify(_gateway())  # no classify head deployed
    assert context.code == grpc.StatusCode.NOT_FOUND
    gateway = _gateway(api_key="k", classify=_Handle(ok))
    _, context = classify(gateway)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    _, context = classify(gateway, [("authorization", "Bearer k")])
    assert context.code is None
    context = _Context()
    health = asyncio.run(_gateway(classify=_Handle(RuntimeError("down"))).Health(pb.HealthRequest(),
                                                                                grpc_context=context))
    assert context.code == grpc.StatusCode.UNAVAILABLE and "classify" in context.details and not health.status

    async def stream(handle, take=None):
        context, received = _Context(), []
        tokenizer = SeedOssTokenizer.from_pretrained(demo_checkpoint)
        generator = _gateway(generate=handle, tokenizer=tokenizer).Generate(pb.GenerateRequest(prompt="x"), grpc_context=context)
        try:
            async for message in generator:
                received.append(message)
                if len(received) == take:
                    await generator.aclose()  # what Serve does when the client cancels
                    break
        except InvalidRequest:
            pass
        return received, context

    chunk = {"id": "r", "choices": [{"index": 0, "text": "a", "token_ids": [5], "finish_reason": None,
                                     "stop_reason": None}]}
    handle = _Handle(chunks=[chunk, chunk, chunk])
    received, context = asyncio.run(stream(handle, take=2))
    assert len(received) == 2 and handle.cancelled and context.code is None
    handle = _Handle(chunks=[chunk, InvalidRequest("max_tokens: too long", param="max_tokens")])
    received, context = asyncio.run(stream(handle))
    assert len(received) == 1 and context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details.startswith("max_tokens") and handle.cancelled


def test_replica_failures_reach_clients_with_an_error_id_and_no_ray_detail(caplog):
    """A dead replica's RayActorError names actor ids, pids and node addresses: the client gets a generic message
    and an error id (gRPC trailer `error-id`), the log gets the detail under the same id."""
    import asyncio
    import logging

    from ray.exceptions import RayActorError

    detail = "The actor 5f2a9c01 died; pid=4242, ip=10.0.0.7, worker /tmp/ray/session_x/logs"
    context = _Context()
    with caplog.at_level(logging.ERROR, logger="seedoss.services.errors"):
        asyncio.run(_gateway(classify=_Handle(RayActorError("5f2a9c01", detail))).Classify(
            pb.ClassifyRequest(inputs=["a"]), grpc_context=context))
    trailers = dict(context.trailers)
    # UNAVAILABLE while the call may be resent, INTERNAL once it counts as a poison request (deployments/faults.py)
    assert context.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    for secret in ("5f2a9c01", "4242", "10.0.0.7", "/tmp/ray", "RayActorError"):
        assert secret not in context.details and secret not in str(context.trailers), secret
    assert len(trailers["error-id"]) == 16 and f"error id {trailers['error-id']}" in caplog.text
    assert "10.0.0.7" in caplog.text


def test_readiness_is_checked_at_most_once_a_second_and_shared():
    import asyncio

    class CountingReady(_Handle):
        calls = 0

        def remote(self, body=None):
            CountingReady.calls += 1
            return super().remote(body)

    gateway = _gateway(classify=CountingReady(True), generate=CountingReady(True))

    async def probes():
        first = await asyncio.gather(*[gateway.core.head_status() for _ in range(10)])  # concurrent probes share one
        again = await gateway.core.head_status()  # within a second: the cached answer
        await asyncio.sleep(1.1)
        later = await gateway.core.head_status()  # stale: checked again
        return first, again, later

    first, again, later = asyncio.run(probes())
    assert all(s == {"generate": "ready", "classify": "ready"} for s in [*first, again, later])
    assert CountingReady.calls == 4  # two heads, checked twice


LIMITS = {"max_body_bytes": 1 << 20}  # the other limits keep their defaults (services/limits.py)


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory):
    from ray import serve

    from seedoss.deployments.app import build_app

    with local_serve(tmp_path_factory, grpc=True) as ray_serve:
        serve.run(build_app({"checkpoint": str(demo_checkpoint), "num_stages": 2, "limits": LIMITS}), name=APP,
                  route_prefix="/")
        with grpc.insecure_channel(ray_serve.grpc) as channel, httpx.Client(base_url=ray_serve.url,
                                                                             timeout=120) as http:
            grpc.channel_ready_future(channel).result(timeout=60)
            yield SimpleNamespace(stub=pb_grpc.SeedOssStub(channel), http=http, checkpoint=demo_checkpoint)


def _generation_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generation", APP).stats.remote().result()


# ------------------------------------------------------------------------------------ proto → HTTP shapes


def _generate_over_grpc(stub, request: pb.GenerateRequest) -> dict:
    """The streamed messages folded into the shape of the HTTP non-streaming answer."""
    choices: dict[int, dict] = {}
    usage, ids, n_messages = None, set(), 0
    for message in stub.Generate(request, metadata=METADATA, timeout=120):
        n_messages += 1
        ids.add(message.id)
        for c in message.choices:
            choice = choices.setdefault(c.index, {"index": c.index, "text": "", "token_ids": [],
                                                  "finish_reason": None, "stop_reason": None})
            choice["text"] += c.text
            choice["reasoning"] = choice.get("reasoning", "") + c.reasoning
            choice["token_ids"] += list(c.token_ids)
            if c.HasField("finish_reason"):
                choice["finish_reason"] = c.finish_reason
            which = c.WhichOneof("stop_reason")
            if which:
                choice["stop_reason"] = getattr(c, which)
            if c.logprobs:
                choice.setdefault("logprobs", []).extend(
                    {"token_id": lp.token_id, "logprob": lp.logprob,
                     "top_logprobs": [{"token_id": t.token_id, "logprob": t.logprob} for t in lp.top_logprobs]}
                    for lp in c.logprobs)
        for choice in choices.values():
            if not choice.get("reasoning"):
                choice.pop("reasoning", None)
        if message.HasField("usage"):
            assert usage is None, "usage comes once, on the last message"
            usage = {"prompt_tokens": message.usage.prompt_tokens,
                     "completion_tokens": message.usage.completion_tokens,
                     "total_tokens": message.usage.total_tokens,
                     "prompt_tokens_details": {"cached_tokens": message.usage.prompt_tokens_details.cached_tokens}}
    assert len(ids) == 1 and n_messages >= 1
    return {"id": ids.pop(), "choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _classify_dict(r: pb.ClassifyResponse) -> dict:
    results = []
    for c in r.results:
        out = {"predictions": [{"label": p.label, "score": p.score} for p in c.predictions]}
        if c.probs:
            out["probs"] = list(c.probs)
        results.append(out)
    return {"results": results, "usage": {"prompt_tokens": r.usage.prompt_tokens}}


def _tag_dict(r: pb.TagResponse) -> dict:
    def entity(e):
        out = {"score": e.score, "word": e.word, "start": e.start, "end": e.end}
        for field in ("entity", "entity_group", "index"):
            if e.HasField(field):
                out[field] = getattr(e, field)
        return out

    return {"results": [[entity(e) for e in t.entities] for t in r.results],
            "usage": {"prompt_tokens": r.usage.prompt_tokens}}


def _answer_dict(r: pb.AnswerResponse) -> dict:
    return {"answers": [{"score": a.score, "start": a.start, "end": a.end, "answer": a.answer} for a in r.answers],
            "usage": {"prompt_tokens": r.usage.prompt_tokens}}


def _assert_close(got, expected, path="$"):
    if isinstance(expected, float):
        assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), path
    elif isinstance(expected, dict):
        assert set(got) == set(expected), (path, set(got) ^ set(expected))
        for k in expected:
            _assert_close(got[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_close(g, e, f"{path}[{i}]")
    else:
        assert got == expected, path


# ------------------------------------------------------------------------------------------------- tests


def test_generate_equals_http(server):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    cases = [  # (HTTP body, the same request as a message)
        ({"prompt": "Hello world", "max_tokens": 12, "temperature": 0},
         pb.GenerateRequest(prompt="Hello world", max_tokens=12, temperature=0)),
        ({"prompt": "The history of the city", "max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "top_k": 50,
          "seed": 3, "n": 2, "logprobs": 2},
         pb.GenerateRequest(prompt="The history of the city", max_tokens=10, temperature=0.8, top_p=0.9, top_k=50,
                            seed=3, n=2, logprobs=2)),
        ({"prompt_token_ids": [0, 17, 93, 211, 45], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
          "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.2, "min_tokens": 4},
         pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[0, 17, 93, 211, 45]), max_tokens=8, temperature=0,
                            ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
                            min_tokens=4)),
        ({"messages": chat, "chat_template_kwargs": {"thinking_budget": 512}, "max_tokens": 10, "temperature": 0},
         pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in chat],
                                         chat_template_kwargs={"thinking_budget": 512}), max_tokens=10, temperature=0)),
        ({"messages": chat, "max_tokens": 10, "temperature": 0, "thinking_token_budget": 3},
         pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in chat]), max_tokens=10, temperature=0,
                            thinking_token_budget=3)),
        ({"prompt": "Colour:", "max_tokens": 8, "temperature": 0.9, "seed": 1,
          "structured_outputs": {"choice": ["red", "deep blue"]}},
         pb.GenerateRequest(prompt="Colour:", max_tokens=8, temperature=0.9, seed=1,
                            structured_outputs={"choice": ["red", "deep blue"]})),
        ({"messages": chat, "max_tokens": 30, "temperature": 0, "structured_outputs": {"regex": "[0-9]{2}-[a-z]{3}"}},
         pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in chat]), max_tokens=30, temperature=0,
                            structured_outputs={"regex": "[0-9]{2}-[a-z]{3}"})),
    ]
    # a stop string and a stop token taken from the greedy continuation, so that both stop reasons occur
    greedy = server.http.post("/v1/generate", json=cases[0][0]).json()["choices"][0]
    stop_text = greedy["text"][len(greedy["text"]) // 2:][:2]
    assert stop_text.strip(), greedy
    cases += [
        ({"prompt": "Hello world", "max_tokens": 12, "temperature": 0, "stop": [stop_text]},
         pb.GenerateRequest(prompt="Hello world", max_tokens=12, temperature=0, stop=[stop_text])),
        ({"prompt": "Hello world", "max_tokens": 12, "temperature": 0, "stop_token_ids": [greedy["token_ids"][5]]},
         pb.GenerateRequest(prompt="Hello world", max_tokens=12, temperature=0,
                            stop_token_ids=[greedy["token_ids"][5]])),
    ]
    stop_reasons = set()
    for body, message in cases:
        r = server.http.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        expected = r.json()
        if "messages" in body and "structured_outputs" not in body:  # gRPC chat: thinking apart (seed_oss parser)
            for c in expected["choices"]:
                thinking, c["text"] = reasoning.split(c["text"])
                c["text"] = c["text"] or ""
                if thinking:
                    c["reasoning"] = thinking
        got = _generate_over_grpc(server.stub, message)
        got["id"] = expected["id"]  # request ids differ between calls
        # the same prompt just ran over HTTP: gRPC finds all its whole blocks (but the last token) cached
        cached = got["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (expected["usage"]["prompt_tokens"] - 1) // 16 * 16
        expected["usage"]["prompt_tokens_details"]["cached_tokens"] = cached
        _assert_close(got, expected)
        stop_reasons |= {type(c["stop_reason"]) for c in got["choices"]}
    assert {str, int} <= stop_reasons
    colour = server.http.post("/v1/generate", json=cases[5][0]).json()["choices"][0]["text"]
    budgeted = _generate_over_grpc(server.stub, cases[4][1])["choices"][0]
    assert colour in ("red", "deep blue") and budgeted["text"] and budgeted["reasoning"]
    bad = pb.GenerateRequest(prompt="x", structured_outputs={"regex": "[a-"})
    with pytest.raises(grpc.RpcError) as e:
        _generate_over_grpc(server.stub, bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured_outputs" in e.value.details()


def test_heads_equal_http(server):
    cases = [
        ("/v1/classify", {"inputs": ["what a lovely day", "this is terrible"], "full_probabilities": True},
         server.stub.Classify, pb.ClassifyRequest(inputs=["what a lovely day", "this is terrible"],
                                                  full_probabilities=True), _classify_dict),
        ("/v1/classify", {"inputs": ["ça va très bien"], "top_k": 1, "function_to_apply": "sigmoid"},
         server.stub.Classify, pb.ClassifyRequest(inputs=["ça va très bien"], top_k=1,
                                                  function_to_apply=pb.FUNCTION_TO_APPLY_SIGMOID), _classify_dict),
        ("/v1/tag", {"inputs": "Ada Lovelace met Charles Babbage in London.", "aggregation_strategy": "simple",
                     "ignore_labels": []},
         server.stub.TagTokens, pb.TagRequest(inputs=["Ada Lovelace met Charles Babbage in London."],
                                              aggregation_strategy=pb.AGGREGATION_STRATEGY_SIMPLE,
                                              ignore_labels=pb.StringList()), _tag_dict),
        ("/v1/tag", {"inputs": ["Zoë lives in Zürich", "東京に住んでいます"]},
         server.stub.TagTokens, pb.TagRequest(inputs=["Zoë lives in Zürich", "東京に住んでいます"]), _tag_dict),
        ("/v1/answer", {"question": "Where did they meet?", "context": "Ada Lovelace met Charles Babbage in London "
                        "in 1833, at a party.", "top_k": 3, "max_answer_len": 8},
         server.stub.AnswerQuestion, pb.AnswerRequest(question="Where did they meet?", context="Ada Lovelace met "
                                                      "Charles Babbage in London in 1833, at a party.", top_k=3,
                                                      max_answer_len=8), _answer_dict),
        ("/v1/answer", {"question": "Who?", "context": "Ada Lovelace met Charles Babbage in London.", "top_k": 4,
                        "align_to_words": False, "strip_whitespace": True, "handle_impossible_answer": True},
         server.stub.AnswerQuestion, pb.AnswerRequest(question="Who?", context="Ada Lovelace met Charles Babbage in "
                                                      "London.", top_k=4, align_to_words=False,
                                                      strip_whitespace=True, handle_impossible_answer=True),
         _answer_dict),
    ]
    for route, body, rpc, message, as_dict in cases:
        r = server.http.post(route, json=body)
        assert r.status_code == 200, r.text
        _assert_close(as_dict(rpc(message, metadata=METADATA, timeout=120)), r.json())


def test_tokenize_models_and_health(server):
    from seedoss.tokenizer import SeedOssTokenizer

    tok = SeedOssTokenizer.from_pretrained(server.checkpoint)
    r = server.stub.Tokenize(pb.TokenizeRequest(prompt="Hello world", return_token_strs=True), metadata=METADATA)
    assert list(r.token_ids) == tok.encode("Hello world") and r.count == len(r.token_ids)
    assert list(r.token_strs) == tok.convert_ids_to_tokens(list(r.token_ids))
    r = server.stub.Tokenize(pb.TokenizeRequest(prompt="Hello world", add_special_tokens=False), metadata=METADATA)
    assert list(r.token_ids) == tok.encode("Hello world", add_special_tokens=False) and not r.token_strs
    messages = [{"role": "user", "content": "Hi there"}]
    r = server.stub.Tokenize(pb.TokenizeRequest(chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in messages],
                                                             chat_template_kwargs={"thinking_budget": 256})),
                             metadata=METADATA)
    assert list(r.token_ids) == tok.apply_chat_template(messages, tokenize=True, thinking_budget=256)
    assert "256" in tok.decode(list(r.token_ids), skip_special_tokens=False)  # an int, not 256.0, in the template

    models = server.stub.ListModels(pb.ListModelsRequest(), metadata=METADATA).models
    assert [(m.id, m.object, sorted(m.tasks)) for m in models] == [("seedoss", "model",
                                                                     ["classify", "embed", "generate", "qa", "tag"])]
    health = server.stub.Health(pb.HealthRequest(), metadata=METADATA)
    http = server.http.get("/health/ready").json()
    assert health.status == http["status"] == "ready" and dict(health.heads) == http["heads"]
    assert server.stub.Health(pb.HealthRequest(liveness_only=True), metadata=METADATA).status == "alive"


def test_cancelled_stream_stops_the_generation_and_frees_its_cache(server):
    idle = _generation_stats()
    assert idle["num_running"] == 0 and idle["kv_usage"] == 0.0
    max_tokens = 1500
    call = server.stub.Generate(pb.GenerateRequest(prompt="A long story begins", max_tokens=max_tokens,
                                                   temperature=0, ignore_eos=True), metadata=METADATA, timeout=300)
    received = 0
    for _ in call:
        received += 1
        if received == 3:
            busy = _generation_stats()
            call.cancel()
            break
    assert busy["num_running"] == 1 and busy["kv_usage"] > 0.0
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 60
    while True:
        stats = _generation_stats()
        if (stats["num_running"] == 0 and stats["kv_usage"] == 0.0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_usage"] == 0.0, stats
    # it stopped: far fewer tokens than it was allowed, and no more come later
    generated = stats["generation_tokens"] - idle["generation_tokens"]
    assert generated < max_tokens // 2, generated
    time.sleep(1)
    assert _generation_stats()["generation_tokens"] == stats["generation_tokens"]


def test_bad_input_is_invalid_argument_naming_the_field(server):
    s = server.stub
    cases = [
        (s.Generate, pb.GenerateRequest(prompt="x", temperature=-1), "temperature"),
        (s.Generate, pb.GenerateRequest(prompt="x", top_p=0), "top_p"),
        (s.Generate, pb.GenerateRequest(prompt="x", max_tokens=10**6), "max_tokens"),
        (s.Generate, pb.GenerateRequest(prompt="x", logprobs=50), "logprobs"),
        (s.Generate, pb.GenerateRequest(max_tokens=4), "prompt"),
        (s.Generate, pb.GenerateRequest(prompt=""), "prompt"),
        (s.Generate, pb.GenerateRequest(chat=pb.Chat()), "chat.messages"),
        (s.Classify, pb.ClassifyRequest(), "inputs"),
        (s.Classify, pb.ClassifyRequest(inputs=["a"], top_k=0), "top_k"),
        (s.Classify, pb.ClassifyRequest(inputs=["a"], function_to_apply=99), "function_to_apply"),
        (s.TagTokens, pb.TagRequest(inputs=["a"], stride=-1), "stride"),
        (s.AnswerQuestion, pb.AnswerRequest(question="q"), "context"),
        (s.Tokenize, pb.TokenizeRequest(), "prompt"),
    ]
    for rpc, message, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            result = rpc(message, metadata=METADATA, timeout=60)
            if rpc is s.Generate:
                list(result)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, e.value.code(), e.value.details())
        assert e.value.details().startswith(field), (field, e.value.details())
    # unary errors also carry the field and error type as trailing metadata
    with pytest.raises(grpc.RpcError) as e:
        s.Classify(pb.ClassifyRequest(), metadata=METADATA, timeout=60)
    trailers = dict(e.value.trailing_metadata())
    assert trailers["error-param"] == "inputs" and trailers["error-type"] == "invalid_request_error"
    # the server keeps serving
    assert s.Health(pb.HealthRequest(), metadata=METADATA).status == "ready"


@pytest.mark.parametrize("route, body, status, needle", HTTP_BAD_INPUTS,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(HTTP_BAD_INPUTS)])
def test_http_bad_inputs_get_documented_4xx(server, route, body, status, needle):
    r = (server.http.post(route, content=body) if isinstance(body, bytes) else server.http.post(route, json=body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in f"{error['param']} {error['message']}"
    assert "Traceback" not in error["message"]


def test_grpc_bad_inputs_get_invalid_argument_and_the_server_keeps_serving(server):
    for rpc, request, needle in grpc_bad_inputs():
        with pytest.raises(grpc.RpcError) as e:
            response = getattr(server.stub, rpc)(request, metadata=METADATA)
            if rpc == "Generate":
                list(response)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, e.value.details())
        assert needle in e.value.details(), (rpc, e.value.details())
    assert len(HTTP_BAD_INPUTS) + len(grpc_bad_inputs()) >= 90
    assert server.http.post("/v1/generate", json={"prompt": "still fine", "max_tokens": 2}).status_code == 200
    assert server.http.get("/health/ready").json()["status"] == "ready"
    assert server.stub.Health(pb.HealthRequest(), metadata=METADATA).status == "ready"


def test_embed_equals_transformers_and_names_bad_fields(server, demo_checkpoint):
    import numpy as np
    import torch
    from transformers import SeedOssModel

    from seedoss.tokenizer import SeedOssTokenizer

    texts = ["Hello world", "The history of the city is long and full of surprises", "a"]
    model = SeedOssModel.from_pretrained(demo_checkpoint).eval()
    tok = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    response = server.stub.Embed(pb.EmbedRequest(texts=texts, pooling="mean"), metadata=METADATA)
    assert len(response.embeddings) == 3 and response.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    for text, got in zip(texts, response.embeddings):
        with torch.no_grad():
            states = model(torch.tensor([tok.encode(text)])).last_hidden_state[0].numpy()
        expected = states.mean(axis=0) / np.linalg.norm(states.mean(axis=0))
        assert np.abs(np.array(got.values) - expected).max() <= 1e-5
    by_ids = server.stub.Embed(pb.EmbedRequest(token_ids=[pb.TokenIds(ids=tok.encode(texts[0]))], pooling="mean"),
                               metadata=METADATA)
    assert np.allclose(by_ids.embeddings[0].values, response.embeddings[0].values, atol=1e-6)
    for request, field in [(pb.EmbedRequest(), "input"), (pb.EmbedRequest(texts=["a"], dimensions=0), "dimensions"),
                           (pb.EmbedRequest(texts=["a"], token_ids=[pb.TokenIds(ids=[1])]), "texts")]:
        with pytest.raises(grpc.RpcError) as e:
            server.stub.Embed(request, metadata=METADATA)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
