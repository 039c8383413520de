"""The data of examples/finetune.py: the synthetic passkey-retrieval task, real text from local
files or a 🤗 datasets name (errors name the file and line), packing into rows with restarting
position_ids, and a sampler whose order depends only on the seed and the epoch (so that a resumed
run reads the same batches)."""

from __future__ import annotations

import difflib
import json
import math
import random
from pathlib import Path

import torch


class InputError(ValueError):
    """A bad argument, data file or output directory. Every process finds it alike, so it is
    reported once (by the first process of each machine) and every process exits with status 2
    before any of them waits for another."""


# --------------------------------------------------------------------- passkey retrieval
# Token ids of the synthetic task. The five-digit key is hidden in random filler as five tokens
# "slot i holds digit d"; the question at the end reads "? K1 d1 K2 d2 ... K5 d5" and each d_i,
# predicted at K_i, must be fetched from wherever the key sits: a long-range lookup.
PAD, BOS, QUESTION = 0, 1, 2
SLOTS = list(range(3, 8))  # K1..K5
DIGITS = list(range(8, 18))  # 0..9
KEY_BASE = 18  # token KEY_BASE + 10 * i + d: "slot i holds digit d"
FILLER = list(range(68, 128))
VOCAB_SIZE = 128


def passkey_example(seq_len: int, seed: int) -> dict:
    """One example of ``seq_len`` tokens, with ``labels`` on the five answer digits only."""
    rng = random.Random(seed)
    digits = [rng.randrange(10) for _ in SLOTS]
    key = [KEY_BASE + 10 * i + d for i, d in enumerate(digits)]
    question = [QUESTION] + [t for slot, d in zip(SLOTS, digits) for t in (slot, DIGITS[d])]
    n_filler = seq_len - 1 - len(key) - len(question)
    if n_filler < 0:
        raise ValueError(f"--seq-len must be at least {seq_len - n_filler} for the passkey task")
    filler = [rng.choice(FILLER) for _ in range(n_filler)]
    depth = rng.randint(0, n_filler)
    ids = [BOS] + filler[:depth] + key + filler[depth:] + question
    labels = [-100] * (len(ids) - 10) + [t if i % 2 else -100 for i, t in enumerate(question[1:])]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def passkey_row(seq_len: int, seed: int, shortest: int = 32) -> dict:
    """``seq_len`` tokens packed with passkey documents of log-uniform lengths between
    ``shortest`` and ``seq_len`` (position_ids restart at each document): the short ones teach
    the lookup quickly, the long ones make it long-range."""
    rng = random.Random(seed)
    ids, labels, positions, left = [], [], [], seq_len
    while left:
        n = min(left, int(math.exp(rng.uniform(math.log(shortest), math.log(seq_len)))))
        if left - n < shortest:
            n = left
        doc = passkey_example(n, rng.randrange(1 << 30))
        ids.append(doc["input_ids"])
        labels.append(doc["labels"])
        positions.append(torch.arange(n))
        left -= n
    return {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "position_ids": torch.cat(positions)}


class PasskeyDataset(torch.utils.data.Dataset):
    """Training rows of packed documents (``packed``), or single documents of ``seq_len``."""

    def __init__(self, size: int, seq_len: int, seed: int, packed: bool):
        self.size, self.seq_len, self.seed, self.packed = size, seq_len, seed, packed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        make = passkey_row if self.packed else passkey_example
        return make(self.seq_len, self.seed * 1_000_003 + i)


# the shortest passkey document: BOS, the five key tokens, the question and its ten answer tokens
PASSKEY_MIN_LEN = 1 + len(SLOTS) + 1 + 2 * len(SLOTS)


class EpochSampler(torch.utils.data.Sampler):
    """A new order of the training rows each epoch, a function of (seed, epoch) alone, so that a
    resumed run knows the order of the epoch it stopped in. Accelerate's data loader calls
    :meth:`set_epoch` with its count of passes, and the training loop sets it when resuming."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ------------------------------------------------------------------------- real text
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt")


def looks_like_path(name: str) -> bool:
    """Whether ``--dataset`` names a local file rather than a 🤗 datasets repository (``owner/name``)."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in LOCAL_SUFFIXES


