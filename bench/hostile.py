"""The table of hostile requests (issue 11): every input that once answered 500, hung or cost unbounded work, plus
each limit of services/limits.py, with the answer the server documents for it. `tests/test_grpc.py` checks each
answer against a live app (with `max_body_bytes` 1 MiB; the other limits at their defaults); `bench/soak.py
--hostile` mixes them into the soak's load (there any 4xx / non-server gRPC error counts as refused)."""

from __future__ import annotations

from google.protobuf import struct_pb2

from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb

# (route, body: dict | raw bytes, HTTP status, text the error message or param must contain)
HTTP_BAD_INPUTS = [
    ("/v1/generate", b"{not json", 400, "JSON"),
    ("/v1/generate", b"\xff\xfe\x00", 400, "UTF-8"),
    ("/v1/generate", b"[1, 2]", 400, "JSON object"),
    ("/v1/generate", {}, 400, "prompt"),
    ("/v1/generate", {"prompt": ""}, 400, "empty"),
    ("/v1/generate", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/generate", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/generate", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/generate", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("/v1/generate", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/generate", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/generate", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/generate", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/generate", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/generate", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/generate", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/generate", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/generate", {"prompt_token_ids": [999999]}, 400, "prompt"),
    ("/v1/generate", {"prompt_token_ids": [5] * 5000}, 400, "prompt"),
    ("/v1/generate", {"prompt": "x", "tempurature": 1}, 400, "tempurature"),
    ("/v1/generate", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/classify", {"inputs": []}, 400, "inputs"),
    ("/v1/classify", {"inputs": ["x"], "top_k": 0}, 400, "top_k"),
    ("/v1/classify", {"inputs": ["x"], "function_to_apply": "relu"}, 400, "function_to_apply"),
    ("/v1/classify", {"inputs": ["x" * 40000]}, 400, "inputs"),
    ("/v1/tag", {"inputs": "x", "aggregation_strategy": "bogus"}, 400, "aggregation_strategy"),
    ("/v1/tag", {"inputs": ""}, 400, "inputs"),
    ("/v1/answer", {"question": "q"}, 400, "context"),
    ("/v1/answer", {"question": "q", "context": "c", "max_answer_len": 0}, 400, "max_answer_len"),
    ("/v1/answer", {"question": "q", "context": "c", "max_seq_len": 16, "doc_stride": 16}, 400, "doc_stride"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "seedoss", "prompt": "x", "logit_bias": {"5": 3}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": "seedoss", "messages": []}, 400, "messages"),
    ("/v1/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/nonexistent", {}, 404, "path"),
    # issue 11: what answered 500 (lone surrogates, token ids out of range, deep nesting, huge integers) ...
    ("/v1/generate", b'{"prompt": "\\ud800", "max_tokens": 2}', 400, "prompt"),
    ("/v1/generate", b'{"prompt": "x", "stop": ["a\\udfff"]}', 400, "stop.0"),
    ("/v1/completions", b'{"prompt": "ok \\ud800"}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content"),
    ("/v1/classify", b'{"inputs": ["\\udbff"]}', 400, "inputs.0"),
    ("/v1/tag", b'{"inputs": "\\ud800"}', 400, "inputs"),
    ("/v1/answer", b'{"question": "q", "context": "\\ud800"}', 400, "context"),
    ("/tokenize", b'{"prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2**40]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[5, 6], [2**40]]}, 400, "prompt"),
    ("/v1/generate", {"prompt_token_ids": [-1]}, 400, "prompt"),
    ("/v1/generate", {"prompt_token_ids": [2**40]}, 400, "prompt"),
    ("/v1/generate", b'{"prompt": "x", "max_tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "body"),
    ("/v1/generate", b'{"prompt": "x", "chat_template_kwargs": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, 400, "body"),
    ("/v1/generate", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, "body"),
    # ... and the limits (services/limits.py), each naming its field
    ("/v1/generate", {"prompt": "x", "n": 10**9}, 400, "n"),
    ("/v1/generate", {"prompt": "x", "n": 17}, 400, "n"),
    ("/v1/generate", {"prompt": "x", "n": 616941447.0}, 400, "n"),  # a float: lax mode would make it an int
    ("/v1/completions", {"prompt": "x", "n": 1e9}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
    ("/v1/generate", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("/v1/generate", {"prompt": "x", "stop": ["y" * 257]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["y" * 257]}, 400, "stop"),
    ("/v1/generate", {"prompt": "x" * 500_001}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x" * 250_001, "y" * 250_000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 33}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 500_001}]}, 400, "messages"),
    ("/tokenize", {"prompt": "x" * 500_001}, 400, "prompt"),
    ("/v1/classify", {"inputs": ["x"] * 33}, 400, "inputs"),
    ("/v1/tag", {"inputs": ["x"] * 33}, 400, "inputs"),
    ("/v1/classify", {"inputs": ["x" * 500_001]}, 400, "inputs"),
    ("/v1/classify", {"inputs": ["word " * 1100] * 32}, 400, "inputs"),  # 32 × ~1100 tokens > 32768
    ("/v1/tag", {"inputs": "word " * 10_000, "stride": 4094, "aggregation_strategy": "simple"}, 400, "stride"),
    ("/v1/answer", {"question": "q", "context": "word " * 20_000, "max_seq_len": 200, "doc_stride": 190}, 400,
     "doc_stride"),
    ("/v1/generate", {"prompt": "x" * (1 << 20)}, 413, "body"),
]


def grpc_bad_inputs() -> list[tuple]:  # built on call: messages are mutable
    """(RPC, request message, text the status details must contain)."""
    return [
        ("Generate", pb.GenerateRequest(prompt="x", temperature=-1), "temperature"),
        ("Generate", pb.GenerateRequest(), "prompt"),
        ("Generate", pb.GenerateRequest(prompt="x", max_tokens=100000), "max_tokens"),
        ("Generate", pb.GenerateRequest(prompt="x", top_p=1.5), "top_p"),
        ("Classify", pb.ClassifyRequest(inputs=[]), "inputs"),
        ("Classify", pb.ClassifyRequest(inputs=["x"], top_k=0), "top_k"),
        ("TagTokens", pb.TagRequest(inputs=["x"], stride=3), "stride"),
        ("AnswerQuestion", pb.AnswerRequest(question="", context="c"), "question"),
        ("AnswerQuestion", pb.AnswerRequest(question="q", context="c", max_answer_len=0), "max_answer_len"),
        ("Tokenize", pb.TokenizeRequest(), "prompt"),
        # issue 11 limits (services/limits.py) and the message size (HTTP's max_body_bytes)
        ("Generate", pb.GenerateRequest(prompt="x", n=17), "n"),
        ("Generate", pb.GenerateRequest(prompt="x", stop=[f"s{i}" for i in range(17)]), "stop"),
        ("Generate", pb.GenerateRequest(prompt="x", stop=["y" * 257]), "stop"),
        ("Generate", pb.GenerateRequest(prompt="x" * 500_001), "prompt"),
        ("Generate", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[-1])), "prompt"),
        ("Generate", pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="x" * 500_001)])),
         "chat.messages"),
        ("Generate", pb.GenerateRequest(prompt="x" * ((1 << 20) + 1)), "gRPC message"),
        ("Classify", pb.ClassifyRequest(inputs=["x"] * 33), "inputs"),
        ("Classify", pb.ClassifyRequest(inputs=["word " * 1100] * 32), "inputs"),
        ("Classify", pb.ClassifyRequest(inputs=["x" * ((1 << 20) + 1)]), "gRPC message"),
        ("TagTokens", pb.TagRequest(inputs=["word " * 10_000], stride=4094,
                                    aggregation_strategy=pb.AGGREGATION_STRATEGY_SIMPLE), "stride"),
        ("AnswerQuestion", pb.AnswerRequest(question="q", context="word " * 20_000, max_seq_len=200, doc_stride=190),
         "doc_stride"),
        ("Tokenize", pb.TokenizeRequest(prompt="x" * 500_001), "prompt"),
        # found by bench/fuzz.py: a Struct holding infinity (JSON has none) was an INTERNAL error
        ("Generate", pb.GenerateRequest(chat=pb.Chat(
            messages=[pb.ChatMessage(role="user", content="x")],
            chat_template_kwargs=struct_pb2.Struct(fields={"t": struct_pb2.Value(number_value=float("inf"))}))),
         "chat.chat_template_kwargs"),
        ("Tokenize", pb.TokenizeRequest(chat=pb.Chat(messages=[pb.ChatMessage(
            role="user", content="x", extra=struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=float("nan"))}))])),
         "chat.messages.0.extra"),
    ]
