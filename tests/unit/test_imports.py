"""Every module imports on its own in a fresh interpreter (no circular
imports), and none needs bcc: bcc is imported only when sensors are opened,
and only by sensors/ (and guards/). Imports point down the layer table
(LAYERS below): cli -> api -> harness/daemon -> run -> integrity -> engine ->
sandbox/guards/sensors -> policy -> core."""
import ast
import os
import subprocess
import sys

import pytest

from agentwatch.core.errors import KernelFeatureError

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
    for m in ("agentwatch.engine", "agentwatch.sensors.syscalls", "agentwatch.guards.egress",
              "agentwatch.guards.lsm", "agentwatch.run", "cli.main"):
        assert m in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_without_bcc(module):
    p = python(NO_BCC + f"import importlib; m = importlib.import_module({module!r}); print(m.__file__)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(REPO + os.sep), "imported a copy from outside the checkout"


def test_main_modules_import_together_without_bcc():
    p = python(NO_BCC + "import agentwatch, agentwatch.run, agentwatch.engine, agentwatch.follow, "
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


# ---------------------------------------------------------------- the layer table

# From the top down: a module may import its own layer and the layers below
# it, never one above (README "Architecture"; issue #15). Each layer lists
# the module prefixes it holds today; the longest prefix wins.
LAYERS = [
    ("cli", ["cli"]),
    # doctor: the `agentwatch doctor` probes; the target puts them behind api.py
    ("api", ["agentwatch.api", "agentwatch.doctor"]),
    ("harness/daemon", ["agentwatch.harness", "agentwatch.daemon"]),
    # run/: one run (prepare, log, enforcement, loop, Monitor); follow.py (tail: reads what a run
    # writes to its log) moves behind api.py, over the engine's event bus
    ("run", ["agentwatch.run", "agentwatch.follow"]),
    # integrity.py (keys, signatures, log chain) becomes the integrity/ package, here
    ("integrity", ["agentwatch.integrity"]),
    # sinks/ (run log, console) become the engine's reporter and run/'s log
    ("engine", ["agentwatch.engine", "agentwatch.sinks"]),
    # guards/: the kernel enforcement objects (egress, BPF LSM); sensors/: observation;
    # keeper.py: kills a dead monitor's runs (its interpreter imports only it, core.procfs, core.state
    # and sandbox.cgroups)
    ("sandbox/guards/sensors", ["agentwatch.sandbox", "agentwatch.guards", "agentwatch.sensors",
                                "agentwatch.keeper"]),
    ("policy", ["agentwatch.policy"]),
    # errors, events (the one schema), state (the state directory's layout),
    # units, options, procfs, peer: the bottom, importing nothing above it
    ("core", ["agentwatch.core", "agentwatch"]),
]
RANK = {name: len(LAYERS) - i for i, (name, _) in enumerate(LAYERS)}     # higher = nearer the top

# (importer, imported): upward imports that exist today, each with why; the
# reshaping of issue #15 removes them, and a test fails when one is gone
# from the code but still listed here. Add none.
KNOWN_UPWARD = {}


def layer(module):
    best = max((p for _, prefixes in LAYERS for p in prefixes
                if module == p or module.startswith(p + ".")), key=len, default=None)
    return next((name for name, prefixes in LAYERS if best in prefixes), None)


def _path(module):
    rel = module.replace(".", os.sep)
    pkg = os.path.join(REPO, rel, "__init__.py")
    return pkg if os.path.exists(pkg) else os.path.join(REPO, rel + ".py")


def imports(module):
    """(imported module, line) of every import of agentwatch or cli in
    module, at module level or inside a function (a lazy import is an import)."""
    path = _path(module)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [(target, a.name) for a in node.names]
        else:
            continue
        for target, name in names:
            if target.split(".")[0] not in ("agentwatch", "cli"):
                continue
            # `from pkg import mod` imports the module pkg.mod
            yield (f"{target}.{name}" if name and f"{target}.{name}" in MODULES else target), node.lineno


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer(m) is None] == []


def test_imports_point_down_the_layer_table():
    upward = []
    for module in MODULES:
        for target, line in imports(module):
            if RANK[layer(target)] > RANK[layer(module)] and (module, target) not in KNOWN_UPWARD:
                upward.append(f"{os.path.relpath(_path(module), REPO)}:{line}: {module} ({layer(module)}) "
                              f"imports {target} ({layer(target)})")
    assert upward == [], "imports pointing up the layer table:\n" + "\n".join(upward)


def test_known_upward_imports_still_exist():
    """So the exception list shrinks as the tree is reshaped."""
    found = {(m, t) for m in MODULES for t, _ in imports(m)}
    assert [pair for pair in KNOWN_UPWARD if pair not in found] == []


def test_layer_check_sees_lazy_and_relative_imports():
    """The scan finds what the rule is about: a function-level relative
    import (runner's `from .sandbox.plan import make_plan`), a relative
    `from . import submodule` (plan's landlock), an absolute import in cli/."""
    assert ("agentwatch.sandbox.plan" in {t for t, _ in imports("agentwatch.run.prepare")})
    assert ("agentwatch.sandbox.landlock" in {t for t, _ in imports("agentwatch.sandbox.plan")})
    assert any(t.startswith("agentwatch.") for t, _ in imports("cli.run"))
    assert RANK["cli"] > RANK["run"] > RANK["engine"] > RANK["sandbox/guards/sensors"] > RANK["core"]


def test_only_sensors_and_guards_import_bcc():
    """Everything else imports without bcc (and without root); doctor's
    probes get it from agentwatch.sensors.import_bcc."""
    found = []
    for module in MODULES:
        if module.startswith(("agentwatch.sensors", "agentwatch.guards")):
            continue
        with open(_path(module)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n and n.split(".")[0] == "bcc" for n in names):
                found.append(f"{module}:{node.lineno}")
    assert found == []


def test_cli_imports_only_the_api():
    """cli/ is a front end of agentwatch.api: of agentwatch it imports that
    module alone (plus its own modules), so the API is the one surface the
    CLI and the harness share."""
    found = []
    for module in MODULES:
        if not module.startswith("cli"):
            continue
        for target, line in imports(module):
            if target.split(".")[0] == "agentwatch" and target != "agentwatch.api":
                found.append(f"{os.path.relpath(_path(module), REPO)}:{line}: imports {target}")
    assert found == [], "cli/ imports agentwatch internals:\n" + "\n".join(found)


def test_cli_import_check_sees_the_api_import():
    """The scan names what cli/ imports: `from agentwatch import api` is
    agentwatch.api (and `from agentwatch.core import state` is agentwatch.core.state)."""
    assert "agentwatch.api" in {t for t, _ in imports("cli.run")}
    assert {t for t, _ in imports("cli.main")} == {"agentwatch.api"}
