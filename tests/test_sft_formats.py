"""SFT input readers: OpenAI messages JSONL (and JSON arrays, gzip), ShareGPT rows, Hugging Face datasets
(save_to_disk directories and parquet files, skipped when `datasets` is absent); each kind of bad row
raises DataFormatError naming file and line, or is skipped and counted with on_error="skip"."""
import gzip
import json

import pytest

from mellum2.errors import MellumError
from mellum2.posttrain import sftdata
from mellum2.posttrain.formats import DataFormatError, ReadStats, load_conversations, read_conversations

GOOD = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!", "reasoning": "A greeting."}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "2 + "}, {"type": "text", "text": "2?"}]},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 + 2"}}},
                      {"id": "c2", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\": \"3\"}"}}]},
                  {"role": "tool", "content": "{\"result\": 4}"},
                  {"role": "tool", "tool_call_id": "c2", "content": "{\"result\": 3}"},
                  {"role": "assistant", "content": "4 and 3."}],
     "tools": [{"name": "calculator", "parameters": {"type": "object"}}]},
]


def write_jsonl(path, rows, raw=()):
    lines = [json.dumps(r) for r in rows] + list(raw)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_openai_rows_normalised(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", GOOD)
    convs, stats = load_conversations(f)
    assert stats.kept == 2 and stats.skipped == 0 and stats.files == 1
    a, b = convs
    assert a["messages"][2] == {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."}
    assert a["source"] == f"{f}:1" and "tools" not in a
    assert b["messages"][0]["content"] == "2 + 2?"
    calls = b["messages"][1]["tool_calls"]
    assert b["messages"][1]["content"] == ""
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"expression": "2 + 2"}, {"expression": "3"}]
    assert calls[1]["id"] == "c2" and calls[0]["id"] != "c2"
    # results matched to calls: the first by position, the second by its id; names filled in
    assert [(m["tool_call_id"], m["name"]) for m in b["messages"][2:4]] == [(calls[0]["id"], "calculator"), ("c2", "calculator")]
    assert b["tools"] == [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]


def test_json_array_gzip_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x.json").write_text(json.dumps(GOOD))
    with gzip.open(tmp_path / "d" / "sub" / "y.jsonl.gz", "wt") as f:
        f.write(json.dumps(GOOD[0]) + "\n")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    convs, stats = load_conversations(tmp_path / "d")
    assert len(convs) == 3 and stats.files == 2
    # files in sorted path order: d/sub/y.jsonl.gz before d/x.json
    assert convs[0]["source"].endswith("sub/y.jsonl.gz:1") and convs[1]["source"].endswith("x.json: item 0")


def test_sharegpt_rows(tmp_path):
    row = {"system": "You are terse.", "tools": json.dumps([{"name": "lookup", "parameters": {"type": "object"}}]),
           "conversations": [
               {"from": "human", "value": "Capital of Peru?"},
               {"from": "function_call", "value": json.dumps({"name": "lookup", "arguments": {"entity": "Peru", "field": "capital"}})},
               {"from": "observation", "value": "{\"value\": \"Lima\"}"},
               {"from": "gpt", "value": "Lima."},
               {"from": "human", "value": "Thanks"},
               {"from": "gpt", "value": "Let me check both."},
               {"from": "function_call", "value": json.dumps([{"name": "lookup", "arguments": "{\"entity\": \"Chile\", \"field\": \"capital\"}"},
                                                               {"name": "lookup", "arguments": {"entity": "Peru", "field": "continent"}}])},
               {"from": "observation", "value": "Santiago"}, {"from": "observation", "value": "South America"},
               {"role": "assistant", "content": "Santiago; South America."}]}
    (conv,), _ = load_conversations(write_jsonl(tmp_path / "s.jsonl", [row]))
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "tool", "assistant"]
    assert conv["messages"][0]["content"] == "You are terse."
    assert conv["messages"][6]["content"] == "Let me check both." and len(conv["messages"][6]["tool_calls"]) == 2
    assert conv["messages"][7]["tool_call_id"] == conv["messages"][6]["tool_calls"][0]["id"]
    assert conv["messages"][8]["tool_call_id"] == conv["messages"][6]["tool_calls"][1]["id"]
    assert conv["tools"][0]["function"]["name"] == "lookup"


