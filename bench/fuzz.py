"""Property-based fuzzing of a live SeedOss Serve application (issue 11): generated requests, valid and invalid,
against every HTTP route and every gRPC method, then the properties a hostile client must not break.

    python -m bench.fuzz --minutes 10                        # starts the demo app (HTTP + gRPC) and fuzzes it
    python -m bench.fuzz --http URL --grpc HOST:PORT --minutes 10   # an already running app (no replica check)

- HTTP: schemathesis generates requests for every operation of the gateway's OpenAPI document (`/openapi.json`;
  the routes declare their body models, deployments/ingress.py:body_schema), in its positive (schema-valid) and
  negative (schema-violating) modes.
- gRPC: hypothesis strategies built from the proto descriptors (`grpc_message`): every field, random presence, any
  int32/int64, NaN/inf doubles, unknown enum numbers, arbitrary Structs, token ids out of range, any oneof member.

Properties: no HTTP 5xx and no gRPC INTERNAL / UNKNOWN / UNAVAILABLE / DEADLINE_EXCEEDED (the client timeout: a
hang), no transport error, no Serve replica restarted (the named replica actors are the same before and after),
and a normal request over each transport still answered afterwards. Requests ask for at most MAX_NEW_TOKENS new
tokens (generated `max_tokens` values above it, and null, are lowered): request handling is fuzzed, not decodes.
tests/test_fuzz.py runs the same harness for about a minute in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script or module from the repository
    sys.path.insert(0, str(ROOT))

APP = "seedoss"
MAX_NEW_TOKENS = 8
REQUEST_TIMEOUT_S = 60.0
FAILING_GRPC_CODES = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"}


@dataclass
class FuzzReport:
    requests: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "POST /v1/generate 400", "Generate INVALID_ARGUMENT"
    failures: list[str] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)  # outcome -> the answer of its first request

    def record(self, outcome: str, failed: bool, detail: str = "") -> None:
        self.requests += 1
        self.outcomes[outcome] += 1
        self.samples.setdefault(outcome, detail[-160:])
        if failed and len(self.failures) < 50:
            self.failures.append(f"{outcome}: {detail}"[:20_000])  # whole bodies: a failure must be replayable

    def summary(self) -> str:
        lines = [f"{self.requests} requests, {len(self.failures)} failures"]
        lines += [f"  {n:6d}  {outcome:40s} e.g. {self.samples[outcome]}"
                  for outcome, n in sorted(self.outcomes.items())]
        lines += [f"  FAIL {f}" for f in self.failures]
        return "\n".join(lines)


def _cap_tokens(body) -> None:
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_NEW_TOKENS:
                body[name] = MAX_NEW_TOKENS
        if (body.get("max_tokens") is None and body.get("max_completion_tokens") is None
                and ("max_tokens" in body or "messages" in body)):
            body["max_tokens"] = MAX_NEW_TOKENS  # null, and chat's default, mean "the rest of the context"


def _until(deadline: float, run_round) -> None:
    """`run_round(seed)` again and again with fresh seeds until `deadline`."""
    round_seed = 0
    while time.monotonic() < deadline:
        run_round(round_seed)
        round_seed += 1


# ---------------------------------------------------------------------------------------------------------- HTTP


def fuzz_http(base_url: str, seconds: float, *, examples: int = 10, headers: dict | None = None) -> FuzzReport:
    """Schemathesis cases for every operation of `base_url`'s OpenAPI document, positive and negative, round-robin
    `examples` at a time until `seconds` have passed."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    session, report = requests.Session(), FuzzReport()
    deadline = time.monotonic() + seconds
    config = settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))

    def one(case) -> None:
        if time.monotonic() >= deadline:
            return
        _cap_tokens(case.body)
        outcome = f"{case.operation.method.upper()} {case.operation.path}"
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
        except Exception as e:  # a timeout (hang) or a dropped connection
            report.record(f"{outcome} {type(e).__name__}", True, json.dumps(case.body, default=str))
            return
        failed = response.status_code >= 500
        report.record(f"{outcome} {response.status_code}", failed, f"body={case.body!r:.500} -> {response.text[:500]}")

    def run_round(round_seed: int) -> None:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if time.monotonic() >= deadline:
                    return
                try:
                    seed(round_seed)(config(given(operation.as_strategy(generation_mode=mode))(one)))()
                except Unsatisfiable:  # nothing to violate (a GET without parameters has no negative cases)
                    pass

    _until(deadline, run_round)
    return report


# ---------------------------------------------------------------------------------------------------------- gRPC


