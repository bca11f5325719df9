"""cli/keys.py: key generate, policy sign/verify, log verify through click.

Commands are invoked directly with CliRunner (they are attached to the main
group in cli/main.py); AGENTWATCH_STATE_DIR points at a temporary directory
(the `state_dir` fixture), so nothing needs root.
"""
import json
import os
import re
import shutil
import stat

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentwatch import integrity
from agentwatch.core import state
from agentwatch.integrity import Chain, IntegrityError, key_id, seal
from cli.keys import key_group, log_group, policy_sign, policy_verify

RUN = "20261128-051500-3f9a1c"


def invoke(cmd, *args):
    return CliRunner().invoke(cmd, [str(a) for a in args])


def generate(*args):
    result = invoke(key_group, "generate", *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout.strip()


# ---- key generate ----------------------------------------------------------------

def test_key_generate_defaults_to_the_state_dir(state_dir):
    result = invoke(key_group, "generate")
    assert result.exit_code == 0, result.output
    kid = result.stdout.strip()
    assert re.fullmatch(r"ed25519:[0-9a-f]{16}", kid)
    key_path = state_dir / "keys" / "signing.key"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert key_id(integrity.load_public_key(str(state_dir / "keys" / "signing.pub"))) == kid
    assert "signing.pub" in result.stderr


def test_key_generate_refuses_to_overwrite(state_dir, tmp_path):
    kid = generate("--name", "ci", "--dir", tmp_path / "k")
    result = invoke(key_group, "generate", "--name", "ci", "--dir", tmp_path / "k")
    assert result.exit_code == 1
    assert isinstance(result.exception, IntegrityError) and "already exists" in str(result.exception)
    assert generate("--name", "ci", "--dir", tmp_path / "k", "--force") != kid


# ---- policy sign / verify -----------------------------------------------------------

@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("kind: AgentPolicy\nmetadata:\n  name: strict\n")
    return path


def test_sign_and_verify(state_dir, policy):
    kid = generate()
    pub = state_dir / "keys" / "signing.pub"
    result = invoke(policy_sign, policy)                      # default key: keys/signing.key
    assert result.exit_code == 0 and result.stdout == f"{policy}.sig: signed by {kid}\n"

    result = invoke(policy_verify, policy)                    # not trusted yet
    assert (result.exit_code, result.stdout) == (1, f"{policy}: signed by {kid} which is not trusted\n")

    result = invoke(policy_verify, policy, "--trust", pub)
    assert (result.exit_code, result.stdout) == (0, f"{policy}: signed by {kid} (trusted)\n")

    os.makedirs(state_dir / "keys" / "trusted")
    shutil.copy(pub, state_dir / "keys" / "trusted" / "team.pub")
    assert invoke(policy_verify, policy).exit_code == 0

    result = invoke(policy_verify, policy, "--signer", "ed25519:0000000000000000")
    assert result.exit_code == 1
    assert result.stdout == f"{policy}: signed by {kid} but the policy requires ed25519:0000000000000000\n"


def test_verify_changed_and_unsigned_files(state_dir, policy, tmp_path):
    generate("--dir", tmp_path / "k")
    assert invoke(policy_sign, policy, "--key", tmp_path / "k" / "signing.key").exit_code == 0
    policy.write_text(policy.read_text().replace("strict", "strikt"))
    unsigned = tmp_path / "prompt.md"
    unsigned.write_text("hello\n")
    result = invoke(policy_verify, policy, unsigned, "--trust", tmp_path / "k" / "signing.pub")
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{policy}: signature does not match the file (file changed after signing)",
        f"{unsigned}: no signature file {unsigned}.sig"]


def test_sign_with_a_missing_key_is_a_clear_error(state_dir, policy):
    result = invoke(policy_sign, policy, "--key", state_dir / "nope.key")
    assert result.exit_code == 1 and isinstance(result.exception, IntegrityError)
    assert "nope.key" in str(result.exception)
    assert not os.path.exists(f"{policy}.sig")


# ---- log verify ----------------------------------------------------------------------

def write_run(run_id, key, n_events=4):
    """A finished run in the state directory, its log chained and sealed as the runner does."""
    os.makedirs(state.run_path(run_id))
    state.write_json_atomic(state.run_path(run_id, "run.json"),
                            {"run_id": run_id, "agent": "coder", "status": "exited"})
    chain = Chain(run_id)
    path = state.run_path(run_id, "events.jsonl")
    with open(path, "w") as f:
        for i in range(n_events + 1):
            event = {"kind": "exec", "ts": 100.0 + i, "run_id": run_id, "pid": 10 + i}
            if i == n_events:
                event.update(kind="lifecycle", phase="seal", detail=seal(chain, run_id, {"exec": i}, key))
            event["prev"] = chain.prev
            line = json.dumps(event, separators=(",", ":"))
            f.write(line + "\n")
            chain.advance(line)
    return path


def test_log_verify_by_run_id_prefix_trusts_the_host_key(state_dir):
    write_run(RUN, integrity.host_key())
    result = invoke(log_group, "verify", RUN[:10])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"OK: 5 events, chain intact, sealed by {key_id(integrity.host_key())}\n"


def test_log_verify_reports_file_and_line(state_dir):
    path = write_run(RUN, integrity.host_key())
    lines = open(path).read().splitlines(keepends=True)
    del lines[1]                                         # drop line 2
    open(path, "w").write("".join(lines))
    result = invoke(log_group, "verify", RUN)
    assert result.exit_code == 1
    out = result.stdout.splitlines()
    assert out[0].startswith(f"{path}:2: prev does not match line 1 (a line was edited")
    assert out[1] == f"{path}:4: seal: says 4 events precede it, the log has 3 (lines were dropped or inserted)"


def test_log_verify_truncated_log(state_dir):
    path = write_run(RUN, integrity.host_key())
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").write("".join(lines[:-1]))
    result = invoke(log_group, "verify", path)                  # a file path works too
    assert (result.exit_code, result.stdout) == (
        1, f"{path}:4: no seal: log ends at line 4 (run still running, crashed, or truncated)\n")


def test_log_verify_other_host_needs_trust(state_dir, tmp_path):
    other = Ed25519PrivateKey.generate()
    path = write_run(RUN, other)
    result = invoke(log_group, "verify", RUN)
    assert result.exit_code == 1
    assert result.stdout == f"{path}:5: seal: signed by {key_id(other)}, not a trusted host key\n"
    pub = tmp_path / "other.pub"
    pub.write_bytes(integrity._public_pem(other))
    assert invoke(log_group, "verify", RUN, "--trust", pub).exit_code == 0


def test_log_verify_unknown_run(state_dir):
    result = invoke(log_group, "verify", "nosuchrun")
    assert result.exit_code == 1 and isinstance(result.exception, IntegrityError)
    assert "no single run" in str(result.exception)


# ---- wiring in cli/main.py -------------------------------------------------------------

def test_commands_through_the_main_entry_point(state_dir, policy, capsys):
    from cli.main import main
    assert main(["key", "generate"]) == 0
    kid = capsys.readouterr().out.strip()
    assert main(["policy", "sign", str(policy)]) == 0
    assert main(["policy", "verify", str(policy), "--trust", str(state_dir / "keys" / "signing.pub")]) == 0
    assert capsys.readouterr().out.endswith(f"{policy}: signed by {kid} (trusted)\n")
    assert main(["key", "generate"]) == 1
    assert "agentwatch: error: " in capsys.readouterr().err
    write_run(RUN, integrity.host_key())
    assert main(["log", "verify", RUN]) == 0
    assert main(["log", "verify", "nosuchrun"]) == 1
