"""Tests for jaxpost/data/sources.py: JSONL, ArrayRecord, TFDS and in-memory sources."""

import json
import pickle

import numpy as np
import pytest

from jaxpost.data.sources import (
    ArrayRecordSource,
    InMemorySource,
    JsonlSource,
    MalformedRecordError,
    MappedSource,
    TfdsSource,
    validate_record,
    write_array_record,
)

PC = {"prompt": "2+2=", "completion": "4", "id": 1}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_prompt_completion_and_chat_records(tmp_path):
    p = _write_lines(tmp_path / "a.jsonl", [json.dumps(PC), "", json.dumps(CHAT), "   "])
    src = JsonlSource(p)
    assert len(src) == 2
    assert src[0] == PC and src[1] == CHAT and src[-1] == CHAT
    assert src.stats.num_blank == 2 and src.stats.num_malformed == 0
    assert src.location(1) == (str(p), 3)
    with pytest.raises(IndexError):
        src[2]


def test_jsonl_malformed_line_error_names_file_and_line(tmp_path):
    p = _write_lines(tmp_path / "bad.jsonl", [json.dumps(PC), json.dumps(PC), "{oops", "{}"])
    with pytest.raises(MalformedRecordError, match=r"bad\.jsonl:3: not valid JSON.*"
                                                   r"skip_malformed=True"):
        JsonlSource(p)


def test_jsonl_schema_violation_error_says_what_is_expected(tmp_path):
    p = _write_lines(tmp_path / "s.jsonl", [json.dumps({"prompt": "x"})])
    with pytest.raises(MalformedRecordError, match=r"s\.jsonl:1: record has keys \['prompt'\]; "
                                                   r"expected 'prompt' and 'completion'"):
        JsonlSource(p)
    assert len(JsonlSource(p, schema="prompt")) == 1  # prompt-only is fine for generation


def test_jsonl_skip_mode_counts_malformed_lines(tmp_path):
    a = _write_lines(tmp_path / "a.jsonl", [json.dumps(PC), "not json", json.dumps([1, 2])])
    b = _write_lines(tmp_path / "b.jsonl", [
        json.dumps({"messages": [{"role": "user"}]}), json.dumps(CHAT), ""])
    src = JsonlSource([a, b], skip_malformed=True)
    assert len(src) == 2 and src[0] == PC and src[1] == CHAT
    assert src.stats.num_malformed == 3 and src.stats.num_records == 2
    assert src.stats.num_blank == 1
    assert [e.split(": ")[0] for e in src.stats.examples] == [
        f"{a}:2", f"{a}:3", f"{b}:1"]


def test_jsonl_rename_and_pickle(tmp_path):
    p = _write_lines(tmp_path / "q.jsonl", [json.dumps({"question": "q", "answer": "a"})] * 3)
    src = JsonlSource(p, rename={"question": "prompt", "answer": "completion"})
    assert src[2] == {"prompt": "q", "completion": "a"}
    clone = pickle.loads(pickle.dumps(src))
    assert clone[1] == src[1] and len(clone) == 3


def test_array_record_round_trip_over_files(tmp_path):
    recs = [dict(PC, id=i) for i in range(7)]
    assert write_array_record(tmp_path / "a.array_record", recs[:4]) == 4
    write_array_record(tmp_path / "b.array_record", recs[4:])
    src = ArrayRecordSource([tmp_path / "a.array_record", tmp_path / "b.array_record"])
    assert len(src) == 7
    assert [src[i]["id"] for i in range(7)] == list(range(7))


