"""Property-based fuzzing against the live demo app (issue 11), short: bench/fuzz.py's harness for about a minute.

schemathesis generates valid and invalid requests for every operation of the gateway's OpenAPI document, hypothesis
strategies built from the proto descriptors every gRPC request message. Properties: no HTTP 5xx, no gRPC INTERNAL /
UNKNOWN / UNAVAILABLE / DEADLINE_EXCEEDED, no hang (a 60 s client timeout), no Serve replica replaced, and a normal
request over each transport still answered afterwards. Seeds are fixed per round, so a run is reproducible; the
longer run is `python -m bench.fuzz --minutes 10`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.fuzz import fuzz_grpc, fuzz_http, replica_actors, start_demo_server, still_serving  # noqa: E402

pytestmark = pytest.mark.timeout(600)
HTTP_SECONDS = 40
GRPC_SECONDS = 25


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_demo_server(str(tmp_path_factory.mktemp("fuzz")))
    yield server
    server.shutdown()


def test_fuzzed_requests_get_no_server_errors_and_replicas_survive(server):
    replicas = replica_actors()
    assert any("#Gateway#" in name for name in replicas) and any("#SeedOssStage1#" in name for name in replicas)
    http = fuzz_http(server.http_url, HTTP_SECONDS)
    grpc = fuzz_grpc(server.grpc_target, GRPC_SECONDS)
    print("HTTP:\n" + http.summary() + "\ngRPC:\n" + grpc.summary())
    assert not http.failures, http.summary()
    assert not grpc.failures, grpc.summary()
    # every route and every RPC was reached, and some requests were served, not only rejected
    assert {o.rsplit(" ", 1)[0] for o in http.outcomes} >= {"POST /v1/generate", "POST /v1/chat/completions",
                                                            "POST /v1/completions", "POST /v1/classify",
                                                            "POST /v1/tag", "POST /v1/answer", "POST /tokenize"}
    assert {o.split(" ")[0] for o in grpc.outcomes} == {"Generate", "Classify", "TagTokens", "AnswerQuestion",
                                                        "Embed", "Tokenize", "ListModels", "Health"}
    assert any(o.endswith(" 200") and "POST" in o for o in http.outcomes)
    assert any(o.startswith(("Classify OK", "Generate OK")) for o in grpc.outcomes)
    assert still_serving(server.http_url, server.grpc_target) == []
    assert replica_actors() == replicas, "a replica died and was replaced during fuzzing"
