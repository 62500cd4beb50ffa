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
        if words and words[0] in ("-c", "--extra-index-url"):
            continue  # checked in test_environment_yml_honours_the_lock_and_takes_cpu_torch
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
    names = {_req_name(r) for r in reqs} - {"moewidgets"}
    pins = _constraint_pins()
    missing = sorted(names - set(pins))
    assert not missing, f"constraints.txt lacks pins for {missing}: run `make lock`"
    assert "moewidgets" not in pins


def test_constraints_pin_torch_without_a_local_label():
    """The lock pins torch to LOCK_TORCH's release with no +cpu label, so the CPU, CUDA and macOS builds all match."""
    pins = _constraint_pins()
    assert "torch" in pins, "constraints.txt must pin torch (make lock: LOCK_TORCH)"
    assert "+" not in pins["torch"], f"torch=={pins['torch']}: drop the local label (make lock strips it)"
    lock_torch = re.search(r"^LOCK_TORCH \?= torch==(\S+)$", _makefile(), flags=re.MULTILINE)
    assert lock_torch, "Makefile lacks `LOCK_TORCH ?= torch==X.Y.Z`"
    assert pins["torch"] == lock_torch.group(1)


def test_constraints_are_generated_by_make_lock():
    text = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert "make lock" in text.split("# ---- lock", 1)[0], "constraints.txt's header must say it is written by make lock"
    mk = _makefile()
    recipe = re.search(r"^lock:.*?(?=^\S)", mk, flags=re.MULTILINE | re.DOTALL).group(0)
    assert "uv pip compile pyproject.toml --all-extras" in recipe
    assert re.search(r"^LOCK_PYTHON \?= 3\.11$", mk, flags=re.MULTILINE)
    dev = _pyproject()["project"]["optional-dependencies"]["dev"]
    assert "uv" in {_req_name(r) for r in dev}, "the lock tool belongs to the dev extra"


def _makefile() -> str:
    return (ROOT / "Makefile").read_text(encoding="utf-8")


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
    assert "MOEWIDGETS_DATA" in text
    assert "apt-get" not in text, "make test installs Chromium itself (tools/ensure_chromium.sh); .ci/run just calls it"


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make lab" in text
    assert "make test" in text


@pytest.mark.parametrize("target", ["install", "lab", "test", "book", "notebooks", "bench", "reproduce", "lock", "clean",
                                    "distclean"])
def test_makefile_has_target(target):
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(rf"^{target}:", text, flags=re.MULTILINE), f"Makefile lacks target {target}"
    phony = " ".join(re.findall(r"^\.PHONY:(.*)$", text, flags=re.MULTILINE)).split()
    assert target in phony, f"{target} is not .PHONY"


# ------------------------------------------------------------------------------------------------------------------
# environment.yml: a CPU torch and the lock


def test_environment_yml_honours_the_lock_and_takes_cpu_torch():
    lines = [shlex.split(line) for line in _env_pip_lines()]
    assert ["-c", "constraints.txt"] in lines, "environment.yml's pip section must install under -c constraints.txt"
    assert ["--extra-index-url", "https://download.pytorch.org/whl/cpu"] in lines, \
        "environment.yml must take torch from PyTorch's CPU index (an extra index: PyPI keeps the rest)"
    assert not any(re.match(r"torch\b", w[-1]) for w in lines if w[0] not in ("-c", "--extra-index-url")), \
        "torch comes through the package's requirement under the lock's pin, not a separate line"
    # options before the install line: pip reads a requirements file as a whole, but keep it readable
    assert lines[-1][0] == "-e"
    # the Python of the environment is the one the lock was made for
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    lock_py = re.search(r"^LOCK_PYTHON \?= (\S+)$", _makefile(), flags=re.MULTILINE).group(1)
    assert py.split("=")[-1] == lock_py, (py, lock_py)


# ------------------------------------------------------------------------------------------------------------------
# make test: the order of its steps, doctests, the offline-book test after the build, timed browser tests alone


def _test_recipe() -> str:
    return re.search(r"^test: .*?(?=^\S)", _makefile(), flags=re.MULTILINE | re.DOTALL).group(0)