def grpc_message(descriptor, depth: int = 0):
    """A hypothesis strategy of `descriptor`'s messages: each field present or not, any value of its type."""
    from google.protobuf import struct_pb2
    from google.protobuf.descriptor import FieldDescriptor as F
    from google.protobuf.message_factory import GetMessageClass
    from hypothesis import strategies as st

    cls = GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Struct":
        json = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)

        def struct(d):
            message = struct_pb2.Struct()
            message.update(d)
            return message

        return st.dictionaries(st.text(max_size=12), json, max_size=4).map(struct)

    def scalar(f):
        if f.type == F.TYPE_MESSAGE:
            return grpc_message(f.message_type, depth + 1) if depth < 3 else st.just(GetMessageClass(f.message_type)())
        if f.type == F.TYPE_ENUM:
            return st.integers(0, len(f.enum_type.values) + 2)  # unknown numbers too (a newer client)
        if f.type == F.TYPE_BOOL:
            return st.booleans()
        if f.type == F.TYPE_STRING:
            return st.text(max_size=60) | st.sampled_from(["", " ", "user", "assistant", "\x00", "é" * 300])
        if f.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return st.floats(width=64 if f.type == F.TYPE_DOUBLE else 32)
        if f.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return st.integers(-3, 40) | st.integers(-(2**31), 2**31 - 1)
        if f.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
            return st.integers(-3, 40) | st.integers(-(2**63), 2**63 - 1)
        if f.type in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return st.integers(0, 2**32 - 1)
        if f.type in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return st.integers(0, 2**64 - 1)
        return st.binary(max_size=20)

    def value(f):
        return st.lists(scalar(f), max_size=4) if f.is_repeated else scalar(f)

    oneofs = [o for o in descriptor.oneofs if not getattr(o, "is_synthetic", False) and len(o.fields) > 1]
    in_oneof = {f.name for o in oneofs for f in o.fields}
    plain = st.fixed_dictionaries({}, optional={f.name: value(f) for f in descriptor.fields if f.name not in in_oneof})
    choices = [st.one_of(st.just({}), *[value(f).map(lambda v, n=f.name: {n: v}) for f in o.fields]) for o in oneofs]
    return st.tuples(plain, *choices).map(lambda parts: cls(**{k: v for part in parts for k, v in part.items()}))


def fuzz_grpc(target: str, seconds: float, *, examples: int = 10, metadata=()) -> FuzzReport:
    """Hypothesis messages for every RPC of `seedoss.v1.SeedOss`, round-robin until `seconds` have passed."""
    import grpc
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
    from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target)
    stub = pb_grpc.SeedOssStub(channel)
    metadata = (("application", APP), *metadata)
    methods = pb.DESCRIPTOR.services_by_name["SeedOss"].methods
    report, deadline = FuzzReport(), time.monotonic() + seconds
    config = settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))

    def call(method, message) -> None:
        if time.monotonic() >= deadline:
            return
        if method.name == "Generate" and message.HasField("max_tokens"):
            message.max_tokens = min(message.max_tokens, MAX_NEW_TOKENS)
        rpc = getattr(stub, method.name)
        try:
            result = rpc(message, metadata=metadata, timeout=REQUEST_TIMEOUT_S)
            if method.server_streaming:
                list(result)
            report.record(f"{method.name} OK", False)
        except grpc.RpcError as e:
            code = e.code().name
            failed = code in FAILING_GRPC_CODES
            report.record(f"{method.name} {code}", failed, f"{message!r:.500} -> {e.details()}")

    def calling(method):
        return lambda message: call(method, message)

    def run_round(round_seed: int) -> None:
        for method in methods:
            if time.monotonic() >= deadline:
                return
            seed(round_seed)(config(given(grpc_message(method.input_type))(calling(method))))()

    try:
        _until(deadline, run_round)
    finally:
        channel.close()
    return report


# ------------------------------------------------------------------------------------------- the server, checks


def replica_actors() -> set[str]:
    """Names of the app's live Serve replica actors (a replica that died and was replaced changes the set)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def still_serving(http_url: str, grpc_target: str, headers: dict | None = None, metadata=()) -> list[str]:
    """Problems with a normal generation request over each transport (empty when both are answered)."""
    import grpc
    import httpx

    from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
    from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc as pb_grpc

    problems = []
    r = httpx.post(f"{http_url}/v1/generate", json={"prompt": "Hello", "max_tokens": 4}, headers=headers,
                   timeout=REQUEST_TIMEOUT_S)
    if r.status_code != 200 or len(r.json()["choices"][0]["token_ids"]) != 4:
        problems.append(f"HTTP generate after fuzzing: {r.status_code} {r.text[:300]}")
    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.SeedOssStub(channel)
        messages = list(stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=4),
                                      metadata=(("application", APP), *metadata), timeout=REQUEST_TIMEOUT_S))
        if sum(len(c.token_ids) for m in messages for c in m.choices) != 4:
            problems.append(f"gRPC generate after fuzzing: {messages}")
    return problems


def start_demo_server(temp_dir: str, num_cpus: int = 2):
    """The demo app (2 stages, every head) on a local Ray instance with HTTP and gRPC proxies."""
    from seedoss.demo import write_demo_checkpoint

    from bench.soak import start_server

    checkpoint = Path(temp_dir) / "demo"
    write_demo_checkpoint(checkpoint)
    return start_server(checkpoint, str(Path(temp_dir) / "ray"), num_cpus=num_cpus)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="total fuzzing time, split between HTTP and gRPC")
    p.add_argument("--http", help="base URL of a running app (default: start the demo app)")
    p.add_argument("--grpc", help="host:port of the running app's gRPC proxy")
    p.add_argument("--examples", type=int, default=10, help="cases per operation and mode before moving on")
    args = p.parse_args(argv)
    seconds = args.minutes * 60
    server = None
    if args.http is None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        server = start_demo_server(tempfile.mkdtemp(prefix="seedoss-fuzz-"))
        args.http, args.grpc = server.http_url, server.grpc_target
    try:
        before = replica_actors() if server else set()
        http = fuzz_http(args.http, seconds / 2, examples=args.examples)
        print("HTTP (schemathesis):\n" + http.summary(), flush=True)
        grpc_report = fuzz_grpc(args.grpc, seconds / 2, examples=args.examples)
        print("gRPC (hypothesis):\n" + grpc_report.summary(), flush=True)
        problems = still_serving(args.http, args.grpc)
        if server and replica_actors() != before:
            problems.append(f"replicas changed: {sorted(before ^ replica_actors())}")
        for problem in problems:
            print("FAIL", problem)
        ok = not (http.failures or grpc_report.failures or problems)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if server:
            server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
