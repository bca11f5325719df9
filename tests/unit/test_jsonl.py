"""agentwatch/sinks/jsonl.py: one event per line, readable back."""
import json

from agentwatch.core.events import ExecEvent, FileEvent, from_json
from agentwatch.sinks.jsonl import JsonlSink


def test_writes_one_json_object_per_line(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(str(path))
    sink.write(ExecEvent(filename="/bin/ls", argv=["ls", "-l"], pid=1))
    sink.write(FileEvent(op="open", path="caf\u00e9", pid=2))
    sink.flush()                                      # visible to a follower before close
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(ln)["kind"] for ln in lines] == ["exec", "file"]
    assert from_json(lines[1]).path == "caf\u00e9"
    assert sink.written == 2
    sink.close()
    sink.close()                                      # idempotent


def test_append_and_truncate_modes(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"kind":"fork"}\n')
    with_append = JsonlSink(str(path))
    with_append.write(FileEvent(op="open", path="/a"))
    with_append.close()
    assert len(path.read_text().splitlines()) == 2
    truncating = JsonlSink(str(path), "w")
    truncating.write(FileEvent(op="open", path="/b"))
    truncating.close()
    assert [json.loads(ln)["path"] for ln in path.read_text().splitlines()] == ["/b"]


def test_undecodable_path_is_written_not_lost(tmp_path):
    # a file name that is not UTF-8 (decoded with surrogateescape by the sensors)
    # must still reach the log: an agent must not hide an event that way
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(str(path))
    sink.write(FileEvent(op="open", path="/tmp/\udcff\udcfesecret", pid=3))
    sink.write(FileEvent(op="open", path="/tmp/after", pid=4))
    sink.close()
    events = [from_json(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
    assert [e.pid for e in events] == [3, 4]
    assert events[0].path.encode("utf-8", "surrogateescape") == b"/tmp/\xff\xfesecret"
