"""agentwatch/core/events.py: the event schema and its JSON Lines codec."""
import ast
import dataclasses
import errno
import json
import os

import pytest

from agentwatch.core import events as E

COMMON = dict(ts=1795843221.123456, run_id="20261128-051500-3f9a1c", agent="coder",
              pid=4242, tid=4243, ppid=1, uid=1000, comm="python3")

# One instance of every kind, with non-default values in its own fields.
SAMPLES = {
    "exec": E.ExecEvent(filename="/usr/bin/env", argv=["env", "-i", "x"], argv_truncated=True,
                        ret=-2, error="ENOENT", ancestry=[4242, 4000, 3999], **COMMON),
    "fork": E.ForkEvent(child=4300, **COMMON),
    "exit": E.ExitEvent(code=3, signal=9, **COMMON),
    "file": E.FileEvent(op="rename", path="a", abspath="/w/a", path2="/w/b", access=["read", "write"],
                        flags=0o102, mode=0o644, ret=-13, error="EACCES", **COMMON),
    "net": E.NetEvent(op="connect", family="inet6", addr="2001:db8::1", port=443, sock_type="stream",
                      protocol=6, ret=0, **COMMON),
    "flow": E.FlowEvent(proto="tcp", name="pypi.org", source="sni", family="inet", addr="151.101.0.223",
                        port=443, decision="allow", reason="pypi.org allowed by pypi.org",
                        pattern="pypi.org", upstream="151.101.0.223:443",
                        dns={"name": "pypi.org", "by": "agentwatch-dns", "answered_at": 1.5},
                        exe="/usr/bin/curl", bytes_out=517, bytes_in=4096, duration=0.25, **COMMON),
    "llm": E.LlmEvent(api="openai", path="/v1/chat/completions", model="gpt-x", upstream="main",
                      upstream_model="gpt-x-2026", stream=True, status=200, tokens_in=120, tokens_out=40,
                      queue_wait=0.002, latency=0.4, bytes_in=900, bytes_out=3000, **COMMON),
    "syscall": E.SyscallEvent(name="mount", nr=165, args=[1, 2, 2**64 - 1], path="/mnt",
                              ret=-1, error="EPERM", **COMMON),
    "signal": E.SignalEvent(op="pidfd_send_signal", target=4100, pidfd=5, signal=15,
                            signal_name="SIGTERM", ret=-1, error="EPERM", **COMMON),
    "violation": E.ViolationEvent(category="network", rule="egress", action="deny",
                                  detail={"addr": "1.2.3.4", "port": 22}, count=3, **COMMON),
    "msg": E.MsgEvent(op="send", method="SendMessage", peer="b", peer_run="r-b", message_id="m1",
                      task_id="t1", context_id="c1", facts_digest="sha256:00", parts=2, bytes=10,
                      finding={"category": "protocol", "rule": "protocol.peer", "reason": "no"}, **COMMON),
    "lifecycle": E.LifecycleEvent(phase="end", detail={"exit_status": 0, "events": 12}, **COMMON),
}


def test_samples_cover_every_kind():
    assert set(SAMPLES) == set(E.EVENT_TYPES) == set(E.KINDS)
    for kind, cls in E.EVENT_TYPES.items():
        assert cls().kind == kind
        assert isinstance(SAMPLES[kind], cls)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_json_round_trip(kind):
    ev = SAMPLES[kind]
    line = ev.to_json()
    assert "\n" not in line
    back = E.from_json(line)
    assert type(back) is type(ev)
    assert back == ev
    assert json.loads(line) == ev.to_dict()


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_field_is_serialised(kind):
    d = SAMPLES[kind].to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(E.EVENT_TYPES[kind])}


@pytest.mark.parametrize("kind", sorted(E.EVENT_TYPES))
def test_required_keys_on_every_event(kind):
    d = json.loads(E.EVENT_TYPES[kind]().to_json())
    for key in ("kind", "ts", "run_id", "agent", "pid"):
        assert key in d
    assert d["kind"] == kind


def test_to_dict_is_a_copy():
    ev = E.ForkEvent(child=1)
    d = ev.to_dict()
    d["child"] = 2
    assert ev.child == 1


def test_mutable_defaults_are_not_shared():
    a, b = E.ExecEvent(), E.ExecEvent()
    a.argv.append("x")
    assert b.argv == []


def _json_dumps(ev):
    return json.dumps(ev.__dict__, separators=(",", ":"))


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_to_json_is_json_dumps_byte_for_byte(kind):
    # the log's hash chain covers the exact line: the fast writer must not change a byte
    assert SAMPLES[kind].to_json() == _json_dumps(SAMPLES[kind])
    assert E.EVENT_TYPES[kind]().to_json() == _json_dumps(E.EVENT_TYPES[kind]())


