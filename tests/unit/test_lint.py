"""`agentwatch policy lint`: golden outputs (tests/unit/golden/lint/NAME.yaml
-> NAME.out, exact lines, linted from that directory), exit codes, --strict,
and that lint and load agree.

To review a deliberate message change: AGENTWATCH_UPDATE_GOLDEN=1 pytest
tests/unit/test_lint.py rewrites the .out files; read the diff before committing."""
import glob
import os
import platform

import pytest
from click.testing import CliRunner

from agentwatch.core.errors import PolicyError
from agentwatch.policy import check, load
from agentwatch.policy.lint import lint
from cli.policy import policy

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden", "lint")
CASES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(GOLDEN, "*.yaml")))
HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: t}\n"


def run_lint(*args):
    return CliRunner().invoke(policy, ["lint", *args], catch_exceptions=False)


def test_there_are_golden_cases():
    assert len(CASES) >= 12 and "clean" in CASES
    for case in CASES:
        assert os.path.exists(os.path.join(GOLDEN, case + ".out")), f"{case}.yaml has no {case}.out"


@pytest.mark.parametrize("case", CASES)
def test_golden_lint_output(case, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    result = run_lint(case + ".yaml")
    out_path = os.path.join(GOLDEN, case + ".out")
    if os.environ.get("AGENTWATCH_UPDATE_GOLDEN"):
        with open(out_path, "w") as f:
            f.write(result.stdout)
    with open(out_path) as f:
        expected = f.read()
    assert result.stdout == expected
    lines = expected.splitlines()
    has_error = any(": warning: " not in line for line in lines)
    assert result.exit_code == (1 if has_error else 0)
    for line in lines:                                     # FILE:LINE:COL: message, every one
        file, line_no, col, message = line.split(":", 3)
        assert file.endswith(".yaml") and line_no.isdigit() and col.isdigit() and message.startswith(" ")


def test_strict_fails_on_warnings(monkeypatch):
    monkeypatch.chdir(GOLDEN)
    assert run_lint("wx.yaml").exit_code == 0
    assert run_lint("--strict", "wx.yaml").exit_code == 1
    assert run_lint("--strict", "clean.yaml").exit_code == 0


def test_several_files_and_a_summary_on_stderr(monkeypatch):
    monkeypatch.chdir(GOLDEN)
    result = run_lint("clean.yaml", "wx.yaml", "empty.yaml")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1] == "empty.yaml:1:1: policy is empty; start from a file in policies/"
    assert result.stderr.strip() == "3 files: 1 error, 5 warnings"


def test_a_shared_base_is_reported_once(monkeypatch):
    monkeypatch.chdir(GOLDEN)
    result = run_lint("bad-globs.yaml", "extends-bad-base.yaml")
    with open("bad-globs.out") as f:
        assert result.stdout == f.read()


def test_missing_file_and_directory(tmp_path):
    result = run_lint(str(tmp_path / "nope.yaml"), str(tmp_path))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [f"{tmp_path}/nope.yaml: cannot read policy: No such file or directory",
                                          f"{tmp_path}: cannot read policy: Is a directory"]


def test_no_files_is_a_usage_error():
    assert run_lint().exit_code == 2


@pytest.mark.parametrize("case", CASES)
def test_lint_and_load_agree(case, monkeypatch):
    """load() fails exactly when lint reports an error, with the same lines."""
    monkeypatch.chdir(GOLDEN)
    result = lint([case + ".yaml"])
    errors = [str(p) for p in result.problems if p.severity == "error"]
    if errors:
        with pytest.raises(PolicyError) as e:
            load(case + ".yaml")
        assert str(e.value).splitlines() == errors
    else:
        assert load(case + ".yaml").warnings == result.problems


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="socketcall is native elsewhere")
def test_a_syscall_of_another_architecture_is_a_warning(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "syscalls: {deny: [socketcall]}\n")
    found = [str(p) for p in check(str(path))[1]]
    assert found == [f"{path}:4:19: warning: syscalls.deny: 'socketcall' does not exist on this architecture"]


def test_syscall_names_are_checked_without_libseccomp_too(tmp_path, monkeypatch):
    from agentwatch.policy import model
    monkeypatch.setattr(model, "_seccomp", lambda: None)
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "syscalls: {deny: [anything_goes]}\n")
    assert check(str(path))[1] == []                          # unchecked, not a crash
