"""agentwatch/integrity.py: keys, file signatures, the hash-chained run log and its seal.

No root, no kernel. Keys live in a temporary state directory (the `state_dir`
fixture sets AGENTWATCH_STATE_DIR).
"""
import base64
import hashlib
import json
import os
import re
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentwatch import integrity
from agentwatch.core.errors import PolicyError
from agentwatch.core.events import FileEvent, LifecycleEvent
from agentwatch.integrity import (Chain, IntegrityError, check_signed, generate_key, host_key, key_id,
                                  load_private_key, load_public_key, seal, sign_file, trusted_keys,
                                  verify_file, verify_log)

RUN = "20261128-051500-3f9a1c"
BREAK_HINT = "(a line was edited, dropped, inserted or reordered at or before here)"


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- keys ------------------------------------------------------------------------

def test_generate_key_writes_private_0600_and_public(tmp_path):
    kid, key_path, pub_path = generate_key(str(tmp_path / "keys"), "alice")
    assert key_path == str(tmp_path / "keys" / "alice.key") and pub_path.endswith("alice.pub")
    assert mode(key_path) == 0o600
    assert mode(tmp_path / "keys") == 0o700
    assert open(key_path).read().startswith("-----BEGIN PRIVATE KEY-----")
    assert open(pub_path).read().startswith("-----BEGIN PUBLIC KEY-----")
    assert re.fullmatch(r"ed25519:[0-9a-f]{16}", kid)
    private, public = load_private_key(key_path), load_public_key(pub_path)
    assert key_id(private) == key_id(public) == kid
    raw = integrity.raw_public(public)
    assert len(raw) == 32 and kid == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def test_generate_key_refuses_to_overwrite_unless_forced(tmp_path):
    kid, key_path, _ = generate_key(str(tmp_path), "k")
    before = open(key_path).read()
    with pytest.raises(IntegrityError, match="already exists; use --force"):
        generate_key(str(tmp_path), "k")
    assert open(key_path).read() == before
    kid2, _, _ = generate_key(str(tmp_path), "k", force=True)
    assert kid2 != kid and open(key_path).read() != before
    assert mode(key_path) == 0o600
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden"])
def test_generate_key_refuses_path_like_names(tmp_path, name):
    with pytest.raises(IntegrityError, match="plain file name"):
        generate_key(str(tmp_path), name)


def test_load_key_errors_name_the_file(tmp_path):
    _, key_path, pub_path = generate_key(str(tmp_path), "k")
    with pytest.raises(IntegrityError, match=re.escape(pub_path)):
        load_private_key(pub_path)
    with pytest.raises(IntegrityError, match=re.escape(key_path)):
        load_public_key(key_path)
    with pytest.raises(IntegrityError, match="cannot read key"):
        load_private_key(str(tmp_path / "missing.key"))


def test_host_key_is_made_once_0600_and_trusted_for_logs(state_dir):
    key = host_key()
    keys = state_dir / "keys"
    assert mode(keys / "host.key") == 0o600 and mode(keys) == 0o700
    assert key_id(load_public_key(str(keys / "host.pub"))) == key_id(key)
    assert key_id(host_key()) == key_id(key), "a second call made a new host key"
    assert key_id(key) in trusted_keys(include_host=True)
    assert key_id(key) not in trusted_keys(), "the host key must not sign policies by default"


def test_trusted_keys_reads_trusted_dir_and_extra(state_dir, tmp_path):
    a, _, a_pub = generate_key(str(state_dir / "keys" / "trusted"), "a")
    b, _, b_pub = generate_key(str(tmp_path / "elsewhere"), "b")
    assert set(trusted_keys()) == {a}
    assert set(trusted_keys([b_pub])) == {a, b}
    (state_dir / "keys" / "trusted" / "broken.pub").write_text("not a key\n")
    with pytest.raises(IntegrityError, match="broken.pub"):
        trusted_keys()


# ---- file signatures ---------------------------------------------------------------

POLICY = b"kind: AgentPolicy\nmetadata:\n  name: strict\nfilesystem:\n  read: [/work]\n"


