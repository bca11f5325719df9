"""The preparation of a run, before anything is created: check the input
(command, policy), load the policy, check its signature and the prompt's,
compile it, make the enforcement plan, and the pieces of the run's
identity. Pure: it creates no cgroup, loads no BPF program, writes no
file, and changes nothing it is given (not even the options); it runs
without root when asked to (prepare(opts, root=False)), so the whole path
from options to plan is testable as an ordinary user. A bad input ends in
an AgentwatchError, never a traceback."""
import fnmatch
import getpass
import hashlib
import os
import platform
import socket
import time
from dataclasses import dataclass

from .. import integrity
from ..core.errors import KernelFeatureError, PolicyError, PrivilegeError, UsageError
from ..policy import load as load_policy
from ..policy.model import SENSOR_GROUPS
from ..sandbox import launcher


def policy_variables(workspace=None, env=None):
    """${WORKSPACE}, ${HOME}, ${TMPDIR} for a run (HOME of the invoking user:
    env, the environment the agent gets, else ours)."""
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    return {"WORKSPACE": os.path.abspath(workspace or os.getcwd()), "HOME": home,
            "TMPDIR": env.get("TMPDIR") or "/tmp"}


def need_root():
    if os.geteuid() != 0:
        raise PrivilegeError("agentwatch run needs root (it creates cgroups and loads BPF "
                             "programs: CAP_SYS_ADMIN, CAP_BPF, CAP_PERFMON); run it with sudo")


@dataclass
class Prepared:
    """What a run knows before it creates anything: the options it was
    given, the command, the agent's name, the policy and what was made of
    it (compiled rules, enforcement plan, process.run_as), who signed what,
    and the sensor groups and EPERM syscalls its monitor needs."""
    opts: object                       # core.options.RunOptions, as given
    command: str                       # the resolved executable
    agent: str
    variables: dict
    sensor_groups: list
    seccomp_denied: list               # syscalls the plan's seccomp filter refuses with EPERM
    policy: object = None              # policy.Policy, or None (monitor only)
    compiled: object = None            # policy.compile.CompiledPolicy
    plan: object = None                # sandbox.plan.EnforcementPlan
    run_as: object = None              # sandbox.credentials.Credentials from process.run_as
    signer: object = None
    prompt_signer: object = None
    prompt_digest: str = None
    pins: dict = None                  # --resolve: {name: [addresses]}
    service_ports: tuple = ()          # the monitor's services' loopback ports (run/services.py)

    # -- what the plan says ---------------------------------------------------------
    @property
    def pid_ns(self):
        """Whether the agent gets a PID namespace of its own (under the run's init)."""
        return bool(self.plan and "pid" in self.plan.namespaces)

    @property
    def no_new_privs(self):
        """Whether the child sets no_new_privs (and so drops every capability)."""
        return self.run_as is not None or bool(self.plan and (self.plan.landlock or self.plan.seccomp))

    def map_exec_roots(self, attached):
        """The plan's mmap(PROT_EXEC) roots, when the run's sensors have the
        programs attached (attached; a shared monitor may not: the plan then
        notes that the loader's argv alone is judged)."""
        roots = self.plan.map_exec if self.plan else None
        if roots is not None and not attached:
            self.plan.notes.append("filesystem.exec: the shared monitor has no mmap(PROT_EXEC) "
                                   "probe attached; the dynamic loader's argv is judged from userspace")
            return None
        return roots

    def watched_files(self):
        """(rule, path) of the run's identity files, written to only as a violation."""
        if not self.compiled:
            return []
        watched = [("identity.policy_write", self.policy.path)]
        if self.opts.prompt_path:
            watched.append(("identity.prompt_write", os.path.abspath(self.opts.prompt_path)))
        return watched

    # -- identity -------------------------------------------------------------------
    def agent_credentials(self):
        """Who the agent runs as and with which capabilities: the policy's
        process.run_as, else agentwatch's own ids. The child checks both in
        /proc/self/status right before exec and does not start otherwise."""
        from ..sandbox import credentials
        creds = self.run_as or credentials.inherited()
        nnp = self.no_new_privs
        caps = (credentials.no_capabilities() if nnp
                else credentials.capability_record(credentials.read_status()))
        return {"uid": creds.uid, "gid": creds.gid, "groups": creds.groups, "user": creds.user,
                "source": creds.source, "no_new_privs": nnp, "capabilities": caps}

    def identity(self, run_id):
        """The run's identity record as it starts (the run adds its cgroup,
        sensors and root pid once they exist)."""
        uid = os.getuid()
        try:
            user = getpass.getuser()
        except Exception:
            user = str(uid)
        p, o = self.policy, self.opts
        return {
            "run_id": run_id, "agent": self.agent,
            "policy": p.path if p else None, "policy_name": p.name if p else None,
            "policy_digest": p.digest if p else None, "signer": self.signer,
            "prompt": os.path.abspath(o.prompt_path) if o.prompt_path else None,
            "prompt_digest": self.prompt_digest, "prompt_signer": self.prompt_signer,
            "variables": self.variables,
            "start_time": time.time(), "uid": uid, "user": user,
            "host": socket.gethostname(), "kernel": platform.release(),
            "command": o.argv, "executable": self.command,
            "cwd": o.cwd or os.getcwd(),
            "enforcement": self.plan.record() if self.plan else {"path": "monitor-only"},
            "agent_credentials": self.agent_credentials(),
            "client": o.client,
        }