def test_make_test_runs_its_steps_in_order():
    recipe = _test_recipe()
    assert re.match(r"test: install\b", recipe), "the install check is make test's prerequisite"
    order = ['step "chromium" tools/ensure_chromium.sh', 'step "pytest: book build', 'step "browser tests that time']
    at = [recipe.find(s) for s in order]
    assert all(i >= 0 for i in at), dict(zip(order, at))
    assert at == sorted(at), f"steps out of order: {dict(zip(order, at))}"
    parallel = recipe[at[1]:at[2]]
    assert "MOEWIDGETS_BOOK_BUILD=always" in parallel, "the offline-book test is make test's book build"
    assert "-n $(TEST_WORKERS) --dist loadscope" in parallel, "a notebook's cells must stay on one worker (nbval)"
    assert "$(OFFLINE_BOOK_TEST) book tests moewidgets" in parallel, "the unit tests, the package's doctests and " \
        "the book's notebooks, the longest test first"
    assert "OFFLINE_BOOK_TEST := tests/browser/test_offline_book.py" in _makefile()
    assert "--nbval --nbval-current-env" in parallel
    assert "$(addprefix --ignore=,$(TIMED_BROWSER_TESTS))" in parallel, "timed browser tests run alone, after"
    assert "$(TIMED_BROWSER_TESTS)" in recipe[at[2]:]


def test_the_offline_book_test_builds_the_book_strictly():
    """make test has no book-build step of its own: the offline-book test builds it, so it must be as strict as
    the step was (warnings are errors, nitpicky references, every warning listed)."""
    source = (ROOT / "tests" / "browser" / "test_offline_book.py").read_text()
    assert 'STRICT = ("-W", "-n", "--keep-going")' in source
    assert '"--config", str(CONFIG), *STRICT]' in source


def test_every_browser_test_runs_once_and_the_timed_ones_alone():
    """The tests that time what a user waits for run after the parallel session, one at a time; every other browser
    test (the offline book, the kernel-free figure pages, the classroom page's reconnect: none has a time target)
    runs in the session; none is left out."""
    timed = re.search(r"^TIMED_BROWSER_TESTS := ((?:.*\\\n)*.*)$", _makefile(), flags=re.MULTILINE).group(1)
    timed_files = set(timed.replace("\\", " ").split())
    browser = {f"tests/browser/{p.name}" for p in (ROOT / "tests" / "browser").glob("test_*.py")}
    assert timed_files <= browser, timed_files - browser
    assert browser - timed_files == {"tests/browser/test_offline_book.py", "tests/browser/test_static_figures_browser.py",
                                     "tests/browser/test_voila_reconnect.py"}
    assert timed_files == {"tests/browser/test_chapter1_browser.py", "tests/browser/test_voila_browser.py"}


