"""process.run_as on the real kernel (issue #4): the agent runs as the
policy's user with no capabilities at all while agentwatch stays root; a
failing step names itself and starts nothing; and a non-root agent's chmod
outside its write paths, which Landlock cannot refuse, is refused by the
kernel (DAC: not the owner, EPERM) and reported with action deny.

Users are numeric ids: 65534 (the shipped nonroot policy) and a fresh uid
with no passwd entry, so nothing is added to the host's databases. Test
directories live in a world-searchable directory under /tmp (pytest's own
are 0700, which no other uid can cross) and are removed afterwards."""
import grp
import os
import pwd
import shutil
import stat
import tempfile

import pytest

from agentwatch.sandbox.cgroups import leftover_cgroups
from conftest import REPO, aw, free_id, read_events

pytestmark = pytest.mark.kernel
NONROOT = os.path.join(REPO, "policies", "sandboxed-agent-nonroot.yaml")
NOBODY = 65534


@pytest.fixture
def box():
    """root/{ws,home,outside,tmp}: root is world-searchable; ws belongs to
    NOBODY; outside/config is root's, 0600, outside every allow list."""
    root = tempfile.mkdtemp(prefix="aw-runas-", dir="/tmp")
    try:
        os.chmod(root, 0o755)
        dirs = {d: os.path.join(root, d) for d in ("ws", "home", "outside", "tmp")}
        for d in dirs.values():
            os.mkdir(d)
            os.chmod(d, 0o755)
        os.chown(dirs["ws"], NOBODY, NOBODY)
        os.chmod(dirs["tmp"], 0o1777)          # TMPDIR: not /tmp, whose tree the policies may write
        config = os.path.join(dirs["outside"], "config")
        with open(config, "w") as f:
            f.write("setting = 1\n")
        os.chmod(config, 0o600)
        dirs.update(root=root, config=config, state=os.path.join(root, "state"))
        os.mkdir(dirs["state"])
        yield dirs
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(box, policy, script, ws=None):
    ws = ws or box["ws"]
    agent = os.path.join(ws, "agent.sh")
    with open(agent, "w") as f:
        f.write(script)
    os.chmod(agent, 0o644)
    events = os.path.join(box["root"], "events.jsonl")
    r = aw("run", "--policy", policy, "--workspace", ws, "--allow-downgrade", "--events", events,
           "--", "/bin/sh", agent, cwd=ws,
           env={"HOME": box["home"], "TMPDIR": box["tmp"], "OUTSIDE": box["outside"],
                "AGENTWATCH_STATE_DIR": box["state"]})
    return r, (read_events(events) if os.path.exists(events) else [])


def lines_after(out, tag):
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(tag + " ")]


