"""Local downstream tasks in the harness's YAML format, generated from held-out text (offline).

The harness's own datasets (LAMBADA, HellaSwag, WikiText-2, ...) live on the Hugging Face hub, out of
reach offline, so the small profiles evaluate on stand-ins built from ``data/eval_text.txt`` (text
never seen in training). They run through exactly the harness code path of the real tasks
(``dataset_path: json`` + ``TaskManager(include_path=...)``):

``local_heldout_ppl``   (like ``wikitext``) documents of about ``ppl_doc_words`` words scored with
                        ``loglikelihood_rolling``: word_perplexity, byte_perplexity, bits_per_byte.
``local_lambada``       (like ``lambada_openai``) a passage of ``context_words`` words, then its next
                        word: perplexity of the word, acc = the word is the greedy continuation.
``local_next_word``     the same passages as multiple choice: the true next word among
                        ``num_choices - 1`` words drawn from the held-out text: acc, acc_norm.
``local_continuation``  (like ``hellaswag``) a passage, then the true next line/sentence among
                        endings drawn from elsewhere in the held-out text: acc, acc_norm.

Every choice is drawn with a seeded ``random.Random``, so the tasks are a pure function of the text
and the parameters; their fingerprint (sha256 of both) sits in each YAML's metadata and a stale or
half-written task is rebuilt. Data paths in the YAML are absolute (the harness resolves relative
``data_files`` against the working directory).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from gaincell.io import atomic_write_text

BUILDER_VERSION = 1  # bump when the generated content changes for the same text and parameters

_WORD = re.compile(r"\S+")
# A cloze target: a plain word of >= 3 letters (apostrophes/hyphens inside), optional trailing punctuation.
_TARGET = re.compile(r"^([A-Za-z][A-Za-z'\-]*[A-Za-z])[.,;:!?\"')\]]*$")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


@dataclass(frozen=True)
class LocalTaskParams:
    """What a generated task depends on besides the text (see ``EvalConfig`` for meanings)."""

    num_examples: int = 200
    num_choices: int = 4
    context_words: int = 60
    ppl_doc_words: int = 300
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("num_examples", "context_words", "ppl_doc_words"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)!r}: expected a positive integer")
        if int(self.num_choices) < 2:
            raise ValueError(f"eval.num_choices={self.num_choices!r}: expected at least 2 answer options")


# --------------------------------------------------------------------------------------------------
# text -> examples
# --------------------------------------------------------------------------------------------------
def heldout_documents(text: str, params: LocalTaskParams) -> List[Dict[str, Any]]:
    """Consecutive documents of whole lines, each at least ``ppl_doc_words`` words (the last one may
    be shorter if it still has half of that); the first ``num_examples`` of them."""
    docs: List[Dict[str, Any]] = []
    current: List[str] = []
    words = 0
    for line in text.splitlines():
        current.append(line)
        words += len(line.split())
        if words >= params.ppl_doc_words:
            docs.append({"text": "\n".join(current).strip()})
            current, words = [], 0
            if len(docs) == params.num_examples:
                return docs
    if words >= params.ppl_doc_words // 2:
        docs.append({"text": "\n".join(current).strip()})
    return docs


def _cloze_positions(text: str, params: LocalTaskParams) -> List[Tuple[int, int, str]]:
    """(context start char, target start char, target word) of non-overlapping cloze passages.

    The words are cut into segments of ``context_words + 10``; in each segment one eligible word
    (a plain word preceded by a space, with a full context inside the segment) is drawn at random,
    then ``num_examples`` segments are drawn at random and kept in text order.
    """
    rng = random.Random(params.seed)
    words = [(m.start(), m.group()) for m in _WORD.finditer(text)]
    span = params.context_words + 10
    chosen = []
    for seg_start in range(0, len(words) - params.context_words, span):
        eligible = []
        for i in range(seg_start + params.context_words, min(seg_start + span, len(words))):
            start, word = words[i]
            match = _TARGET.match(word)
            if match and start > 0 and text[start - 1] == " ":
                eligible.append((words[i - params.context_words][0], start, match.group(1)))
        if eligible:
            chosen.append(rng.choice(eligible))
    if len(chosen) > params.num_examples:
        keep = sorted(rng.sample(range(len(chosen)), params.num_examples))
        chosen = [chosen[i] for i in keep]
    return chosen


def lambada_examples(text: str, params: LocalTaskParams) -> List[Dict[str, Any]]:
    """Passage -> next word (with its leading space), as the harness's ``lambada_openai``."""
    return [{"context": text[c0:t0 - 1], "target": " " + word}
            for c0, t0, word in _cloze_positions(text, params)]