def test_pytest_runs_the_package_doctests():
    ini = _pyproject()["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in ini["addopts"].split()
    assert "moewidgets" in ini["testpaths"] and "tests" in ini["testpaths"]


def test_make_notebooks_syncs_then_executes():
    recipe = re.search(r"^notebooks:.*?(?=^\S)", _makefile(), flags=re.MULTILINE | re.DOTALL).group(0)
    sync, execute = recipe.find("jupytext --sync"), recipe.find("tools/execute_notebook.py")
    assert 0 <= sync < execute, recipe


# ------------------------------------------------------------------------------------------------------------------
# tools/ensure_chromium.sh: the Chromium check before any test (run for real, with a browser path that is missing)

ENSURE = ROOT / "tools" / "ensure_chromium.sh"
APT_CMD = "apt-get update && apt-get install -y chromium chromium-driver"


def _ensure(tmp_path, *args, **env):
    full = {**os.environ, **env}
    return subprocess.run(["bash", str(ENSURE), *args], capture_output=True, text=True, env=full, timeout=60)


def test_ensure_chromium_without_root_stops_with_the_command(tmp_path):
    out = _ensure(tmp_path, CHROMIUM=str(tmp_path / "no-chromium"), CHROMIUM_UID="1000", CHROMIUM_SUDO="none")
    assert out.returncode == 1, out
    assert f"Chromium at {tmp_path / 'no-chromium'}" in out.stderr
    assert APT_CMD in out.stderr, out.stderr
    assert "not root" in out.stderr
    assert out.stdout == "", "nothing is installed or run"


def test_ensure_chromium_as_root_installs_with_apt_dry_run(tmp_path):
    if subprocess.run(["bash", "-c", "command -v apt-get"], capture_output=True).returncode != 0:
        pytest.skip("no apt-get on this machine")
    out = _ensure(tmp_path, "--dry-run", CHROMIUM=str(tmp_path / "no-chromium"), CHROMIUM_UID="0")
    assert out.returncode == 0, out
    assert f"installing it: {APT_CMD}" in out.stdout
    assert "dry run, nothing installed" in out.stdout


def test_ensure_chromium_present_is_a_no_op(tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    out = _ensure(tmp_path, CHROMIUM=str(fake), CHROMIUM_UID="1000", CHROMIUM_SUDO="none")
    assert out.returncode == 0 and out.stdout.strip() == f"chromium: {fake} found", out


def test_ensure_chromium_rejects_unknown_arguments(tmp_path):
    out = _ensure(tmp_path, "--yes")
    assert out.returncode == 2 and "--yes" in out.stderr and "--dry-run" in out.stderr


# ------------------------------------------------------------------------------------------------------------------
# tools/install_torch.sh: where PyTorch comes from, and a TORCH_SPEC that does not exist (pip for real, offline)

INSTALL_TORCH = ROOT / "tools" / "install_torch.sh"
LINUX_X86 = sys.platform == "linux" and os.uname().machine == "x86_64"


def _install_torch(tmp_path, **env):
    """Dry run against an empty find-links folder, no index and no pip config: nothing is reachable or installed."""
    (tmp_path / "wheels").mkdir(exist_ok=True)
    full = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    full.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "wheels"),
                PIP_DISABLE_PIP_VERSION_CHECK="1", **env)
    return subprocess.run(["bash", str(INSTALL_TORCH), sys.executable, "--dry-run"], capture_output=True, text=True,
                          env=full, timeout=300)


def test_install_torch_bad_spec_stops_with_pips_message_and_the_overrides(tmp_path):
    out = _install_torch(tmp_path, TORCH_SPEC="torch==0.0.1", TORCH_INDEX="auto")
    assert out.returncode == 1, out
    assert "No matching distribution found for torch==0.0.1" in out.stderr, out.stderr
    assert "could not install TORCH_SPEC='torch==0.0.1'" in out.stderr
    pin = _constraint_pins()["torch"]
    assert f"make install TORCH_SPEC='torch=={pin}'" in out.stderr
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cu" in out.stderr
    if LINUX_X86:  # no local wheel: the CPU index, as an extra index
        assert "from https://download.pytorch.org/whl/cpu (extra index)" in out.stdout, out.stdout


def test_install_torch_explicit_index_is_an_extra_index(tmp_path):
    out = _install_torch(tmp_path, TORCH_SPEC="torch==0.0.1", TORCH_INDEX="https://example.invalid/whl/cu128")
    assert out.returncode == 1
    assert "torch: torch==0.0.1 from https://example.invalid/whl/cu128 (extra index)" in out.stdout


@pytest.mark.skipif(not (LINUX_X86 and list(Path("/opt/wheels").glob("torch-*+cpu-*.whl"))),
                    reason="only on machines with a local CPU torch wheel in pip's find-links (/opt/wheels)")
def test_install_torch_prefers_the_local_cpu_wheel_offline():
    """Here the default needs no network: the local wheel satisfies the pin, so the CPU index is never contacted."""
    env = {**os.environ, "PIP_FIND_LINKS": "/opt/wheels"}
    out = subprocess.run(["bash", str(INSTALL_TORCH), sys.executable, "--dry-run"], capture_output=True, text=True,
                         env={k: v for k, v in env.items() if k not in ("TORCH_SPEC", "TORCH_INDEX")}, timeout=300)
    assert out.returncode == 0, out
    pin = _constraint_pins()["torch"]
    assert f"torch: torch=={pin} from a wheel on this machine" in out.stdout
    assert "download.pytorch.org" not in out.stdout + out.stderr