def start_of(events):
    return next(e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start")


def test_nonroot_policy_runs_the_agent_as_65534_without_capabilities(box):
    script = """
echo "UID $(id -u)"; echo "GID $(id -g)"; echo "GROUPS $(id -G)"
grep -E '^(Cap|NoNewPrivs)' /proc/self/status | sed 's/^/STATUS /'
echo ok > "$PWD/written" && echo "WROTE yes"
chmod 0666 "$OUTSIDE/config" 2>/dev/null; echo "CHMOD $?"
touch -d @0 "$OUTSIDE/config" 2>/dev/null; echo "UTIME $?"
"""
    r, events = run(box, NONROOT, script)
    assert r.returncode == 0, r.stderr
    assert lines_after(r.stdout, "UID") == ["65534"] and lines_after(r.stdout, "GID") == ["65534"]
    assert lines_after(r.stdout, "GROUPS") == ["65534"]          # no supplementary groups
    status = dict(line.split(":\t") for line in lines_after(r.stdout, "STATUS"))
    assert status == {"CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16,
                      "CapBnd": "0" * 16, "CapAmb": "0" * 16, "NoNewPrivs": "1"}
    assert lines_after(r.stdout, "WROTE") == ["yes"]
    assert os.stat(os.path.join(box["ws"], "written")).st_uid == NOBODY
    # not the owner: the kernel refuses (Landlock has no right for these)
    assert lines_after(r.stdout, "CHMOD") == ["1"] and lines_after(r.stdout, "UTIME") == ["1"]
    st = os.stat(box["config"])
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime > 0
    v = [e for e in events if e["kind"] == "violation" and e["rule"] == "filesystem.write"
         and e["detail"].get("op") == "chmod" and e["detail"].get("path") == box["config"]]
    assert v, r.stderr
    assert v[0]["action"] == "deny" and v[0]["detail"]["kernel"] == "denied (EPERM)"
    assert v[0]["uid"] == NOBODY
    # the run identity: the agent's credentials; agentwatch itself is root
    start = start_of(events)
    assert start["uid"] == 0 and start["detail"]["uid"] == 0
    creds = start["detail"]["agent_credentials"]
    assert creds == {"uid": NOBODY, "gid": NOBODY, "groups": [], "user": pwd.getpwuid(NOBODY).pw_name,
                     "source": "process.run_as", "no_new_privs": True,
                     "capabilities": dict.fromkeys(("inheritable", "permitted", "effective",
                                                    "bounding", "ambient"), "0" * 16)}
    assert {e["uid"] for e in events if e["kind"] == "exec"} == {NOBODY}
    assert "agent runs as nobody (uid 65534), gid 65534" in r.stderr


def test_fresh_uid_with_groups_and_no_sandbox_layer(box, tmp_path):
    """A uid with no passwd entry, supplementary groups, and a policy whose
    sections are only judged (no Landlock, no seccomp): run_as alone still
    sets no_new_privs and empties every capability set."""
    uid, gid = free_id(pwd.getpwuid), free_id(grp.getgrgid)
    os.chown(box["ws"], uid, gid)
    policy = os.path.join(box["root"], "p.yaml")
    with open(policy, "w") as f:
        f.write("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: fresh}\n"
                f"process:\n  run_as: {{user: {uid}, group: {gid}, groups: [{gid}, 0]}}\n")
    script = """
echo "UID $(id -u)"; echo "GID $(id -g)"; echo "GROUPS $(id -G)"
grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs)' /proc/self/status | sed 's/^/STATUS /'
cat /proc/1/environ >/dev/null 2>&1; echo "ENVIRON1 $?"
"""
    r, events = run(box, policy, script)
    assert r.returncode == 0, r.stderr
    assert lines_after(r.stdout, "UID") == [str(uid)] and lines_after(r.stdout, "GID") == [str(gid)]
    assert sorted(lines_after(r.stdout, "GROUPS")[0].split()) == sorted([str(gid), "0"])
    status = dict(line.split(":\t") for line in lines_after(r.stdout, "STATUS"))
    assert status == {"CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16, "NoNewPrivs": "1"}
    assert lines_after(r.stdout, "ENVIRON1") == ["1"]       # root's /proc entries: not ours
    creds = start_of(events)["detail"]["agent_credentials"]
    assert (creds["uid"], creds["gid"], creds["groups"], creds["user"]) == (uid, gid, [0, gid], None)
    assert start_of(events)["detail"]["enforcement"]["path"] == "monitor-only"


def _our_runs(state):
    runs = os.path.join(state, "runs")
    return os.listdir(runs) if os.path.isdir(runs) else []


def test_unusable_workspace_names_the_step_and_starts_nothing(box):
    ws = os.path.join(box["root"], "rootws")       # root's, 0755: not writable by 65534
    os.mkdir(ws)
    os.chmod(ws, 0o755)
    r, events = run(box, NONROOT, f"echo started > /tmp/aw-runas-started-{os.getpid()}\n", ws=ws)
    assert r.returncode == 126
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"agentwatch: error: agent did not start: check workspace is usable by uid 65534 "
                    f"failed: [Errno 13] workspace {ws} is not usable by nobody (uid 65534), gid 65534, "
                    f"supplementary groups: none (needs rwx); chown it or pick a workspace the user owns")
    assert not os.path.exists(f"/tmp/aw-runas-started-{os.getpid()}")
    assert not [e for e in events if e["kind"] == "exec"]
    runs = _our_runs(box["state"])
    assert len(runs) == 1 and set(runs) & set(leftover_cgroups()) == set()
    with open(os.path.join(box["state"], "runs", runs[0], "run.json")) as f:
        assert '"status": "failed"' in f.read().replace('":"', '": "')


def test_unknown_user_is_refused_before_anything_is_created(box):
    policy = os.path.join(box["root"], "p.yaml")
    with open(policy, "w") as f:
        f.write("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: ghost}\n"
                "process:\n  run_as: {user: no-such-user-aw}\n")
    r, events = run(box, policy, "echo started\n")
    assert r.returncode != 0 and "started" not in r.stdout
    assert r.stderr.strip().splitlines() == [
        "agentwatch: error: agent did not start: resolve process.run_as failed: no user "
        f"'no-such-user-aw' on this host ({policy}:5:11)"]
    assert events == [] and _our_runs(box["state"]) == []
