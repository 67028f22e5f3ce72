"""The QA service answers like transformers 4.56.2's question-answering pipeline: same spans, scores within 1e-5,
on the cases `bench/qa_reference.py` ran through that pipeline (``tests/data/qa_reference.json``)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from seedoss.demo import head_dir
from seedoss.loader import load_head, load_stage
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.qa import QARequest, QAService, preprocess
from seedoss.services.schemas import local_forward

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests" / "data" / "qa_reference.json").read_text(encoding="utf-8"))
SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def qa_dir(demo_checkpoint):
    return head_dir(demo_checkpoint, "qa")


@pytest.fixture(scope="module")
def service(demo_checkpoint, qa_dir):
    forward = local_forward(load_stage(demo_checkpoint), load_head(qa_dir, "qa"))
    return QAService(SeedOssTokenizer.from_pretrained(qa_dir), forward, max_length=4096)


def test_fixture_is_current(qa_dir):
    """Regenerate with bench/qa_reference.py when the demo QA head, its tokenizer or the script change."""
    assert FIXTURE["transformers"] == "4.56.2"
    assert FIXTURE["generator_sha256"] == hashlib.sha256((ROOT / FIXTURE["generator"]).read_bytes()).hexdigest()
    assert FIXTURE["qa_head_sha256"] == {name: hashlib.sha256((qa_dir / name).read_bytes()).hexdigest()
                                         for name in FIXTURE["qa_head_sha256"]}
    kinds = [case["kind"] for case in FIXTURE["cases"]]
    assert kinds.count("random") >= 50 and {"long", "defaults", "impossible", "unicode"} <= set(kinds)


def test_fixture_covers_windows_and_no_answers(service):
    windows = [len(preprocess(QARequest(**case["request"]), service.tokenizer, 4096)) for case in FIXTURE["cases"]]
    assert sum(n > 1 for n in windows) >= 20 and max(windows) >= 20
    assert sum(any(a["answer"] == "" for a in case["answers"]) for case in FIXTURE["cases"]) >= 2


def test_answers_match_the_pipeline(service):
    worst, mismatched = 0.0, []
    for i, case in enumerate(FIXTURE["cases"]):
        ours = asyncio.run(service.answer(case["request"])).answers
        expected = case["answers"]
        if [(a.start, a.end, a.answer) for a in ours] != [(a["start"], a["end"], a["answer"]) for a in expected]:
            mismatched.append(i)
            continue
        worst = max([worst] + [abs(a.score - b["score"]) for a, b in zip(ours, expected)])
    assert not mismatched, f"spans differ from the pipeline's in cases {mismatched}"
    assert worst <= SCORE_TOLERANCE
