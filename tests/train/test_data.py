"""Data pipeline: tokenizer, document sources, packing, collation and the stream's exact resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from palimpsa.train.data import (
    IGNORE_INDEX,
    DocumentSource,
    PackedStream,
    collate_packs,
    make_encoder,
    resolve_local_files,
)
from palimpsa.train.tokenizer import BYTE_EOS_ID, byte_level_tokenizer, is_byte_level, load_tokenizer
from tests.train.corpus import write_corpus

TEXT = "Palimpsa wörks ✓ 漢字\n\ttabs  and  spaces"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def test_byte_tokenizer_ids_are_utf8_bytes_and_round_trip(tokenizer, tmp_path):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token_id == BYTE_EOS_ID and is_byte_level(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert is_byte_level(reloaded)


def test_fast_byte_encoder_matches_tokenizer(tokenizer):
    fast = make_encoder(tokenizer, append_eos=True)(TEXT)
    assert fast.tolist() == tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [BYTE_EOS_ID]
    assert make_encoder(tokenizer, append_eos=False)(TEXT).tolist() == list(TEXT.encode("utf-8"))


def test_local_sources_files_directories_globs_and_jsonl(tmp_path):
    write_corpus(str(tmp_path), text_files=2, jsonl_records=3)
    files = resolve_local_files([str(tmp_path)])
    assert [os.path.basename(f) for f in files] == ["doc0.txt", "doc1.txt", "more.jsonl"]
    assert resolve_local_files([str(tmp_path / "*.txt")]) == files[:2]
    docs = list(DocumentSource([str(tmp_path)]).documents())
    assert len(docs) == 5 and docs[0] == (tmp_path / "doc0.txt").read_text()
    records = [json.loads(line)["text"] for line in (tmp_path / "more.jsonl").read_text().splitlines()]
    assert docs[2:] == records
    assert list(DocumentSource([str(tmp_path)]).documents(start=3)) == docs[3:]


def test_bad_data_raises_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        DocumentSource([str(tmp_path / "missing*.txt")])
    with pytest.raises(ValueError, match="at least one"):
        DocumentSource([])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="field 'text'"):
        list(DocumentSource([str(bad)]).documents())
    with pytest.raises(ValueError, match="only one"):
        DocumentSource(["hf:wikitext", str(bad)])


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "second"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert list(DocumentSource([str(tmp_path / "d.parquet")]).documents()) == ["first doc", "second"]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(DocumentSource([str(tmp_path / "d.parquet")], text_field="body").documents())


def _docs_stream(docs, seq_len):
    class ListSource:
        def documents(self, start=0):
            return iter(docs[start:])

    return PackedStream(ListSource(), lambda text: np.array([ord(c) for c in text] + [0], dtype=np.int64), seq_len)


def test_packs_are_exact_budget_and_follow_document_boundaries():
    docs = ["abcdefg", "hi", "jklmnopqrstuvw", "x"]
    stream = _docs_stream(docs, seq_len=5)
    packs = [stream.next_pack() for _ in range(9)]
    assert all(len(p.tokens) == 5 and sum(p.seq_lengths) == 5 for p in packs)
    flat = np.concatenate([p.tokens for p in packs]).tolist()
    epoch = [t for d in docs for t in [ord(c) for c in d] + [0]]  # 8 + 3 + 15 + 2 = 28 tokens per epoch
    assert flat == (epoch * 2)[:45]  # the stream wraps around to a second epoch
    lengths = [n for p in packs for n in p.seq_lengths]
    # packs: 'abcde' | 'fg$' 'hi' | '$' 'jklm' | 'nopqr' : documents continue across packs as new sequences
    assert lengths[:6] == [5, 3, 2, 1, 4, 5]


def test_stream_resumes_exactly_from_its_state():
    docs = ["one two", "three", "four five six seven", "", "eight nine"]
    reference = _docs_stream(docs, 6)
    expected = [reference.next_pack() for _ in range(12)]
    interrupted = _docs_stream(docs, 6)
    [interrupted.next_pack() for _ in range(5)]
    resumed = _docs_stream(docs, 6)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    for want in expected[5:]:
        got = resumed.next_pack()
        assert got.tokens.tolist() == want.tokens.tolist() and got.seq_lengths == want.seq_lengths


def test_empty_source_raises():
    with pytest.raises(ValueError, match="no document"):
        _docs_stream([], 4).next_pack()


def test_collate_targets_stay_inside_sequences():
    docs = ["abc", "defgh"]
    stream = _docs_stream(docs, 4)
    packs = [stream.next_pack(), stream.next_pack()]  # 'abc$' | 'defg' , 'h$' + 'ab'
    batch = collate_packs(packs)
    assert batch.input_ids.shape == (1, 8) and batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 4, 8]
    packs = [stream.next_pack()]  # 'h$' | 'ab'
    batch = collate_packs(packs)
    assert batch.cu_seqlens.tolist() == [0, 2, 4]
    assert batch.targets.tolist() == [[0, IGNORE_INDEX, ord("b"), IGNORE_INDEX]]
    assert batch.num_targets == int((batch.targets != IGNORE_INDEX).sum()) == 2


def test_hugging_face_streaming_source_resumes_by_skipping(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        rows = [{"text": f"document {i}"} for i in range(5)]
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = DocumentSource(["hf:someone/corpus:en"], hf_split="validation")
    assert list(source.documents()) == [f"document {i}" for i in range(5)]
    assert list(source.documents(start=3)) == ["document 3", "document 4"]
    assert calls[0] == ("someone/corpus", "en", "validation", True)
