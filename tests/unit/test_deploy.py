"""What CI can check of vagrant/ and deploy/ without booting them (nothing
here boots a VM, starts a unit or talks to a cluster): the Vagrantfile
parses and provisions with the README's set-up script, its GRUB lsm= comes
from tests/vm/lsm.conf, the systemd unit verifies, the DaemonSet has its
mounts; and scripts/setup.sh, run by someone other than root, says how to
run it and installs nothing."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAGRANT = os.path.join(REPO, "vagrant")
LSM_CONF = os.path.join(REPO, "tests", "vm", "lsm.conf")
SETUP = os.path.join(REPO, "scripts", "setup.sh")
UNIT = os.path.join(REPO, "deploy", "systemd", "agentwatch.service")
DAEMONSET = os.path.join(REPO, "deploy", "kubernetes", "daemonset.yaml")


def read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def lsm_conf(key):
    return subprocess.run(["bash", "-c", f'. "$1"; printf %s "${key}"', "_", LSM_CONF],
                          capture_output=True, text=True, check=True).stdout


def test_vagrantfile_parses():
    ruby = shutil.which("ruby")
    if not ruby:
        pytest.skip("ruby not installed (scripts/setup.sh test installs Debian's ruby)")
    out = subprocess.run([ruby, "-c", os.path.join(VAGRANT, "Vagrantfile")], capture_output=True, text=True)
    assert out.returncode == 0 and "Syntax OK" in out.stdout, out.stdout + out.stderr


def test_vagrantfile_enables_bpf_lsm_then_reboots_then_runs_the_readme_setup():
    text = read("vagrant", "Vagrantfile")
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    provisions = re.findall(r'config\.vm\.provision\s+"(\w+)",\s*type:\s*"shell",\s*path:\s*"([^"]+)"(.*)', code)
    assert [(name, path) for name, path, _ in provisions] == [("lsm", "provision-lsm.sh"), ("setup", "provision.sh")]
    assert "reboot: true" in provisions[0][2] and "reboot" not in provisions[1][2]
    assert re.search(r'config\.vm\.box = ENV\.fetch\("AGENTWATCH_VAGRANT_BOX", "bento/ubuntu-24\.04"\)', code)
    assert {"virtualbox", "libvirt"} <= set(re.findall(r'config\.vm\.provider "(\w+)"', code))
    assert re.search(r'synced_folder "\.\.", "/agentwatch"', code)
    # the README's set-up script, as the README runs it
    assert re.search(r'^bash "\$REPO/scripts/setup\.sh"$', read("vagrant", "provision.sh"), re.M)
    assert "scripts/setup.sh" in read("README.md")
    for script in ("provision-lsm.sh", "provision.sh", "test.sh"):
        assert os.access(os.path.join(VAGRANT, script), os.X_OK), script
        assert '. "$REPO/tests/vm/lsm.conf"' in read("vagrant", script), script


@pytest.mark.parametrize("running,want", [
    ("lockdown,capability,landlock,yama,apparmor", "lockdown,capability,landlock,yama,apparmor,bpf"),  # Ubuntu 24.04
    ("lockdown,capability,landlock,yama,apparmor,bpf", "lockdown,capability,landlock,yama,apparmor,bpf"),  # again
    ("lockdown,capability,apparmor", "lockdown,capability,apparmor,landlock,bpf"),   # Debian 12's default
])
def test_vagrant_grub_lsm_comes_from_the_shared_source(tmp_path, running, want):
    """provision-lsm.sh run for real against a scratch drop-in: the running
    kernel's LSMs kept, lsm.conf's required ones added."""
    lsm_file = tmp_path / "lsm"
    lsm_file.write_text(running + "\n")
    dropin = tmp_path / "grub.d" / "99-agentwatch-lsm.cfg"
    stamp = tmp_path / "updated"
    env = dict(os.environ, AGENTWATCH_GRUB_DROPIN=str(dropin), AGENTWATCH_LSM_FILE=str(lsm_file),
               AGENTWATCH_UPDATE_GRUB=f"touch {stamp}")
    subprocess.run(["bash", os.path.join(VAGRANT, "provision-lsm.sh"), REPO], env=env, check=True,
                   capture_output=True)
    assert stamp.exists()
    required = lsm_conf("AGENTWATCH_LSM_REQUIRED")
    assert want.endswith(required.split(",")[-1]) and set(required.split(",")) <= set(want.split(","))
    # what update-grub does with it: sourced after /etc/default/grub
    got = subprocess.run(["sh", "-c", 'GRUB_CMDLINE_LINUX_DEFAULT="quiet splash"; . "$1"; '
                          'printf %s "$GRUB_CMDLINE_LINUX_DEFAULT"', "_", str(dropin)],
                         capture_output=True, text=True, check=True).stdout
    assert got == f"quiet splash lsm={want}"


def test_qemu_guest_and_vagrant_read_one_lsm_source():
    runner = read("tests", "vm", "run_vm_tests.sh")
    assert '. "$ROOT/tests/vm/lsm.conf"' in runner
    assert "lsm=lockdown" not in runner and "landlock,bpf" not in runner
    assert '"lsm=$(lsm_list "$AGENTWATCH_LSM_VM_BASE" "$AGENTWATCH_LSM_REQUIRED")"' in runner
    got = subprocess.run(["bash", "-c", '. scripts/lib.sh; . tests/vm/lsm.conf; '
                          'lsm_list "$AGENTWATCH_LSM_VM_BASE" "$AGENTWATCH_LSM_REQUIRED"'],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert got == "lockdown,capability,landlock,bpf\n"     # what tests/vm always booted
    assert "lsm.conf" in read("tests", "vm", "test_lsm_vm.py")
    for path in lsm_conf("AGENTWATCH_LSM_LAYER_TESTS").split() + lsm_conf("AGENTWATCH_LSM_PATH_TESTS").split():
        assert os.path.exists(os.path.join(REPO, path)), path


def test_adversarial_suite_expects_bpf_lsm_where_the_kernel_was_booted_for_it(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tests", "adversarial"))
    try:
        from advkit import bpf_lsm_expected
    finally:
        sys.path.pop(0)
    cmdline = tmp_path / "cmdline"
    cases = [("BOOT_IMAGE=/vmlinuz root=/dev/sda1 lsm=lockdown,capability,landlock,yama,apparmor,bpf", {}, True),
             ("root=/dev/sda1 lsm=landlock,bpf lsm=landlock,apparmor", {}, False),     # the last lsm= counts
             ("root=/dev/sda1 quiet", {}, False),
             ("root=/dev/sda1 quiet", {"AGENTWATCH_EXPECT_BPF_LSM": "1"}, True),
             ("root=/dev/sda1 quiet", {"AGENTWATCH_VM_GUEST": "1"}, True),
             ("root=/dev/sda1 lsm=bpf", {"AGENTWATCH_EXPECT_BPF_LSM": "0"}, False)]
    for text, environ, want in cases:
        cmdline.write_text(text + "\n")
        assert bool(bpf_lsm_expected(environ, str(cmdline))) == want, (text, environ)
    assert bpf_lsm_expected({}, str(tmp_path / "none")) is None


def test_systemd_unit_verifies():
    text = read("deploy", "systemd", "agentwatch.service")
    assert re.search(r"^ExecStart=/opt/agentwatch/\.venv/bin/agentwatch daemon run$", text, re.M)
    for line in ("Restart=on-failure", "KillMode=mixed", "After=local-fs.target"):
        assert re.search(f"^{line}$", text, re.M), line
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze not installed (Debian systemd)")
    # verify checks that ExecStart's program exists: this checkout's venv
    # stands in for /opt/agentwatch/.venv
    exe = os.path.join(os.path.dirname(sys.executable), "agentwatch")
    if not os.access(exe, os.X_OK):
        pytest.skip(f"{exe} not installed (scripts/setup.sh installs it)")
    unit = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"agentwatch-verify-{os.getpid()}.service")
    with open(unit, "w") as f:
        f.write(text.replace("/opt/agentwatch/.venv/bin/agentwatch", exe))
    try:
        out = subprocess.run([tool, "verify", unit], capture_output=True, text=True)
    finally:
        os.unlink(unit)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_daemonset_parses_and_mounts_what_the_daemon_needs():
    with open(DAEMONSET) as f:
        ds = yaml.safe_load(f)
    assert ds["kind"] == "DaemonSet"
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    assert c["command"][-2:] == ["daemon", "run"]
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    mounted = {host[m["name"]]: m["mountPath"] for m in c["volumeMounts"]}
    for path in ("/sys/fs/bpf", "/sys/fs/cgroup", "/sys/kernel/tracing", "/sys/kernel/debug",
                 "/lib/modules", "/usr/src", "/var/lib/agentwatch"):
        assert mounted.get(path) == path, path
    assert "UNTESTED" in read("deploy", "kubernetes", "daemonset.yaml")


@pytest.mark.parametrize("with_sudo", [False, True])
def test_setup_as_another_user_says_how_and_installs_nothing(with_sudo):
    """setup.sh run by nobody: exit 1 with the way to run it (sudo only
    where there is one), no package tool called."""
    # not pytest's tmp_path: under root that is in a directory nobody cannot enter
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        _setup_as_nobody(pathlib.Path(d), with_sudo)


def _setup_as_nobody(tmp_path, with_sudo):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls"
    for tool in ("dirname", "id", "tr", "cat"):
        os.symlink(shutil.which(tool), bin_ / tool)
    for tool in ["apt-get", "dpkg", "dpkg-query", "apt-cache", "mount", "pip"] + (["sudo"] if with_sudo else []):
        (bin_ / tool).write_text(f"#!/bin/sh\necho {tool} >>{calls}\nexit 0\n")
        (bin_ / tool).chmod(0o755)
    calls.touch()
    calls.chmod(0o666)
    cmd = [shutil.which("bash"), SETUP, "test"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if not setpriv:
            pytest.skip("setpriv not installed (Debian util-linux): cannot drop root")
        cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    out = subprocess.run(cmd, env={"PATH": str(bin_), "HOME": str(tmp_path)}, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "setup: error: run as root" in out.stderr
    if with_sudo:
        assert f"sudo {SETUP} test" in out.stderr
    else:
        assert "sudo" not in out.stderr.replace("there is no sudo here", "")
        assert f"su -c '{SETUP} test'" in out.stderr
    assert calls.read_text() == ""


def test_readme_two_commands_read_right_as_root_and_not():
    section = read("README.md").split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^scripts/setup\.sh demo", section, re.M)
    assert re.search(r"^scripts/setup\.sh test", section, re.M)
    assert "sudo scripts/setup.sh" in section and "su -c" in section