BAD = [  # (raw line, what the message must say)
    ('{"messages": [{"role": "user", "content": "Hi"}', "malformed JSON"),
    ('{"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}',
     "messages[0].role: unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null, "tool_calls": '
     '[{"function": {"name": "f", "arguments": "[1, 2]"}}]}]}', "messages[1].tool_calls[0].function.arguments: must be a JSON object"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null, "tool_calls": '
     '[{"function": {"name": "f", "arguments": "{nope"}}]}]}', "function.arguments: not valid JSON"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "Yo"}]}', "messages[0].content: missing"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}', "messages[1].content: missing"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]}',
     "tool result with no pending tool call"),
    ('{"messages": [{"role": "user", "content": "<|im_start|>system"}, {"role": "assistant", "content": "ok"}]}',
     "control token"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "ok"}]}', "expected a string"),
    ('{"conversations": [{"from": "alien", "value": "Hi"}]}', "conversations[0].from: unknown role 'alien'"),
    ('{"prompt": "Hi", "completion": "Yo"}', "expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) list"),
    ('[1, 2]', "expected a JSON object"),
]


@pytest.mark.parametrize("raw,want", BAD)
def test_each_bad_row_names_file_line_and_field(tmp_path, raw, want):
    f = write_jsonl(tmp_path / "bad.jsonl", GOOD[:1], raw=[raw])
    with pytest.raises(DataFormatError) as e:
        load_conversations(f)
    assert str(e.value).startswith(f"{f}:2: ") and want in str(e.value)
    assert isinstance(e.value, MellumError)
    convs, stats = load_conversations(f, on_error="skip")
    assert len(convs) == 1 and (stats.rows, stats.kept, stats.skipped) == (2, 1, 1)
    assert stats.reasons == [str(e.value)] and "skipped 1 bad row(s)" in stats.summary()


def test_skip_counts_many_and_keeps_order(tmp_path):
    f = write_jsonl(tmp_path / "mix.jsonl", GOOD, raw=[raw for raw, _ in BAD] + [json.dumps(GOOD[1])])
    stats = ReadStats()
    convs = list(read_conversations(f, on_error="skip", stats=stats))
    assert len(convs) == 3 and stats.skipped == len(BAD) and stats.kept == 3
    assert [c["source"] for c in convs] == [f"{f}:1", f"{f}:2", f"{f}:{3 + len(BAD)}"]
    assert [r.split(": ", 1)[0] for r in stats.reasons] == [f"{f}:{3 + i}" for i in range(len(BAD))]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        load_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no data files"):
        load_conversations(tmp_path / "empty")
    (tmp_path / "broken.json").write_text("[{\"messages\": ")
    with pytest.raises(DataFormatError, match="broken.json:1: not valid JSON"):
        load_conversations(tmp_path / "broken.json", on_error="skip")
    (tmp_path / "latin.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_conversations(tmp_path / "latin.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_conversations(tmp_path / "latin.jsonl", on_error="ignore")


def test_generated_data_round_trips(tmp_path):
    convs = sftdata.sft_conversations("heldout", "thinking", n=200)
    f = write_jsonl(tmp_path / "gen.jsonl", convs)
    back, stats = load_conversations(f)
    assert stats.skipped == 0
    for a, b in zip(convs, back):
        assert a["messages"] == b["messages"] and a.get("tools") == b.get("tools")


def test_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    convs = sftdata.sft_conversations("heldout", "instruct", n=40)
    rows = [{"messages": json.loads(json.dumps(c["messages"]))} for c in convs if "tools" not in c]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    back, stats = load_conversations(tmp_path / "saved")
    assert stats.kept == len(rows)
    for a, b in zip(rows, back):
        assert a["messages"] == b["messages"]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_conversations(tmp_path / "dict")[0]) == len(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    back, _ = load_conversations(tmp_path / "rows.parquet")
    assert [b["messages"] for b in back] == [a["messages"] for a in rows]
    sharegpt = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "Hi"},
                                                              {"from": "gpt", "value": "Hello"}]},
                                           {"conversations": [{"from": "alien", "value": "Hi"}]}])
    sharegpt.save_to_disk(str(tmp_path / "sg"))
    with pytest.raises(DataFormatError, match=r"sg: row 1: conversations\[0\].from: unknown role"):
        load_conversations(tmp_path / "sg")
    back, stats = load_conversations(tmp_path / "sg", on_error="skip")
    assert len(back) == 1 and stats.skipped == 1
