"""Incremental detokenization (byte-level BPE, multi-byte characters) and stop strings."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from seedoss.detokenizer import IncrementalDetokenizer, StopStringMatcher

SPECIALS = ["<seed:bos>", "<seed:pad>", "<seed:eos>"]
BOS, PAD, EOS = 0, 1, 2

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there. " * 20,
    "café naïve résumé façade crème brûlée " * 10,
    "你好世界，这是一个测试。中文文本中文文本 " * 10,
    "emoji 😀🎉👍🏽 party time " * 5,
]


class ByteBPE:
    """The tokenizer surface the detokenizer relies on, over a small trained byte-level BPE."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.all_special_ids = [BOS, PAD, EOS]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [BOS, PAD, EOS]
    return ByteBPE(tok)


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(t) for t in output_ids]
    return deltas, detok.flush()


TEXTS = [
    "Hello wörld, Ünïcödé ça va? Ærøskøbing ñandú",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 done",
    "mixed 中文 and 日本語テキスト and 한국어 🙂 end " * 8,
]


@pytest.mark.parametrize("text", TEXTS, ids=["accents", "cjk", "emoji", "mixed-long"])
def test_deltas_never_break_characters_and_add_up(tokenizer, text):
    ids = tokenizer.encode(text)
    # the test is only meaningful if some tokens hold part of a character
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    prompt = tokenizer.encode("User: say something\nAssistant:")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    emitted = ""
    for i, t in enumerate(ids):
        delta = detok.add(t)
        assert "\ufffd" not in delta
        emitted += delta
        # nothing is held back beyond an incomplete trailing character
        assert emitted == tokenizer.decode(ids[: i + 1]).rstrip("\ufffd")
    assert detok.flush() == ""
    assert emitted == tokenizer.decode(ids) == text


def test_prompt_context_does_not_leak(tokenizer):
    prompt = tokenizer.encode("你好世界 😀")  # ends with a complete multi-byte character
    out = tokenizer.encode("🎉 café")
    deltas, tail = stream(tokenizer, prompt, out)
    assert "".join(deltas) + tail == tokenizer.decode(out)


@pytest.mark.parametrize("seed", range(5))
def test_arbitrary_token_sequences_add_up_to_the_full_decode(tokenizer, seed):
    """Random tokens produce invalid UTF-8 too; the stream still equals the full decode."""
    rng = random.Random(seed)
    vocab = tokenizer.tok.get_vocab_size()
    ids = [rng.randrange(3, vocab) for _ in range(300)]
    prompt = [rng.randrange(3, vocab) for _ in range(10)]
    deltas, tail = stream(tokenizer, prompt, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_prompt_ending_inside_a_character(tokenizer):
    ids = tokenizer.encode("x 😀😀 y")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    prompt, out = ids[:cut], ids[cut:]
    deltas, tail = stream(tokenizer, prompt, out)
    assert "".join(deltas) + tail == tokenizer.decode(out)


def test_skip_special_tokens(tokenizer):
    out = tokenizer.encode("héllo 世界") + [EOS] + tokenizer.encode(" after") + [PAD, BOS]
    prompt = [BOS] + tokenizer.encode("user\nhi") + [EOS, BOS] + tokenizer.encode("assistant\n")
    deltas, tail = stream(tokenizer, prompt, out, skip_special_tokens=True)
    text = "".join(deltas) + tail
    assert text == tokenizer.decode(out, skip_special_tokens=True) == "héllo 世界 after"
    assert all("\ufffd" not in d for d in deltas)

    deltas, tail = stream(tokenizer, prompt, out, skip_special_tokens=False)
    text = "".join(deltas) + tail
    assert text == tokenizer.decode(out, skip_special_tokens=False)
    assert text == "héllo 世界<seed:eos> after<seed:pad><seed:bos>"


def test_flush_releases_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 😀")
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    deltas, tail = stream(tokenizer, [], ids[:cut])
    assert "\ufffd" not in "".join(deltas)
    assert tail and tail.endswith("\ufffd")
    assert "".join(deltas) + tail == tokenizer.decode(ids[:cut])


# ---------------------------------------------------------------- stop strings


def run_matcher(deltas, stop, include=False, flush=True):
    m = StopStringMatcher(stop, include_stop_str_in_output=include)
    emitted, results = [], []
    for d in deltas:
        text, stopped, matched = m.feed(d)
        emitted.append(text)
        results.append((stopped, matched))
        if stopped:
            break
    out = "".join(emitted) + (m.flush() if flush else "")
    return out, emitted, results


def test_stop_string_spanning_deltas_is_never_emitted():
    out, emitted, results = run_matcher(["Hello S", "T", "O", "P and more"], ["STOP"])
    assert out == "Hello "
    assert emitted == ["Hello ", "", "", ""]
    assert results[-1] == (True, "STOP")
    assert all(not stopped for stopped, _ in results[:-1])


def test_held_prefix_released_when_it_is_not_a_stop():
    out, emitted, results = run_matcher(["abc S", "TO", "NE!"], ["STOP"])
    assert emitted == ["abc ", "", "STONE!"]
    assert out == "abc STONE!" and results[-1] == (False, None)
    out, emitted, _ = run_matcher(["abc S", "TA", "R!"], ["STOP"])
    assert emitted == ["abc ", "STA", "R!"]


def test_flush_releases_held_text_at_the_end():
    m = StopStringMatcher(["STOP"])
    assert m.feed("the end ST") == ("the end ", False, None)
    assert m.flush() == "ST"
    assert m.flush() == ""


def test_include_stop_str_in_output():
    out, _, results = run_matcher(["Hello S", "TOP and more"], ["STOP"], include=True)
    assert out == "Hello STOP" and results[-1] == (True, "STOP")


def test_earliest_stop_wins_and_nothing_after_stop():
    for stops in (["END", "STOP"], ["STOP", "END"]):
        out, _, results = run_matcher(["a ST", "OP b END"], stops)
        assert out == "a " and results[-1] == (True, "STOP")
    # overlapping stop strings: the first to complete wins, whatever the list order
    for stops in (["world", "lo"], ["lo", "world"]):
        assert run_matcher(["Hello world"], stops)[0] == "Hel"
    m = StopStringMatcher(["x"])
    assert m.feed("axb") == ("a", True, "x")
    assert m.feed("more") == ("", True, "x")
    assert m.flush() == ""


def test_no_stop_strings_passes_through():
    m = StopStringMatcher([])
    assert m.feed("anything") == ("anything", False, None)
    assert m.flush() == ""
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_stop_matching_does_not_depend_on_chunking(seed, include):
    rng = random.Random(seed)
    stops = ["</s>", "###", "ab", "Observation:", "😀x"]
    words = ["hello", "a", "b", "#", "##", "</", "s>", "Obs", "ervation", ":", "😀", "x", " ", "<"]
    text = "".join(rng.choice(words) for _ in range(40))
    # reference: the first stop string to complete, scanning the text once
    ref_end = min((text.find(s) + len(s), -text.find(s), s) for s in stops if s in text) if any(
        s in text for s in stops) else None
    if ref_end is None:
        expected = text
    else:
        end, neg_start, _ = ref_end
        expected = text[: end if include else -neg_start]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, min(15, len(text) - 1))))
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        out, _, results = run_matcher(deltas, stops, include=include)
        assert out == expected
        if not include:
            assert not any(s in out for s in stops)
