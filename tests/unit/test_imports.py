"""Every module imports on its own in a fresh interpreter (no circular
imports), and none needs bcc: bcc is imported only when sensors are opened."""
import os
import subprocess
import sys

import pytest

from agentwatch.errors import KernelFeatureError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_BCC = "import sys; sys.modules['bcc'] = None\n"   # `import bcc` now raises ImportError


def all_modules():
    mods = []
    for pkg in ("agentwatch", "cli"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, REPO).replace(os.sep, ".")
            for f in sorted(filenames):
                if f.endswith(".py"):
                    mods.append(rel if f == "__init__.py" else f"{rel}.{f[:-3]}")
    return mods


MODULES = all_modules()


def python(code):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_module_list_is_complete():
    for m in ("agentwatch.engine", "agentwatch.sensors.syscalls", "agentwatch.runner", "cli.main"):
        assert m in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_without_bcc(module):
    p = python(NO_BCC + f"import importlib; m = importlib.import_module({module!r}); print(m.__file__)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(REPO + os.sep), "imported a copy from outside the checkout"


def test_main_modules_import_together_without_bcc():
    p = python(NO_BCC + "import agentwatch, agentwatch.runner, agentwatch.engine, agentwatch.follow, "
                        "agentwatch.sensors, agentwatch.sensors.syscalls, cli.main")
    assert p.returncode == 0, p.stderr


def test_importing_everything_does_not_load_bcc():
    imports = "; ".join(f"import {m}" for m in MODULES)
    p = python(f"import sys; {imports}; print('bcc' in sys.modules)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_cli_help_runs_without_bcc():
    p = python(NO_BCC + "import sys; sys.argv = ['agentwatch', '--help']\n"
                        "from cli.main import main; sys.exit(main())")
    assert p.returncode == 0, p.stderr
    assert "Usage:" in p.stdout


def test_missing_bcc_is_a_clear_error(monkeypatch):
    from agentwatch import sensors
    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(KernelFeatureError) as e:
        sensors.import_bcc()
    assert "python3-bpfcc" in str(e.value)
