"""Tokenizer round trip on arbitrary UTF-8; recipes and --set overrides with every problem reported."""

import random

import pytest

from toolkit.config import load_recipe, recipe_from_dict
from toolkit.corpus import default_corpus
from toolkit.errors import ConfigError
from toolkit.tokenizer import SPECIAL_TOKENS, decode, encode, special_ids, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(300), vocab_size=400)


def random_unicode(r: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        cp = r.choice([r.randint(0x20, 0x7E), r.randint(0, 0x1F), r.randint(0x80, 0x7FF),
                       r.randint(0x800, 0xD7FF), r.randint(0xE000, 0xFFFF), r.randint(0x10000, 0x10FFFF)])
        out.append(chr(cp))
    return "".join(out)


def test_round_trip_arbitrary_utf8(tok):
    r = random.Random(0)
    samples = ["", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "émoji 🚀🔥 中文 العربية",
               "<|eos|> literal specials <|pad|>", "\x00\x01 control", "a" * 500]
    samples += [random_unicode(r, r.randint(1, 60)) for _ in range(200)]
    for s in samples:
        assert decode(tok, encode(tok, s)) == s


def test_special_tokens_and_vocab(tok):
    ids = special_ids(tok)
    assert all(ids[k] is not None for k in ("bos", "eos", "pad", "unk"))
    assert len(set(ids.values())) == 4
    assert [tok.id_to_token(i) for i in range(4)] == SPECIAL_TOKENS
    assert 256 < tok.get_vocab_size() <= 400


def test_recipes_load():
    for name in ("tiny", "small", "teacher", "moe-tiny"):
        r = load_recipe(name)
        assert r.name == name
    assert load_recipe("moe-tiny").model.n_experts == 4


def test_set_overrides_and_all_problems_reported():
    r = load_recipe("tiny", ["model.d_model=64", "training.lr=1e-3", "model.pos_encoding=learned"])
    assert (r.model.d_model, r.training.lr, r.model.pos_encoding) == (64, 1e-3, "learned")
    with pytest.raises(ConfigError) as exc:
        recipe_from_dict({"model": {"d_model": "x", "colour": 1}, "training": {"steps": 1.5}, "extra": {}})
    msg = str(exc.value)
    for part in ("model.d_model must be an integer", "unknown key model.colour", "training.steps must be an integer", "unknown section [extra]"):
        assert part in msg
    with pytest.raises(ConfigError, match="divisible"):
        load_recipe("tiny", ["model.n_heads=3"])
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("nope")
