"""Constrained decoding (seedoss/structured.py, the sampler's grammar mask) on the random-weight demo model: the
output follows the grammar whatever the weights, constrained and unconstrained rows share batches unchanged."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from seedoss.engine import LLMEngine, collect
from seedoss.sampling import SamplingParams
from seedoss.structured import StructuredOutputs, check
from seedoss.tokenizer import SeedOssTokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint):
    return SeedOssTokenizer.from_pretrained(demo_checkpoint)


def _run(checkpoint, tokenizer, params_list, prompt="Describe a person"):
    engine = LLMEngine.from_checkpoint(checkpoint)
    ids = tokenizer.encode(prompt)

    async def go():
        try:
            return await asyncio.gather(*[collect(engine.generate(ids, p)) for p in params_list])
        finally:
            await engine.shutdown()

    return [r.outputs[0] for r in asyncio.run(go())]


def test_constrained_rows_follow_their_grammar_beside_free_rows(demo_checkpoint, tokenizer):
    free = SamplingParams(temperature=0, max_tokens=12)
    specs = [StructuredOutputs(json=SCHEMA), StructuredOutputs(regex=r"[0-9]{3}-[a-c]{2}"),
             StructuredOutputs(choice=["yes", "no", "maybe so"]), StructuredOutputs(json_object=True),
             StructuredOutputs(grammar='start: "ab" ("c" | "d")+ "!"'),
             StructuredOutputs(grammar='root ::= "x" [0-9] "y"')]
    constrained = [SamplingParams(temperature=t, seed=1, max_tokens=60, structured_outputs=s)
                   for s, t in zip(specs, [0, 0.8, 0, 1.0, 0, 0.5])]
    alone = _run(demo_checkpoint, tokenizer, [free])[0]
    outs = _run(demo_checkpoint, tokenizer, [free, *constrained])
    assert outs[0].token_ids == alone.token_ids  # a free row is unchanged by constrained batch mates
    as_json, regex, choice, obj, lark, gbnf = outs[1:]
    jsonschema.validate(json.loads(as_json.text), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", regex.text)
    assert choice.text in ["yes", "no", "maybe so"]
    assert obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict)
    assert re.fullmatch(r"ab[cd]+!", lark.text) or lark.finish_reason == "length"
    assert re.fullmatch(r"x[0-9]y", gbnf.text)
    assert all(o.finish_reason == "stop" for o in (as_json, regex, choice, gbnf))


def test_unconstrained_random_model_breaks_the_schema(demo_checkpoint, tokenizer):
    """The check above can fail: the same request without the grammar is not JSON."""
    out = _run(demo_checkpoint, tokenizer, [SamplingParams(temperature=0, max_tokens=30)])[0]
    with pytest.raises(ValueError):
        json.loads(out.text)


@pytest.mark.parametrize(("spec", "match"), [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"choice": []}, "non-empty"),
    ({"json": "{not json"}, "not a valid JSON"), ({"bogus": 1}, "Extra inputs"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputs(**spec)


@pytest.mark.parametrize("spec", [{"regex": "[a-"}, {"grammar": "start: undefined_rule"},
                                  {"json": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}])
def test_grammar_errors_are_reported(tokenizer, spec):
    assert check(StructuredOutputs(**spec), tokenizer)


def test_thinking_token_budget_forces_the_end_of_thinking(demo_checkpoint, tokenizer):
    end = tokenizer.encode("</seed:think>", add_special_tokens=False)[0]
    budgets = [0, 3, 7]
    outs = _run(demo_checkpoint, tokenizer, [SamplingParams(temperature=1.0, seed=s, max_tokens=12,
                                                            thinking_token_budget=b) for s, b in enumerate(budgets)]
                + [SamplingParams(temperature=0, max_tokens=12)])
    for budget, out in zip(budgets, outs):
        assert out.token_ids.index(end) == budget  # the random model never closes it sooner by itself here
    assert end not in outs[-1].token_ids  # the same model without a budget keeps "thinking"