def prepare(opts, root=True, service_ports=()):
    """Check opts (core.options.RunOptions) and prepare the run: a Prepared.
    root: refuse without root where a run needs it (PrivilegeError), at the
    same points as ever, so that a bad command line or policy is told first;
    False prepares as any user (tests, a dry run), changing nothing else.
    service_ports: the loopback ports of the monitor's services
    (run/services.py), which the agent may reach."""
    o = opts
    if not o.argv:
        raise UsageError("no command given: agentwatch run [OPTIONS] -- CMD [ARG...]")
    check_ranges(o)
    if o.policy_path and o.require_signed:
        # a tampered file is refused as tampered, before its content is even parsed
        if root:
            need_root()
        integrity.check_signed(o.policy_path, True, None, integrity.trusted_keys(o.trust))
    policy = load_policy(o.policy_path) if o.policy_path else None
    if root:
        need_root()
    trusted = integrity.trusted_keys(o.trust)
    agent = (o.name or (policy.agent_name if policy else "") or os.path.basename(o.argv[0]))
    p = Prepared(opts=o, command=launcher.resolve_command(o.argv, o.env), agent=agent,
                 variables=policy_variables(o.workspace or o.cwd, o.env),
                 sensor_groups=list(SENSOR_GROUPS) if o.sensors is None else list(o.sensors),
                 seccomp_denied=list(o.seccomp_denied or ()), policy=policy,
                 pins=parse_pins(o.resolve), service_ports=tuple(service_ports))
    if policy:
        _prepare_policy(p, trusted)
    elif o.require_signed:
        raise PolicyError("--require-signed needs --policy FILE (a signed policy)")
    if o.prompt_path:
        try:
            with open(o.prompt_path, "rb") as f:
                p.prompt_digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            raise UsageError(f"--prompt {o.prompt_path}: cannot read: {e.strerror}") from None
        p.prompt_signer = integrity.check_signed(o.prompt_path, o.require_signed, None, trusted)
    return p


def _prepare_policy(p, trusted):
    """Identity and signature checks, compile, plan, run_as: into p."""
    o, policy = p.opts, p.policy
    ident = policy.data.get("identity") or {}
    pattern = ident.get("name")
    if pattern and not fnmatch.fnmatchcase(p.agent, pattern):
        raise PolicyError(f"{policy.path}: agent name {p.agent!r} does not match "
                          f"identity.name {pattern!r}; pass --name")
    p.signer = integrity.check_signed(policy.path, o.require_signed, ident.get("required_signer"),
                                      trusted)
    from ..policy.compile import compile_policy
    from ..sandbox.plan import make_plan
    p.compiled = compile_policy(policy, p.variables)
    p.sensor_groups = p.compiled.sensor_groups()
    protected = [policy.path] + ([os.path.abspath(o.prompt_path)] if o.prompt_path else [])
    p.plan = make_plan(policy.data, p.variables, protected,
                       bpf_lsm=bpf_lsm_wanted(o.bpf_lsm), ttys=ttys(o.stdio), pins=p.pins,
                       service_ports=p.service_ports)
    run_as = policy.spec.process and policy.spec.process.run_as
    if run_as is not None:
        from ..sandbox import credentials
        p.run_as = credentials.resolve(run_as, str(run_as.loc))
    if p.plan.seccomp is not None:
        from ..sandbox.seccomp_filter import errno_denied
        p.seccomp_denied = errno_denied(p.plan.seccomp)
    if p.plan.downgrades and not o.allow_downgrade:
        raise PolicyError(
            f"{policy.path}: this kernel cannot enforce every rule:\n  "
            + "\n  ".join(p.plan.downgrades)
            + "\nrun with --allow-downgrade to accept this (each rule is then recorded "
              "in the run identity), or relax the policy")


def check_ranges(o):
    """Number options with a range (core/options.py metadata): the API and
    the daemon's clients get the command line's refusal."""
    import dataclasses
    for f in dataclasses.fields(o):
        bounds = f.metadata.get("range")
        value = getattr(o, f.name)
        if bounds is None or value is None:
            continue
        lo, hi = bounds
        kinds, what = ((int, float), "a number") if f.type is float else (int, "an integer")
        if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
            raise UsageError(f"{f.metadata['flag']} {value!r}: expected {what} from {lo} to {hi}")


def parse_pins(items):
    """--resolve NAME:ADDR items -> {name: [address, ...]} (a name given
    twice gets both). IPv6 addresses may be bracketed: name:[::1]."""
    import ipaddress
    from ..policy.matchers import check_domain
    pins = {}
    for item in items or ():
        name, sep, addr = str(item).partition(":")
        addr = addr.strip()
        if addr.startswith("[") and addr.endswith("]"):
            addr = addr[1:-1]
        name = name.strip().lower().rstrip(".")
        err = check_domain(name) if name and sep else "expected NAME:ADDR"
        if err is None and name.startswith("*."):
            err = "a name, not a wildcard"
        try:
            addr = str(ipaddress.ip_address(addr))
        except ValueError:
            err = err or f"{addr!r} is not an IPv4 or IPv6 address"
        if err:
            raise UsageError(f"--resolve {item}: {err} (e.g. --resolve pypi.org:151.101.0.223)")
        pins.setdefault(name, [])
        if addr not in pins[name]:
            pins[name].append(addr)
    return pins


def bpf_lsm_wanted(mode):
    """Whether the plan gets the BPF LSM layer (mode: --bpf-lsm): "auto"
    where the host can load it (BPF LSM active, root, headers of exactly
    this kernel)."""
    if mode == "off":
        return False
    from ..guards.lsm import LsmGuard
    why = LsmGuard.unavailable()
    if why and mode == "on":
        raise KernelFeatureError(f"--bpf-lsm on: {why}")
    return why is None


def ttys(stdio):
    """The terminal devices on the agent's stdin, stdout and stderr (stdio: its fds)."""
    out = []
    for fd in stdio or (0, 1, 2):
        try:
            name = os.ttyname(fd)
        except OSError:
            continue
        if name.startswith("/dev/") and name not in out:
            out.append(name)
    return out
