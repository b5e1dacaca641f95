"""A generated SQuAD task that a small T5 learns from random weights in minutes: facts planted in real contexts.

Random-init scores on real SQuAD are 0 whatever the code does, so they cannot show that training works. Here
each question takes the opening sentence of a real SQuAD paragraph, plants a sentence "The <kind> code is
<word>." (random kind and word) at a random sentence boundary, and asks "What is the <kind> code?": the answer
is a span of the context, found by reading it (find the fact, copy the word), never by memorising. In the v2
variant a quarter of the questions have no fact planted: unanswerable, as in SQuAD 2.0.

The decoy variant (`make_decoy_split`, the learning-parity benchmark `benchmarks/parity.py`) is harder: whole
contexts of up to 400 characters, and a third of the questions unanswerable although the context holds a code,
one of another kind, so the model has to read the kind and not just find a code. With two facts per context,
t5-mini trained from scratch learned to copy a planted word but stayed at chance in picking the asked-for one.

The files are in the official SQuAD format, so reading, prompting, validation and scoring run on them
exactly as on SQuAD. They are seeded (the same arguments give the same files) and built once under the
cache dir by `dataset=planted_v1` / `planted_v2` (`PlantedDataModule.prepare_data`).

    python -m flan_squad.data.planted outputs/planted          # writes {v1,v2}/{train,dev}.json there
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

from flan_squad.utils.files import write_json_atomic

SOURCE = "data/squad/v1.1/dev-v1.1.json"  # under the shared dir: the paragraphs the facts are planted into
KINDS = "access launch vault door radio bank locker safe gate alarm".split()
# One SentencePiece token each in FLAN-T5's vocabulary, so an answer is one copied token (+ end of sequence).
WORDS = ("apple river silver garden window castle orange winter forest candle rocket pepper marble violet "
         "harbor copper thunder lemon piano island bridge").split()
SIZES = {"train": 4000, "dev": 300}
SENTENCES_KEPT = 1  # of each real paragraph: short contexts (~60 tokens with the facts) train fast
UNANSWERABLE_SHARE = 0.25  # v2 only: the asked-for fact is not planted
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def paragraphs(shared_dir: str | Path) -> list[str]:
    """The opening sentences of every paragraph of the SQuAD v1.1 dev set, in file order."""
    data = json.loads((Path(shared_dir) / SOURCE).read_text(encoding="utf-8"))
    return [" ".join(_SENTENCE_END.split(p["context"])[:SENTENCES_KEPT]) for a in data["data"] for p in a["paragraphs"]]


def plant(sentences: list[str], facts: list[str], rng: random.Random) -> list[str]:
    """The sentences with each fact inserted at a random boundary (start and end included)."""
    out = list(sentences)
    for fact in facts:
        out.insert(rng.randint(0, len(out)), fact)
    return out


def make_split(texts: list[str], n: int, version: str, seed: int, prefix: str) -> dict:
    """`n` questions in the official SQuAD format, one paragraph each."""
    rng = random.Random(seed)
    articles = []
    for i in range(n):
        kind, word = rng.choice(KINDS), rng.choice(WORDS)
        unanswerable = version == "v2" and rng.random() < UNANSWERABLE_SHARE
        fact = f"The {kind} code is {word}."
        context = " ".join(plant(_SENTENCE_END.split(rng.choice(texts)), [] if unanswerable else [fact], rng))
        qa = {"id": f"{prefix}-{i:05d}", "question": f"What is the {kind} code?", "answers": []}
        if unanswerable:
            qa["is_impossible"] = True
        else:
            start = context.index(fact) + len(fact) - len(word) - 1  # the word before the final "."
            qa["answers"] = [{"text": word, "answer_start": start}]
            if version == "v2":
                qa["is_impossible"] = False
        articles.append({"title": f"planted-{i:05d}", "paragraphs": [{"context": context, "qas": [qa]}]})
    return {"version": "v2.0" if version == "v2" else "1.1", "data": articles}


DECOY_MAX_CHARS = 400  # decoy variant: whole SQuAD v1.1 dev contexts up to this long
DECOY_UNANSWERABLE_SHARE = 1 / 3


def short_contexts(shared_dir: str | Path, max_chars: int = DECOY_MAX_CHARS) -> list[str]:
    """Every whole context of the SQuAD v1.1 dev set of at most `max_chars` characters, in file order."""
    data = json.loads((Path(shared_dir) / SOURCE).read_text(encoding="utf-8"))
    return [p["context"] for a in data["data"] for p in a["paragraphs"] if len(p["context"]) <= max_chars]


def make_decoy_split(texts: list[str], n: int, seed: int, prefix: str,
                     unanswerable_share: float = DECOY_UNANSWERABLE_SHARE) -> dict:
    """`n` SQuAD v2.0-format questions "What is the <kind> code?", each on a context with one planted fact; in
    `unanswerable_share` of them the fact is of another kind (a decoy): unanswerable, though a code is there."""
    rng = random.Random(seed)
    articles = []
    for i in range(n):
        kind, word = rng.choice(KINDS), rng.choice(WORDS)
        unanswerable = rng.random() < unanswerable_share
        fact_kind = rng.choice([k for k in KINDS if k != kind]) if unanswerable else kind
        fact = f"The {fact_kind} code is {word}."
        context = " ".join(plant(_SENTENCE_END.split(rng.choice(texts)), [fact], rng))
        qa = {"id": f"{prefix}-{i:05d}", "question": f"What is the {kind} code?", "answers": [],
              "is_impossible": unanswerable}
        if not unanswerable:
            qa["answers"] = [{"text": word, "answer_start": context.index(fact) + len(fact) - len(word) - 1}]
        articles.append({"title": f"decoy-{i:05d}", "paragraphs": [{"context": context, "qas": [qa]}]})
    return {"version": "v2.0", "data": articles}


def build_decoy(out_dir: str | Path, shared_dir: str | Path, train: int = 2000, dev: int = 200, seed: int = 0,
                disjoint: bool = False) -> Path:
    """Write {train,dev}.json of the decoy variant under `out_dir`. Train and dev draw from the same 130 contexts
    (the facts, kinds and positions differ), or with `disjoint` from different ones (104 / 26): harder, and in
    3 epochs neither the project nor the peer pipeline learned unanswerable questions then (NoAns F1 12.5)."""
    texts = short_contexts(shared_dir)
    split_at = len(texts) * 4 // 5
    pools = (texts[:split_at], texts[split_at:]) if disjoint else (texts, texts)
    for s, (split, n, pool) in enumerate((("train", train, pools[0]), ("dev", dev, pools[1]))):
        write_json_atomic(Path(out_dir) / f"{split}.json",
                          make_decoy_split(pool, n, seed * 100 + 20 + s, f"decoy-{split}"))
    return Path(out_dir)


def build_short_decoy(out_dir: str | Path, shared_dir: str | Path, train: int = 2000, dev: int = 200,
                      tune: int = 0) -> Path:
    """Write {train,dev}.json of the decoy variant on the planted task's short contexts (each paragraph's opening
    sentence, ~40 tokens with the fact: fast to train on), train and dev on disjoint paragraphs: the learning
    check of unanswerable questions (tests/test_learning.py) and the strategy comparison (`dataset=decoy_v2`).
    With `tune`, also tune.json, where learning rates are chosen: on half of the paragraphs held out from training,
    and dev on the other half, so no choice is made on the questions (nor the contexts) that are reported."""
    texts = paragraphs(shared_dir)
    split_at = len(texts) * 4 // 5
    held_out = texts[split_at:]
    tune_pool, dev_pool = (held_out[: len(held_out) // 2], held_out[len(held_out) // 2:]) if tune else ([], held_out)
    write_json_atomic(Path(out_dir) / "train.json", make_decoy_split(texts[:split_at], train, 1, "t"))
    write_json_atomic(Path(out_dir) / "dev.json", make_decoy_split(dev_pool, dev, 2, "d"))
    if tune:
        write_json_atomic(Path(out_dir) / "tune.json", make_decoy_split(tune_pool, tune, 3, "u"))
    return Path(out_dir)


DECOY_SIZES = {"train": 2000, "tune": 300, "dev": 300}  # dataset=decoy_v2


def build_decoy_task(out_dir: str | Path, shared_dir: str | Path) -> Path:
    """Write {train,tune,dev}.json of `dataset=decoy_v2` under `out_dir`, unless there already."""
    if not all((Path(out_dir) / f"{split}.json").exists() for split in DECOY_SIZES):
        build_short_decoy(out_dir, shared_dir, **DECOY_SIZES)
    return Path(out_dir)


def build(out_dir: str | Path, shared_dir: str | Path, seed: int = 0) -> Path:
    """Write {v1,v2}/{train,dev}.json under `out_dir` (train and dev plant into disjoint paragraphs)."""
    missing = [(v, version, s, split, n) for v, version in enumerate(("v1", "v2"))
               for s, (split, n) in enumerate(SIZES.items())
               if not (Path(out_dir) / version / f"{split}.json").exists()]
    if missing:  # read the SQuAD file only to build
        texts = paragraphs(shared_dir)
        split_at = len(texts) * 4 // 5
        pools = {"train": texts[:split_at], "dev": texts[split_at:]}
        for v, version, s, split, n in missing:
            write_json_atomic(Path(out_dir) / version / f"{split}.json",
                              make_split(pools[split], n, version, seed * 100 + 10 * v + s,
                                         f"planted-{version}-{split}"))
    return Path(out_dir)


def directory(cache_dir: str | Path) -> Path:
    """Where the files live under the cache dir, named by everything they depend on (a change to the generator
    builds new ones). Computing it writes nothing: `PlantedDataModule.prepare_data` builds the files."""
    spec = json.dumps([SOURCE, KINDS, WORDS, SIZES, SENTENCES_KEPT, UNANSWERABLE_SHARE, DECOY_SIZES,
                       Path(__file__).read_text()])
    return Path(cache_dir) / "planted" / hashlib.sha1(spec.encode()).hexdigest()[:10]


if __name__ == "__main__":
    import os

    shared = os.environ.get("FLAN_SQUAD_SHARED", str(Path(__file__).resolve().parents[3] / "shared"))
    print(build(sys.argv[1] if len(sys.argv) > 1 else "outputs/planted", shared))