@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 2**64 + 5, 1.5, -0.0, 1e300, float("nan"), float("inf"),
    float("-inf"), "", "caf\u00e9 \"q\" \\ \n\t\x00 \udcff", ["a", 1, None, True], [],
    {"k": [1.25, {"n": None}], "b": False}, (1, 2),
])
def test_to_json_values_of_any_type_as_json_writes_them(value):
    for field in ("path", "flags", "ts", "access", "comm", "prev"):
        ev = E.FileEvent(op="open", **COMMON)
        setattr(ev, field, value)
        assert ev.to_json() == _json_dumps(ev)


def test_to_json_int_and_str_subclasses_as_json_writes_them():
    import enum

    class Num(enum.IntEnum):
        A = 3

    class Name(str):
        pass
    ev = E.FileEvent(op=Name("open"), flags=Num.A, **COMMON)
    assert ev.to_json() == _json_dumps(ev)


def test_to_json_attribute_added_after_init_is_written():
    ev = E.ForkEvent(child=1, **COMMON)
    ev.note = "extra"
    assert ev.to_json() == _json_dumps(ev)
    assert json.loads(ev.to_json())["note"] == "extra"
    del ev.child
    assert ev.to_json() == _json_dumps(ev)


def test_to_json_of_the_base_class():
    ev = E.Event(kind="lifecycle", ts=1.0, pid=3)
    assert ev.to_json() == _json_dumps(ev)


def test_non_ascii_and_undecodable_paths_round_trip():
    # records.cstr() decodes with surrogateescape: a path may hold lone surrogates
    ev = E.FileEvent(op="open", path="/tmp/caf\u00e9/\udcff\udcfe", **COMMON)
    line = ev.to_json()
    line.encode("utf-8")            # the JSONL sink writes UTF-8: must not raise
    assert E.from_json(line).path == ev.path


def test_from_dict_ignores_unknown_keys():
    ev = E.from_dict({"kind": "fork", "child": 7, "pid": 1, "future_field": [1, 2], "x": None})
    assert isinstance(ev, E.ForkEvent)
    assert (ev.child, ev.pid) == (7, 1)
    assert not hasattr(ev, "future_field")


def test_from_dict_missing_fields_get_defaults():
    ev = E.from_dict({"kind": "exit"})
    assert ev == E.ExitEvent()


@pytest.mark.parametrize("d", [{"kind": "teleport"}, {}, {"kind": None}, {"kind": ""}])
def test_from_dict_rejects_unknown_kinds(d):
    with pytest.raises(ValueError) as e:
        E.from_dict(d)
    assert repr(d.get("kind")) in str(e.value)


@pytest.mark.parametrize("ret, name", [
    (None, None), (0, None), (5, None), (2**40, None),
    (-errno.EACCES, "EACCES"), (-errno.ENOENT, "ENOENT"), (-errno.EPERM, "EPERM"),
    (-errno.EINPROGRESS, "EINPROGRESS"), (-4000, "E4000"),
])
def test_errno_name(ret, name):
    assert E.errno_name(ret) == name


# ---------------------------------------------------------------- the violation vocabulary

# where each maker of a decision or violation takes its category and action
# (positional index, keyword); None: the maker has no such argument
_MAKERS = {"Decision": ((0, "category"), (2, "action")), "_decide": ((0, "category"), None),
           "kernel_denial": ((1, "category"), None), "ViolationEvent": ((None, "category"), (None, "action"))}


def _literals(call, where):
    index, keyword = where
    args = [call.args[index]] if index is not None and len(call.args) > index else []
    args += [k.value for k in call.keywords if k.arg == keyword]
    return [a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def _made(what):
    """(file:line, literal) of every category (what=0) or action (1) the code
    writes into a Decision or a ViolationEvent."""
    root = os.path.dirname(os.path.dirname(E.__file__))   # the agentwatch package
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    fn = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    where = _MAKERS.get(fn, (None, None))[what]
                    for value in _literals(node, where) if where else ():
                        yield f"{os.path.relpath(path, root)}:{node.lineno}", value


def test_every_violation_category_and_action_is_in_the_contract():
    """events.CATEGORIES and events.ACTIONS are the contract (a violation's
    category is one of ..., its action one of ...): every literal the code
    puts there is one of them, and the policy uses the same words."""
    from agentwatch.policy import checker, model
    categories, actions = list(_made(0)), list(_made(1))
    assert len(categories) > 20 and len(actions) >= 5          # the scan sees the makers
    assert [c for c in categories if c[1] not in E.CATEGORIES] == []
    assert [a for a in actions if a[1] not in E.ACTIONS] == []
    assert checker.ACTIONS is E.ACTIONS
    assert set(model.CATEGORY_SECTION) <= set(E.CATEGORIES)