@pytest.fixture
def signed(tmp_path):
    """A policy file signed by key 'alice'; returns (path, alice key, {alice id: pub})."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(POLICY)
    key = Ed25519PrivateKey.generate()
    sign_file(str(path), key)
    return str(path), key, {key_id(key): key.public_key()}


def test_sign_file_writes_the_documented_sig(signed):
    path, key, _ = signed
    sig = json.loads(open(path + ".sig").read())
    digest = hashlib.sha256(POLICY).hexdigest()
    assert sig["version"] == 1 and sig["file"] == "policy.yaml" and sig["sha256"] == digest
    assert sig["signer"] == key_id(key)
    assert base64.b64decode(sig["public_key"]) == integrity.raw_public(key)
    message = ("agentwatch-file-v1\n" + digest + "\n").encode()
    key.public_key().verify(base64.b64decode(sig["signature"]), message)   # raises if not


def test_verify_file_ok(signed):
    path, key, trusted = signed
    info = verify_file(path, trusted)
    assert info.ok and info.signer == key_id(key)
    assert info.reason == f"signed by {key_id(key)} (trusted)"
    assert verify_file(path, trusted, required_signer=key_id(key)).ok


def test_any_byte_changed_is_refused(signed):
    path, _, trusted = signed
    for i in range(len(POLICY)):
        data = bytearray(POLICY)
        data[i] ^= 0x01
        with open(path, "wb") as f:
            f.write(data)
        info = verify_file(path, trusted)
        assert not info.ok, f"byte {i} changed and still verified"
        assert info.reason == "signature does not match the file (file changed after signing)"
    with open(path, "ab") as f:
        f.write(b"\n")
    assert not verify_file(path, trusted).ok, "an appended byte went unnoticed"


def test_untrusted_signer_is_refused(signed):
    path, key, _ = signed
    info = verify_file(path, {})
    assert not info.ok and info.signer == key_id(key)
    assert info.reason == f"signed by {key_id(key)} which is not trusted"


def test_trust_is_the_full_public_key_not_the_id(signed):
    """A different key filed under the signer's id (an id collision) is not trust."""
    path, key, _ = signed
    other = Ed25519PrivateKey.generate().public_key()
    assert not verify_file(path, {key_id(key): other}).ok


def test_required_signer_mismatch(signed):
    path, key, trusted = signed
    info = verify_file(path, trusted, required_signer="ed25519:0123456789abcdef")
    assert not info.ok
    assert info.reason == f"signed by {key_id(key)} but the policy requires ed25519:0123456789abcdef"


def test_missing_sig(tmp_path):
    path = tmp_path / "prompt.md"
    path.write_text("be careful\n")
    info = verify_file(str(path), {})
    assert not info.ok and info.signer is None
    assert info.reason == f"no signature file {path}.sig"


