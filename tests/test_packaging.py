"""Packaging checks: pyproject, constraints.txt, environment.yml, .ci/run, README, and a light import."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_IN_ENV = {"lab", "book", "test", "hf", "app", "dist"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _norm(name: str) -> str:
    """PEP 503-ish: lowercase, runs of '-', '_', '.' become '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"cannot parse requirement {req!r}"
    return _norm(m.group(1))


def _env_pip_lines() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one `pip:` section"
    return pips[0]


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    assert env["name"] == "moewidgets"
    plain = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(re.fullmatch(r"python\s*=+\s*3\.11(\.\*)?", d) for d in plain), plain
    assert "pip" in plain, plain

    installs = []
    for line in _env_pip_lines():
        words = shlex.split(line)
        if words and words[0] == "-e":
            words = words[1:]
        assert len(words) == 1, f"unexpected pip line {line!r}"
        m = re.fullmatch(r"\.(?:\[([^\]]*)\])?", words[0])
        if m:
            installs.append({e.strip() for e in (m.group(1) or "").split(",") if e.strip()})
    assert len(installs) == 1, "the pip section must install this package (`.`) exactly once"
    assert installs[0] == EXTRAS_IN_ENV

    optional = _pyproject()["project"]["optional-dependencies"]
    for extra in installs[0]:
        assert extra in optional, f"extra [{extra}] is not in pyproject's optional-dependencies"


def test_import_is_light():
    """`import moewidgets` must not pull in widget, plotting or Jupyter machinery."""
    code = (
        "import sys, moewidgets\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'ipywidgets', 'bokeh', 'jupyter_bokeh', 'IPython', 'transformers'} or m.startswith('jupyter'))\n"
        "print('\\n'.join(heavy))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JPY_")}
    env.pop("PYTHONSTARTUP", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    heavy = out.stdout.split()
    assert heavy == [], f"`import moewidgets` imported: {heavy}"


def _constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line)
        assert m, f"constraints.txt line is not an exact pin: {line!r}"
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def test_constraints_pin_every_dependency():
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    names = {_req_name(r) for r in reqs} - {"torch", "moewidgets"}
    pins = _constraint_pins()
    missing = sorted(names - set(pins))
    assert not missing, f"constraints.txt lacks pins for {missing}"
    assert "torch" not in pins, "torch is installed first via TORCH_SPEC; do not pin it in constraints.txt"
    assert "moewidgets" not in pins


def test_torch_is_a_range_not_a_pin():
    deps = _pyproject()["project"]["dependencies"]
    torch = [d for d in deps if _req_name(d) == "torch"]
    assert len(torch) == 1 and "==" not in torch[0], torch


def test_ci_run_is_executable_and_runs_make_test():
    ci = ROOT / ".ci" / "run"
    assert ci.is_file()
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    text = ci.read_text(encoding="utf-8")
    assert re.search(r"^\s*make test\s*$", text, flags=re.MULTILINE), ".ci/run must run `make test`"
    assert "set -euo pipefail" in text


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make lab" in text
    assert "make test" in text


@pytest.mark.parametrize("target", ["install", "lab", "test", "book", "bench", "reproduce", "clean", "distclean"])
def test_makefile_has_target(target):
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(rf"^{target}:", text, flags=re.MULTILINE), f"Makefile lacks target {target}"
    phony = " ".join(re.findall(r"^\.PHONY:(.*)$", text, flags=re.MULTILINE)).split()
    assert target in phony, f"{target} is not .PHONY"
