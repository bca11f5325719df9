"""`pip install .` (not editable) must ship every package and the BPF sources."""
import os
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_python_package_is_listed():
    listed = set(_config()["packages"])
    for root, dirs, files in os.walk(os.path.join(REPO, "agentwatch")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            pkg = os.path.relpath(root, REPO).replace(os.sep, ".")
            assert pkg in listed, f"{pkg} is missing from [tool.setuptools] packages"


def test_cli_and_bpf_sources_are_shipped():
    cfg = _config()
    assert cfg["package-dir"] == {"agentwatch_cli": "cli", "agentwatch_bpf": "bpf"}
    assert set(cfg["package-data"]["agentwatch_bpf"]) >= {"*.c", "*.h"}
    assert any(f.endswith(".bpf.c") for f in os.listdir(os.path.join(REPO, "bpf")))
