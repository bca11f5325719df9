"""Where runs live on disk, and the records that describe them.

    $AGENTWATCH_STATE_DIR (default /var/lib/agentwatch)/
      runs/<run_id>/run.json      identity + status, rewritten as the run changes
      runs/<run_id>/events.jsonl  every event of the run, one JSON object a line
      runs/<run_id>/stats.json    live counters (events, drops, pids), refreshed every second

The live stream that ``agentwatch tail`` follows is these files: a run
appends and flushes its log as events arrive, tail reads what is new.
"""
import json
import os
import secrets
import threading
import time

DEFAULT_STATE_DIR = "/var/lib/agentwatch"


def state_dir():
    return os.environ.get("AGENTWATCH_STATE_DIR", DEFAULT_STATE_DIR)


def runs_dir():
    return os.path.join(state_dir(), "runs")


def new_run_id():
    """Sortable by start time, unique: 20261128-051500-3f9a1c."""
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def run_path(run_id, name=""):
    return os.path.join(runs_dir(), run_id, name)


def write_json_atomic(path, data):
    # the temporary name is the writer's own: the daemon's runs are threads of one pid
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def process_start_time(pid):
    """Kernel start time of a pid (clock ticks since boot), or None if gone.
    Together with the pid it names one process, whatever pids get reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_alive(record):
    """True while the agentwatch process that owns a run still exists."""
    owner = record.get("owner") or {}
    pid, start = owner.get("pid"), owner.get("start_time")
    return bool(pid) and process_start_time(pid) == start


# Machine-wide (whatever AGENTWATCH_STATE_DIR a run uses): who owns each run
# cgroup, so a sweep never touches a live run of another agentwatch.
OWNERS_DIR = "/run/agentwatch/owners"


def owner_path(run_id):
    return os.path.join(OWNERS_DIR, f"{run_id}.json")


def register_owner(run_id):
    os.makedirs(OWNERS_DIR, mode=0o700, exist_ok=True)
    write_json_atomic(owner_path(run_id),
                      {"pid": os.getpid(), "start_time": process_start_time(os.getpid()),
                       "state_dir": state_dir()})


def unregister_owner(run_id):
    try:
        os.unlink(owner_path(run_id))
    except FileNotFoundError:
        pass


def run_owner_alive(run_id):
    """True while the agentwatch that created run_id's cgroup lives."""
    owner = read_json(owner_path(run_id))
    return bool(owner) and owner_alive({"owner": owner})


def list_runs():
    """Every run record on disk, oldest first, with its live status:
    status is 'running' only while its owner lives; a 'running' record whose
    owner is gone reads as 'crashed'."""
    try:
        names = sorted(os.listdir(runs_dir()))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        rec = read_json(run_path(name, "run.json"))
        if not rec:
            continue
        if rec.get("status") == "running" and not owner_alive(rec):
            rec["status"] = "crashed"
        out.append(rec)
    return out


def find_run(run_id):
    """A run by id or unique id prefix; None when there is none."""
    matches = [r for r in list_runs() if r["run_id"].startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    exact = [r for r in matches if r["run_id"] == run_id]
    return exact[0] if exact else None
