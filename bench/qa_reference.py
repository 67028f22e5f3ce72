"""Reference answers for the QA service: transformers 4.56.2's question-answering pipeline (the last release line
with that pipeline) on the demo checkpoint's QA head, written to ``tests/data/qa_reference.json``, which
``tests/test_qa_reference.py`` replays against ``seedoss.services.qa.QAService``.

Runs in its own venv, not the project's (which has transformers 5, without the pipeline)::

    python3.11 -m venv /tmp/venv-hf456
    /tmp/venv-hf456/bin/pip install torch==2.13.0 && /tmp/venv-hf456/bin/pip install transformers==4.56.2 jinja2
    PYTHONPATH=. /tmp/venv-hf456/bin/python bench/qa_reference.py

The cases are drawn with a fixed seed: random question/context pairs from ``seedoss/data/corpus.txt`` (contexts of
20-700 words, ``max_seq_len`` 128/384, ``doc_stride`` 32/64, ``top_k`` 1/3, ``max_answer_len`` 5/15,
``handle_impossible_answer`` and ``align_to_words`` on or off), then long contexts cut into many windows, the
pipeline's defaults, contexts with few words where the no-answer fills up the list, and unicode. The fixture
records the sha256 of the QA head's files and of this script, so the test notices when either has changed since.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "qa_reference.json"
SEED = 17
RANDOM_CASES = 60
HEAD_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
UNICODE = ["Zürich", "東京", "タワー", "🎉", "naïve", "Ångström", "São Paulo", "Σήμερα", "Сегодня", "café", "Müller"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def head_hashes(qa_dir: Path) -> dict[str, str]:
    return {name: sha256(qa_dir / name) for name in HEAD_FILES}


def corpus_words() -> list[str]:
    return (ROOT / "seedoss" / "data" / "corpus.txt").read_text(encoding="utf-8").split()


def _text(words: list[str], rng: random.Random, n: int) -> str:
    start = rng.randrange(len(words) - n)
    return " ".join(words[start: start + n])


def _question(words: list[str], rng: random.Random) -> str:
    return _text(words, rng, rng.randint(3, 12)).rstrip(".,!?\"") + "?"


def cases() -> list[dict]:
    """Requests in the service's format; every case names the fields it sets, the rest take the defaults."""
    rng = random.Random(SEED)
    words = corpus_words()
    out = []
    for _ in range(RANDOM_CASES):
        out.append({"kind": "random", "request": {
            "question": _question(words, rng), "context": _text(words, rng, rng.randint(20, 700)),
            "max_seq_len": rng.choice([128, 384]), "doc_stride": rng.choice([32, 64]), "top_k": rng.choice([1, 3]),
            "max_answer_len": rng.choice([5, 15]), "handle_impossible_answer": rng.random() < 0.5,
            "align_to_words": rng.random() < 0.5}})
    for top_k, align in [(1, True), (3, False), (5, True), (10, False)]:  # tens of windows
        out.append({"kind": "long", "request": {
            "question": _question(words, rng), "context": _text(words, rng, rng.randint(1500, 3000)),
            "max_seq_len": 128, "doc_stride": 32, "top_k": top_k, "align_to_words": align,
            "handle_impossible_answer": True}})
    for _ in range(3):  # the pipeline's defaults (384 / 128) on contexts needing several windows
        out.append({"kind": "defaults", "request": {
            "question": _question(words, rng), "context": _text(words, rng, rng.randint(400, 1200))}})
    letters = [w for w in UNICODE if w.isalpha()]
    for top_k in (4, 8, 12):  # three long words: fewer answers than top_k, the no-answer fills up
        context = " ".join(a + b for a, b in zip(rng.sample(letters, 3), rng.sample(letters, 3)))
        out.append({"kind": "impossible", "request": {
            "question": _question(words, rng), "context": context, "top_k": top_k, "handle_impossible_answer": True}})
    for align in (True, False):  # unicode in every window, question included
        context = " ".join(rng.choice(UNICODE) if rng.random() < 0.3 else w
                           for w in _text(words, rng, 300).split())
        out.append({"kind": "unicode", "request": {
            "question": f"Wo ist {rng.choice(UNICODE)}?", "context": context, "max_seq_len": 128, "doc_stride": 64,
            "top_k": 3, "max_answer_len": 5, "align_to_words": align, "handle_impossible_answer": True}})
    return out


def offers_real_spans_only(tokenizer, request: dict) -> bool:
    """Whether every window has at least as many allowed spans as the pipeline takes from it. Otherwise the
    pipeline pads with zero-score pseudo-spans chosen by `np.argpartition`'s tie order (machine-dependent), which
    the service leaves out on purpose (services/qa.py): such cases are no reference."""
    max_seq_len = request.get("max_seq_len", 384)
    top_k, max_answer_len = request.get("top_k", 1), request.get("max_answer_len", 15)
    taken = top_k * 2 + 10 if request.get("align_to_words", True) else top_k
    encoding = tokenizer(request["question"], request["context"], truncation="only_second", max_length=max_seq_len,
                         stride=request.get("doc_stride", min(max_seq_len // 2, 128)), return_overflowing_tokens=True)
    for window in range(len(encoding["input_ids"])):
        n = encoding.sequence_ids(window).count(1)
        if sum(min(max_answer_len, n - i) for i in range(n)) < taken:
            return False
    return True


def main() -> None:
    import transformers
    from transformers import pipeline

    sys.path.insert(0, str(ROOT))
    from seedoss.demo import head_dir, write_demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        qa_dir = head_dir(write_demo_checkpoint(Path(tmp) / "demo"), "qa")
        qa = pipeline("question-answering", model=str(qa_dir), tokenizer=str(qa_dir), framework="pt")
        results = []
        for case in cases():
            if not offers_real_spans_only(qa.tokenizer, case["request"]):
                raise ValueError(f"no reference: {case}")
            answers = qa(**case["request"])
            results.append({**case, "answers": answers if isinstance(answers, list) else [answers]})
        fixture = {
            "generator": "bench/qa_reference.py",
            "generator_sha256": sha256(Path(__file__)),
            "transformers": transformers.__version__,
            "seed": SEED,
            "qa_head_sha256": head_hashes(qa_dir),
            "cases": results,
        }
    FIXTURE.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{FIXTURE}: {len(results)} cases, {sum(a['answer'] == '' for r in results for a in r['answers'])} "
          "no-answers")


if __name__ == "__main__":
    main()