def next_word_examples(text: str, params: LocalTaskParams) -> List[Dict[str, Any]]:
    """The cloze passages as multiple choice: distractors are other eligible word occurrences of the
    held-out text (so frequent words are frequent distractors), distinct ignoring case."""
    rng = random.Random(params.seed + 1)
    pool = [m.group(1) for m in (_TARGET.match(w) for w in text.split()) if m]
    distinct = {w.lower() for w in pool}
    if len(distinct) < params.num_choices:
        raise ValueError(f"held-out text has {len(distinct)} distinct candidate words; "
                         f"expected at least eval.num_choices={params.num_choices}")
    docs = []
    for c0, t0, word in _cloze_positions(text, params):
        options = [word]
        seen = {word.lower()}
        while len(options) < params.num_choices:
            candidate = rng.choice(pool)
            if candidate.lower() not in seen:
                seen.add(candidate.lower())
                options.append(candidate)
        label = rng.randrange(params.num_choices)
        options[0], options[label] = options[label], options[0]
        docs.append({"context": text[c0:t0 - 1], "choices": options, "label": label})
    return docs


def _units(text: str, min_words: int = 4) -> List[Tuple[int, int]]:
    """(start, end) char spans of text units: lines, split further at sentence ends; units shorter
    than ``min_words`` words (speaker names, stage directions) are joined to the next one."""
    pieces: List[Tuple[int, int]] = []
    for line in re.finditer(r"[^\n]+", text):
        offset = line.start()
        pos = 0
        for gap in _SENTENCE_END.finditer(line.group()):
            pieces.append((offset + pos, offset + gap.start()))
            pos = gap.end()
        pieces.append((offset + pos, line.end()))
    units: List[Tuple[int, int]] = []
    start: Optional[int] = None
    for s, e in pieces:
        if not text[s:e].strip():
            continue
        start = s if start is None else start
        if len(text[start:e].split()) >= min_words:
            units.append((start, e))
            start = None
    return units


def continuation_examples(text: str, params: LocalTaskParams, min_ending_words: int = 4,
                          max_ending_words: int = 40) -> List[Dict[str, Any]]:
    """Passage -> the true next unit among endings drawn from elsewhere in the held-out text, of
    similar length (half to twice as many words, relaxed if too few). Each choice carries the
    whitespace that separated it from the passage in the text."""
    rng = random.Random(params.seed + 2)
    units = _units(text)
    n_words = [len(text[s:e].split()) for s, e in units]
    eligible_ending = [min_ending_words <= n <= max_ending_words for n in n_words]
    candidates = []   # (context start char, ending unit index)
    last_end = 0      # passages must not overlap
    for j in range(1, len(units)):
        if not eligible_ending[j]:
            continue
        words, i = 0, j
        while i > 0 and words < params.context_words and units[i - 1][0] >= last_end:
            i -= 1
            words += n_words[i]
        if words >= params.context_words:
            candidates.append((units[i][0], j))
            last_end = units[j][1]
    if len(candidates) > params.num_examples:
        keep = sorted(rng.sample(range(len(candidates)), params.num_examples))
        candidates = [candidates[k] for k in keep]
    pool = [j for j in range(len(units)) if eligible_ending[j]]
    docs = []
    for c0, j in candidates:
        s, e = units[j]
        context = text[c0:s].rstrip()
        separator = text[c0 + len(context):s]
        truth = text[s:e]
        near = [k for k in pool if abs(k - j) > 3 and 0.5 * n_words[j] <= n_words[k] <= 2 * n_words[j]]
        if len(near) < 4 * params.num_choices:
            near = [k for k in pool if abs(k - j) > 3]
        endings = [truth]
        tries = 0
        while len(endings) < params.num_choices and tries < 1000:
            tries += 1
            k = rng.choice(near)
            other = text[units[k][0]:units[k][1]]
            if other not in endings:
                endings.append(other)
        if len(endings) < params.num_choices:
            raise ValueError(f"held-out text too small for local_continuation: found {len(endings)} distinct "
                             f"endings, expected eval.num_choices={params.num_choices}")
        label = rng.randrange(params.num_choices)
        endings[0], endings[label] = endings[label], endings[0]
        docs.append({"context": context, "choices": [separator + x for x in endings], "label": label})
    return docs