def test_array_record_bad_record_names_file_and_index(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "bad.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    w.write(json.dumps(PC).encode())
    w.write(b"\xff not json")
    w.write(json.dumps({"text": "x"}).encode())
    w.close()
    src = ArrayRecordSource(path)
    assert src[0] == PC
    with pytest.raises(MalformedRecordError, match=r"bad\.array_record record 1: not valid JSON"):
        src[1]
    with pytest.raises(MalformedRecordError, match=r"bad\.array_record record 2: record has keys"):
        src[2]


def test_in_memory_and_mapped_sources():
    src = InMemorySource([PC, CHAT], schema="sft")
    assert len(src) == 2 and src[1] == CHAT
    with pytest.raises(MalformedRecordError, match="record 1"):
        InMemorySource([PC, {"x": 1}], schema="sft")
    mapped = MappedSource(src, lambda r: {**r, "seen": True})
    assert mapped[0]["seen"] and len(mapped) == 2


def test_validate_record_shapes():
    assert validate_record(PC) is None and validate_record(CHAT) is None
    assert validate_record({"prompt": CHAT["messages"][:1],
                            "completion": CHAT["messages"][1:]}) is None
    assert "both be strings or both be message lists" in validate_record(
        {"prompt": "x", "completion": CHAT["messages"]})
    assert "needs string 'role' and 'content'" in validate_record({"messages": [{"role": 1}]})
    assert "expected an object" in validate_record([PC])


class _StandIn:
    """Same interface as what tfds.data_source returns: len + getitem of numpy values."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_tfds_adapter_converts_numpy_values_with_a_stand_in():
    rows = [{"question": b"2+2?", "answer": b"4", "n": np.int64(3)},
            {"question": np.array(b"x", dtype=object), "answer": b"y", "n": np.int64(4)}]
    src = TfdsSource("stand_in", data_source=_StandIn(rows),
                     rename={"question": "prompt", "answer": "completion"})
    assert src[0] == {"prompt": "2+2?", "completion": "4", "n": 3}
    assert src[1]["prompt"] == "x"
    with pytest.raises(MalformedRecordError, match="use rename="):
        TfdsSource("stand_in", data_source=_StandIn(rows))[0]


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    """Builds a TFDS dataset stored as array_record, without TensorFlow or network."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxpostTinySft(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "prompt": tfds.features.Text(), "completion": tfds.features.Text(),
                "messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                                    "content": tfds.features.Text()}),
                "idx": np.int32}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"prompt": f"{i}+1=", "completion": f"{i + 1} é", "idx": i,
                          "messages": [{"role": "user", "content": f"q{i}"},
                                       {"role": "assistant", "content": f"a{i}"}]}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    JaxpostTinySft(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_reads_a_locally_built_array_record_dataset(tiny_tfds_dir):
    src = TfdsSource("jaxpost_tiny_sft", split="train", data_dir=tiny_tfds_dir)
    assert len(src) == 6
    recs = sorted((src[i] for i in range(6)), key=lambda r: r["idx"])
    assert recs[2]["prompt"] == "2+1=" and recs[2]["completion"] == "3 é"
    assert recs[2]["messages"] == [{"role": "user", "content": "q2"},
                                   {"role": "assistant", "content": "a2"}]
    assert len(TfdsSource("jaxpost_tiny_sft", split="test", data_dir=tiny_tfds_dir)) == 2


def test_open_source_picks_the_format(tmp_path, tiny_tfds_dir):
    from jaxpost.data.sources import open_source

    _write_lines(tmp_path / "a.jsonl", [json.dumps(PC)] * 2)
    _write_lines(tmp_path / "b.jsonl", [json.dumps(CHAT)])
    assert len(open_source(str(tmp_path / "*.jsonl"))) == 3
    write_array_record(tmp_path / "c.array_record", [PC] * 4)
    assert isinstance(open_source(str(tmp_path / "c.array_record")), ArrayRecordSource)
    assert len(open_source("tfds:jaxpost_tiny_sft", split="test", data_dir=tiny_tfds_dir)) == 2
    held = open_source("synthetic:addition", split="heldout", num_records=10)
    assert len(held) == 10 and "answer" in held[0]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_source(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_source(str(tmp_path / "a.jsonl") + "," + str(tmp_path / "c.array_record"))