def missing_file(path: Path) -> str:
    """'no such file', with the close names in its folder."""
    if not path.parent.is_dir():
        return f"--dataset: no such file {str(path)!r} (no folder {str(path.parent)!r})"
    near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=3)
    hint = f" (did you mean {' or '.join(repr(str(path.parent / n)) for n in near)}?)" if near else ""
    return f"--dataset: no such file {str(path)!r}{hint}"


def read_records(path: Path, text_field: str) -> list[str]:
    """The ``text_field`` of every record of a .jsonl file (one JSON object per line; blank lines
    are skipped) or of a .json file holding a list of objects."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        located = [(f"item {i}", record) for i, record in enumerate(records)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{path} line {lineno}: not valid JSON ({exc.msg}, column {exc.colno}); "
                    f"a {path.suffix} file holds one JSON object per line") from None
    docs = []
    for where, record in located:
        if not isinstance(record, dict):
            raise InputError(f"{path} {where}: a JSON {type(record).__name__}, "
                             f"not an object with a {text_field!r} field")
        if text_field not in record:
            fields = ", ".join(map(repr, record)) or "none"
            raise InputError(f"{path} {where}: no field {text_field!r} (its fields: {fields}); "
                             f"name the text field with --text-field")
        if not isinstance(record[text_field], str):
            raise InputError(f"{path} {where}: field {text_field!r} is a {type(record[text_field]).__name__}, not text")
        docs.append(record[text_field])
    return docs


def load_documents(name: str, text_field: str) -> list[str]:
    """Documents from local .jsonl/.json (one object per line, or a list of objects), .txt files
    (one document each), or a 🤗 datasets name (needs ``pip install datasets``). Raises
    :class:`InputError` naming the file and line of what cannot be read."""
    paths = [Path(p.strip()).expanduser() for p in name.split(",")]
    missing = [p for p in paths if not p.exists()]
    if len(paths) > 1 or not missing or looks_like_path(name):
        if missing:
            raise InputError(missing_file(missing[0]))
        docs = []
        for p in paths:
            if p.is_dir():
                raise InputError(f"--dataset: {str(p)!r} is a folder; name its files, comma-separated")
            try:
                json_file = p.suffix in (".jsonl", ".json")
                docs += read_records(p, text_field) if json_file else [p.read_text(encoding="utf-8")]
            except UnicodeDecodeError as exc:
                raise InputError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return docs
    try:
        import datasets
    except ImportError:
        raise InputError(f"--dataset {name!r} is not a local file, and loading it from the 🤗 Hub "
                         f"needs `pip install datasets`") from None
    try:
        train = datasets.load_dataset(name, split="train")
    except Exception as exc:  # the Hub's errors vary (not found, gated, offline): pass them on
        raise InputError(f"--dataset {name!r}: {type(exc).__name__}: {exc}") from None
    if text_field not in train.column_names:
        raise InputError(f"--dataset {name!r} has no column {text_field!r} (its columns: "
                         f"{', '.join(train.column_names)}); name the text column with --text-field")
    return list(train[text_field])


def packed_examples(docs: list[str], tokenizer, seq_len: int) -> list[dict]:
    """Tokenize and pack documents into rows of ``seq_len`` tokens; position_ids restart at each
    document, so attention never crosses documents (ring attention honours the packing)."""
    ids, pos = [], []
    for doc in docs:
        tokens = tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
        ids += tokens
        pos += list(range(len(tokens)))
    rows = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        # a row may start inside a document: its positions then continue the document's (rotary
        # embeddings only see differences) and the row start is a document start for attention
        row = torch.tensor(ids[start:start + seq_len])
        rows.append({"input_ids": row, "position_ids": torch.tensor(pos[start:start + seq_len]), "labels": row.clone()})
    if not rows:
        raise InputError(f"the dataset has {len(ids)} tokens, fewer than one row of --seq-len {seq_len}")
    return rows


def collate(features):
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}