def test_sig_rewritten_for_a_changed_file_is_refused(signed):
    """Changing the file and the sha256 in the .sig leaves the signature over the old hash."""
    path, _, trusted = signed
    with open(path, "ab") as f:
        f.write(b"network: {allow: ['*']}\n")
    sig = json.loads(open(path + ".sig").read())
    sig["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    open(path + ".sig", "w").write(json.dumps(sig))
    info = verify_file(path, trusted)
    assert not info.ok and info.reason.startswith("signature is invalid")


def test_sig_with_a_swapped_public_key_is_refused(signed):
    path, _, trusted = signed
    sig = json.loads(open(path + ".sig").read())
    sig["public_key"] = base64.b64encode(integrity.raw_public(Ed25519PrivateKey.generate())).decode()
    open(path + ".sig", "w").write(json.dumps(sig))
    assert not verify_file(path, trusted).ok


def test_garbage_sig_is_a_reason_not_a_crash(signed):
    path, _, trusted = signed
    open(path + ".sig", "w").write("{not json")
    info = verify_file(path, trusted)
    assert not info.ok and "is not a valid signature file" in info.reason


def test_verify_file_defaults_to_the_trusted_dir(state_dir, tmp_path):
    kid, key_path, _ = generate_key(str(state_dir / "keys" / "trusted"), "team")
    path = tmp_path / "p.yaml"
    path.write_bytes(POLICY)
    sign_file(str(path), load_private_key(key_path))
    assert verify_file(str(path)).ok


def test_check_signed_when_required(signed):
    path, key, trusted = signed
    assert check_signed(path, True, None, trusted) == key_id(key)
    assert check_signed(path, False, key_id(key), trusted) == key_id(key)
    with pytest.raises(PolicyError) as e:
        check_signed(path, True, None, {})
    assert str(e.value) == f"{path}: signed by {key_id(key)} which is not trusted"
    with pytest.raises(PolicyError, match="but the policy requires ed25519:ffff"):
        check_signed(path, False, "ed25519:ffff", trusted)
    os.remove(path + ".sig")
    with pytest.raises(PolicyError) as e:
        check_signed(path, True, None, trusted)
    assert str(e.value) == f"{path}: no signature file {path}.sig"
    assert "\n" not in str(e.value)


def test_check_signed_when_not_required(signed):
    path, key, trusted = signed
    assert check_signed(path, False, None, trusted) == key_id(key)
    assert check_signed(path, False, None, {}) is None            # signed, but not by a trusted key
    with open(path, "ab") as f:
        f.write(b"#")
    assert check_signed(path, False, None, trusted) is None       # no longer matches
    os.remove(path + ".sig")
    assert check_signed(path, False, None, trusted) is None       # unsigned is allowed


# ---- the hash chain ---------------------------------------------------------------

HOST = Ed25519PrivateKey.generate()
TRUSTED = {key_id(HOST): HOST.public_key()}


def dumps(d):
    return json.dumps(d, separators=(",", ":"))


def build_log(run_id=RUN, n_events=6, key=HOST, sealed=True):
    """The lines of a run log, written the way the runner writes them: set
    prev, serialise, advance the chain with the exact line; then the seal."""
    chain = Chain(run_id)
    lines = []
    counts = {}
    for i in range(n_events):
        kind = "lifecycle" if i == 0 else ("exec", "file", "net")[i % 3]
        event = {"kind": kind, "ts": 1795843221.25 + i, "run_id": run_id, "agent": "coder",
                 "pid": 4500 + i, "path": f"/tmp/f{i}"}
        event["prev"] = chain.prev
        line = dumps(event)
        lines.append(line)
        chain.advance(line)
        counts[kind] = counts.get(kind, 0) + 1
    if sealed:
        detail = seal(chain, run_id, counts, key)
        event = {"kind": "lifecycle", "phase": "seal", "ts": 1795843299.5, "run_id": run_id,
                 "agent": "coder", "pid": 4500, "detail": detail, "prev": chain.prev}
        lines.append(dumps(event))
    return lines


def write(tmp_path, lines, name="events.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def check(tmp_path, lines, **kw):
    return verify_log(write(tmp_path, lines), kw.pop("trusted", TRUSTED), **kw)


def test_chain_start_and_advance():
    chain = Chain(RUN)
    assert chain.prev == hashlib.sha256(("agentwatch-log-v1\n" + RUN).encode()).hexdigest()
    chain.advance('{"a":1}')
    assert chain.prev == hashlib.sha256(b'{"a":1}').hexdigest() and chain.lines == 1


def test_seal_detail_is_signed_canonical_json():
    chain = Chain(RUN)
    chain.advance("x")
    detail = seal(chain, RUN, {"exec": 1}, HOST)
    assert detail["events"] == 1 and detail["last"] == chain.prev and detail["counts"] == {"exec": 1}
    assert detail["host_key"] == key_id(HOST)
    payload = json.dumps({"run_id": RUN, "events": 1, "last": chain.prev, "counts": {"exec": 1}},
                         sort_keys=True, separators=(",", ":")).encode()
    HOST.public_key().verify(base64.b64decode(detail["signature"]), payload)
    with pytest.raises(ValueError):
        seal(chain, "another-run", {}, HOST)


def test_intact_log_verifies(tmp_path):
    lines = build_log()
    report = check(tmp_path, lines)
    assert report.ok and report.problems == []
    assert report.lines == len(lines) and report.sealed and report.signer == key_id(HOST)


def test_log_written_with_the_event_classes_verifies(tmp_path):
    """The runner's path: event.prev set on the dataclass, event.to_json() is the line."""
    chain = Chain(RUN)
    lines = []
    for event in (LifecycleEvent(phase="start", run_id=RUN, ts=1.0, detail={"agent": "coder"}),
                  FileEvent(op="open", path="/etc/passwd", run_id=RUN, ts=2.0, access=["read"])):
        event.prev = chain.prev
        line = event.to_json()
        lines.append(line)
        chain.advance(line)
    end = LifecycleEvent(phase="seal", run_id=RUN, ts=3.0, detail=seal(chain, RUN, {"file": 1}, HOST))
    end.prev = chain.prev
    lines.append(end.to_json())
    assert check(tmp_path, lines).ok


def edit_one_char(line):
    """Change one character of a value that the tests can rely on: a digit of
    the ts (events), a digit of the signed counts (the seal)."""
    obj = json.loads(line)
    if obj.get("phase") == "seal":
        start = line.index('"counts":{') + len('"counts":{')
    else:
        start = line.index('"ts":') + len('"ts":')
    i = next(j for j in range(start, len(line)) if line[j].isdigit())
    edited = line[:i] + str((int(line[i]) + 1) % 10) + line[i + 1:]
    json.loads(edited)   # still valid JSON: the test is about the chain, not the syntax
    return edited


def first_problem(report):
    assert not report.ok and report.problems
    return report.located()[0]


# Rules (lines 1-based; the intact log has N lines, line N the seal):
#   delete line i:              first problem at line i; deleting the seal (i = N):
#                               "no seal: log ends at line N-1"
#   edit line i (i < N):        first problem at line i+1, "prev does not match line i"
#   edit the seal (i = N):      a "seal:" problem, at line N
#   swap lines i and i+1:       first problem at line i
#   copy of line i inserted after it (i = 1..N): first problem at line i+1

N_EVENTS = 6
N = N_EVENTS + 1


@pytest.mark.parametrize("i", range(1, N + 1))
def test_deleted_line_is_detected(tmp_path, i):
    lines = build_log()
    del lines[i - 1]
    report = check(tmp_path, lines)
    line, msg = first_problem(report)
    if i == N:
        assert (line, msg) == (N - 1, f"no seal: log ends at line {N - 1} "
                                      "(run still running, crashed, or truncated)")
        assert not report.sealed
    else:
        assert line == i
        above = f"line {i - 1}" if i > 1 else f"the start of the chain of run {RUN}"
        assert msg.startswith(f"prev does not match {above} {BREAK_HINT}")
        assert f"seal: says {N_EVENTS} events precede it, the log has {N_EVENTS - 1}" in " ".join(
            report.problems), "the seal's event count must also catch the dropped line"


@pytest.mark.parametrize("i", range(1, N + 1))
def test_edited_line_is_detected(tmp_path, i):
    lines = build_log()
    lines[i - 1] = edit_one_char(lines[i - 1])
    report = check(tmp_path, lines)
    line, msg = first_problem(report)
    if i == N:
        assert (line, msg) == (N, "seal: signature invalid")
    else:
        assert (line, msg) == (i + 1, f"prev does not match line {i} {BREAK_HINT}"
                               + (f"; after it: {N - i - 1} line{'s' * (N - i - 1 != 1)}, chained correctly"
                                  if i + 1 < N else ""))
    if i == N - 1:
        assert f"seal: last hash does not match line {i}" in report.problems


@pytest.mark.parametrize("i", range(1, N))
def test_swapped_lines_are_detected(tmp_path, i):
    lines = build_log()
    lines[i - 1], lines[i] = lines[i], lines[i - 1]
    line, msg = first_problem(check(tmp_path, lines))
    assert line == i and msg.startswith("prev does not match")


@pytest.mark.parametrize("i", range(1, N + 1))
def test_inserted_copy_is_detected(tmp_path, i):
    lines = build_log()
    lines.insert(i, lines[i - 1])
    line, msg = first_problem(check(tmp_path, lines))
    assert (line, msg.split(" (")[0]) == (i + 1, f"prev does not match line {i}")


def test_rewritten_chain_is_caught_by_the_signed_seal(tmp_path):
    """Whoever edits a line and recomputes every prev after it (the seal's
    prev too, which is not signed) gets an intact chain, but not the seal's
    signed last hash."""
    lines = build_log()
    objs = [json.loads(x) for x in lines]
    objs[2]["path"] = "/tmp/innocent"
    chain = Chain(RUN)
    out = []
    for obj in objs:
        obj["prev"] = chain.prev
        out.append(dumps(obj))
        chain.advance(out[-1])
    report = check(tmp_path, out)
    assert report.problems == [f"seal: last hash does not match line {N - 1}"]
    assert report.located() == [(N, f"seal: last hash does not match line {N - 1}")]


def test_log_resealed_with_another_key_is_refused(tmp_path):
    forged = build_log(key=Ed25519PrivateKey.generate())
    report = check(tmp_path, forged)
    forger = json.loads(forged[-1])["detail"]["host_key"]
    assert report.problems == [f"seal: signed by {forger}, not a trusted host key"]
    assert report.signer is None and report.sealed


def test_tampered_seal_signature(tmp_path):
    lines = build_log()
    seal_obj = json.loads(lines[-1])
    sig = bytearray(base64.b64decode(seal_obj["detail"]["signature"]))
    sig[0] ^= 0xFF
    seal_obj["detail"]["signature"] = base64.b64encode(bytes(sig)).decode()
    lines[-1] = dumps(seal_obj)
    report = check(tmp_path, lines)
    assert report.problems == ["seal: signature invalid"] and report.signer is None


def test_log_without_seal(tmp_path):
    report = check(tmp_path, build_log(sealed=False))
    assert not report.ok and not report.sealed
    assert report.problems == [f"no seal: log ends at line {N_EVENTS} "
                               "(run still running, crashed, or truncated)"]


def test_lines_appended_after_the_seal(tmp_path):
    lines = build_log()
    event = {"kind": "exec", "ts": 1.0, "run_id": RUN, "prev": hashlib.sha256(lines[-1].encode()).hexdigest()}
    report = check(tmp_path, lines + [dumps(event)])
    assert report.problems == [
        f"line {N}: a seal before the end of the log (lines were added after the run was sealed)",
        f"no seal: log ends at line {N + 1} (run still running, crashed, or truncated)"]


def test_invalid_json_line(tmp_path):
    lines = build_log()
    lines[2] = lines[2][:-1]
    report = check(tmp_path, lines)
    assert report.located()[0] == (3, f"not JSON; after it: {N - 3} lines, 1 more break (the next at line 4)")


def test_only_the_first_break_is_detailed(tmp_path):
    lines = build_log()
    lines[1] = edit_one_char(lines[1])     # breaks line 3
    lines[3] = edit_one_char(lines[3])     # breaks line 5
    report = check(tmp_path, lines)
    assert report.problems == [f"line 3: prev does not match line 2 {BREAK_HINT}; "
                               f"after it: {N - 3} lines, 1 more break (the next at line 5)"]


def test_log_of_another_run(tmp_path):
    """A sealed log copied into another run's directory fails at line 1."""
    report = check(tmp_path, build_log(), run_id="20261128-051500-000000")
    line, msg = first_problem(report)
    assert line == 1 and msg.startswith("prev does not match the start of the chain of run 20261128-051500-000000")


def test_empty_and_missing_logs(tmp_path):
    assert verify_log(write(tmp_path, []), TRUSTED).problems == ["empty log: no events"]
    report = verify_log(str(tmp_path / "nope.jsonl"), TRUSTED)
    assert not report.ok and report.problems[0].startswith("cannot read")


def test_verify_log_trusts_the_host_key_by_default(tmp_path, state_dir):
    lines = build_log(key=host_key())
    report = verify_log(write(tmp_path, lines))
    assert report.ok and report.signer == key_id(host_key())
