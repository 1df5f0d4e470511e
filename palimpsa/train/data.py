"""Training data: documents from local files or a streaming Hugging Face dataset, tokenised and packed.

Packing: documents are concatenated, in order, into packs of exactly ``seq_len`` tokens.  Each pack
remembers where its documents start, so the model gets the boundaries as ``cu_seqlens`` and no token
attends across a document boundary; a document that does not fit continues in the next pack as a fresh
sequence.  The stream's position ``(epoch, document index, token offset)`` is all it takes to resume
exactly.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence

import numpy as np
import torch

from palimpsa.train.tokenizer import is_byte_level

IGNORE_INDEX = -100
HF_PREFIX = "hf:"
JSON_LINES_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + JSON_LINES_SUFFIXES + PARQUET_SUFFIXES


def resolve_local_files(patterns: Sequence[str]) -> List[str]:
    """Expand files, directories (recursively, files ending in DOCUMENT_SUFFIXES) and glob patterns.

    The order is deterministic: patterns in the given order, each expanded and sorted.
    """
    files: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if name.endswith(DOCUMENT_SUFFIXES)
            ]
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not found:
            raise ValueError(f"data entry {pattern!r} matches no file (expected a file, directory or glob)")
        files.extend(sorted(found))
    return files


def iter_file_documents(path: str, text_field: str) -> Iterator[str]:
    """The documents of one local file: one per JSON line, one per parquet row, else the whole file."""
    if path.endswith(JSON_LINES_SUFFIXES):
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}:{line_number}: expected a JSON object with field {text_field!r}")
                yield record[text_field]
    elif path.endswith(PARQUET_SUFFIXES):
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from err
        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
        for batch in parquet.iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                yield handle.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text: {err}") from err


class DocumentSource:
    """A finite, deterministic sequence of documents; ``documents(start)`` replays it from index ``start``.

    Args:
        data: local files/directories/globs, or a single ``"hf:NAME[:CONFIG]"`` entry.
        text_field: the text column (JSON lines, parquet, Hugging Face datasets).
        hf_split: split of the Hugging Face dataset.
    """

    def __init__(self, data: Sequence[str], text_field: str = "text", hf_split: str = "train"):
        if isinstance(data, str):
            data = [data]
        if not data:
            raise ValueError("data must name at least one file, directory, glob or 'hf:NAME[:CONFIG]'")
        hub = [entry for entry in data if entry.startswith(HF_PREFIX)]
        if hub and len(data) > 1:
            raise ValueError(f"an 'hf:' data entry must be the only one, got {list(data)}")
        self.text_field = text_field
        self.hf_split = hf_split
        self.hf_name = hub[0][len(HF_PREFIX):] if hub else None
        self.files = [] if hub else resolve_local_files(data)

    def _hf_documents(self, start: int) -> Iterator[str]:
        try:
            import datasets
        except ImportError as err:
            raise ImportError("Hugging Face datasets need the 'datasets' package (pip install datasets)") from err
        name, _, config = self.hf_name.partition(":")
        stream = datasets.load_dataset(name, config or None, split=self.hf_split, streaming=True)
        if start:
            stream = stream.skip(start)
        for record in stream:
            yield record[self.text_field]

    def documents(self, start: int = 0) -> Iterator[str]:
        """Documents from index ``start`` (0-based) to the end of the source."""
        if self.hf_name is not None:
            return self._hf_documents(start)
        every = itertools.chain.from_iterable(iter_file_documents(p, self.text_field) for p in self.files)
        return itertools.islice(every, start, None)


def make_encoder(tokenizer, append_eos: bool = True) -> Callable[[str], np.ndarray]:
    """A function text -> token ids [L] int64 (no special tokens, eos appended when asked and defined)."""
    eos = tokenizer.eos_token_id if append_eos else None
    if append_eos and eos is None:
        raise ValueError("append_eos=True but the tokenizer has no eos token")
    suffix = np.array([eos] if eos is not None else [], dtype=np.int64)
    byte_level = is_byte_level(tokenizer)

    def encode(text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"a document must be a str, got {type(text).__name__}")
        if byte_level:  # same ids as the tokenizer (tested), without its per-character overhead
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        else:
            ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        return np.concatenate([ids, suffix])

    return encode


@dataclass
class Pack:
    """``seq_len`` tokens made of whole documents or pieces of them.

    tokens: [seq_len] int64; seq_lengths: lengths of its sequences, in order, summing to seq_len.
    """

    tokens: np.ndarray
    seq_lengths: List[int]

    @property
    def num_targets(self) -> int:
        """Predicted tokens: every token but the first of each sequence."""
        return sum(length - 1 for length in self.seq_lengths)


class PackedStream:
    """Endless stream of packs over a DocumentSource (epoch after epoch), resumable exactly.

    Args:
        source: the documents.
        encode: text -> token ids [L] int64 (see :func:`make_encoder`).
        seq_len: tokens per pack.
    """

    def __init__(self, source: DocumentSource, encode: Callable[[str], np.ndarray], seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.source = source
        self.encode = encode
        self.seq_len = seq_len
        self.epoch = 0
        self.doc_index = 0  # index (within the epoch) of the document being consumed
        self.offset = 0  # tokens of that document already packed
        self._documents = None
        self._tokens = None

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "doc_index": self.doc_index, "offset": self.offset}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.doc_index, self.offset = int(state["epoch"]), int(state["doc_index"]), int(state["offset"])
        self._documents = None
        self._tokens = None

    def _open_current(self) -> None:
        """Position the document iterator on ``doc_index`` and tokenise that document."""
        self._documents = self.source.documents(self.doc_index)
        self._tokens = self._next_tokens()

    def _next_tokens(self):
        text = next(self._documents, None)
        if text is None:
            return None
        return self.encode(text)

    def _advance(self) -> None:
        """Move to the next document, wrapping to a new epoch at the end of the source."""
        self.doc_index += 1
        self.offset = 0
        self._tokens = self._next_tokens()
        if self._tokens is None:
            if self.doc_index == 0:
                raise ValueError("the data source has no documents")
            self.epoch += 1
            self.doc_index = 0
            self._open_current()
            if self._tokens is None:
                raise ValueError("the data source has no documents")

    def next_pack(self) -> Pack:
        """The next ``seq_len`` tokens, with the lengths of the sequences they hold."""
        if self._documents is None:
            self._open_current()
            if self._tokens is None:
                raise ValueError(f"the data source has no document at index {self.doc_index} "
                                 "(empty, or shorter than when the stream position was saved)")
        pieces, lengths, need, empty_run = [], [], self.seq_len, 0
        while need > 0:
            remaining = len(self._tokens) - self.offset
            if remaining <= 0:
                empty_run = empty_run + 1 if len(self._tokens) == 0 else 0
                if empty_run > 1_000_000:
                    raise ValueError("the data source yields only empty documents")
                self._advance()
                continue
            take = min(need, remaining)
            pieces.append(self._tokens[self.offset:self.offset + take])
            lengths.append(take)
            self.offset += take
            need -= take
        return Pack(tokens=np.concatenate(pieces), seq_lengths=lengths)


def held_out_packs(source: DocumentSource, encode: Callable[[str], np.ndarray], seq_len: int,
                   count: int) -> List[Pack]:
    """The first ``count`` packs of ``source`` (a held-out split), each of ``seq_len`` tokens: the same packs at
    every evaluation of every run.  Raises ValueError when the source holds fewer than ``count * seq_len`` tokens
    (no pack is repeated)."""
    if count < 1:
        raise ValueError(f"count must be a positive number of packs, got {count}")
    stream = PackedStream(source, encode, seq_len)
    packs = [stream.next_pack() for _ in range(count)]
    if stream.epoch:
        raise ValueError(f"the held-out data holds fewer than {count} packs of {seq_len} tokens: give more "
                         "documents or fewer eval_packs")
    return packs


@dataclass
class PackedBatch:
    """Packs laid end to end as one row (B == 1), the layout ``cu_seqlens`` models take.

    input_ids, targets: [1, n * seq_len] int64 (targets = next token of the same sequence, else -100);
    cu_seqlens: [N + 1] int32 offsets of the N sequences; num_targets: predicted tokens (targets != -100).
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    num_targets: int

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                           self.cu_seqlens.to(device, non_blocking=True), self.num_targets)


def collate_packs(packs: Sequence[Pack]) -> PackedBatch:
    """Lay packs end to end: input_ids/targets [1, sum of seq_len], cu_seqlens [N + 1] int32."""
    if not packs:
        raise ValueError("collate_packs needs at least one pack")
    tokens = torch.from_numpy(np.concatenate([p.tokens for p in packs]))
    lengths = torch.tensor([n for p in packs for n in p.seq_lengths], dtype=torch.int64)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:-1] = tokens[1:]
    targets[cu_seqlens[1:] - 1] = IGNORE_INDEX  # the last token of a sequence predicts nothing
    return PackedBatch(tokens[None], targets[None], cu_seqlens.to(torch.int32), int(sum(p.num_targets for p in packs)))