# --------------------------------------------------------------------------------------------------
# examples -> harness YAML + JSONL
# --------------------------------------------------------------------------------------------------
_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]

# name -> (example builder, harness config fields besides task/dataset)
LOCAL_TASKS: Dict[str, Tuple[Callable[[str, LocalTaskParams], List[Dict[str, Any]]], Dict[str, Any]]] = {
    "local_heldout_ppl": (heldout_documents, {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                        {"metric": "bits_per_byte"}],
    }),
    "local_lambada": (lambada_examples, {
        "output_type": "loglikelihood",
        "doc_to_text": "context",
        "doc_to_target": "target",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}] + _ACC,
    }),
    "local_next_word": (next_word_examples, {
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": _ACC + _ACC_NORM,
    }),
    "local_continuation": (continuation_examples, {
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",  # each choice carries its own separator (space or newline)
        "metric_list": _ACC + _ACC_NORM,
    }),
}


def is_local_task(name: str) -> bool:
    return name in LOCAL_TASKS


def task_fingerprint(name: str, text_sha256: str, params: LocalTaskParams) -> str:
    blob = json.dumps({"task": name, "text": text_sha256, "params": asdict(params),
                       "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_local_task(task_dir: Path, name: str, docs: Sequence[Dict[str, Any]], fields: Dict[str, Any],
                     fingerprint: str = "", description: str = "") -> Path:
    """Write ``<name>.jsonl`` and ``<name>.yaml`` (the harness task) into ``task_dir``; returns the YAML.

    The data file is written first, the YAML (which the harness indexes) last, both atomically.
    """
    if not docs:
        raise ValueError(f"local task {name!r}: no examples to write")
    task_dir = Path(task_dir).resolve()
    data_path = task_dir / f"{name}.jsonl"
    atomic_write_text(data_path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)},
                           "cache_dir": str(task_dir / ".hf_cache")},
        "test_split": "test",
        **fields,
        "metadata": {"version": float(BUILDER_VERSION), "fingerprint": fingerprint,
                     "num_docs": len(docs), "description": description},
    }
    yaml_path = task_dir / f"{name}.yaml"
    atomic_write_text(yaml_path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return yaml_path


def _stored_fingerprint(yaml_path: Path) -> Optional[str]:
    try:
        config = yaml.safe_load(yaml_path.read_text())
        data = Path(config["dataset_kwargs"]["data_files"]["test"])
        return config["metadata"]["fingerprint"] if data.is_file() else None
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def build_local_tasks(eval_text_path: Path, task_dir: Path, names: Sequence[str],
                      params: LocalTaskParams) -> Dict[str, Path]:
    """Ensure the named local tasks exist in ``task_dir`` for this text and these parameters (built
    once, reused while their fingerprint matches); returns name -> YAML path."""
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"unknown local task(s) {unknown}; expected some of {sorted(LOCAL_TASKS)}")
    eval_text_path = Path(eval_text_path)
    if not eval_text_path.is_file():
        raise FileNotFoundError(f"held-out text {eval_text_path} not found: run the prepare_data stage "
                                f"first (it writes data/eval_text.txt)")
    raw = eval_text_path.read_bytes()
    text_sha = hashlib.sha256(raw).hexdigest()
    text: Optional[str] = None
    out: Dict[str, Path] = {}
    for name in names:
        fingerprint = task_fingerprint(name, text_sha, params)
        yaml_path = Path(task_dir) / f"{name}.yaml"
        if _stored_fingerprint(yaml_path) != fingerprint:
            if text is None:
                text = raw.decode("utf-8")
            builder, fields = LOCAL_TASKS[name]
            docs = builder(text, params)
            if not docs:
                raise ValueError(f"local task {name!r}: no examples could be built from {eval_text_path} "
                                 f"({len(text.split())} words) with {params}; expected more held-out text "
                                 f"or smaller eval.context_words / eval.ppl_doc_words")
            write_local_task(Path(task_dir), name, docs, fields, fingerprint,
                             description=f"generated from {eval_text_path.name} (sha256 {text_sha[:12]})")
        out[name] = yaml_path.resolve()
    return out


def local_task_fingerprint(yaml_path: Path) -> Optional[str]:
    """The fingerprint recorded in a generated task's YAML (None if absent or unreadable)."""
    return _stored_fingerprint(Path(yaml_path))
