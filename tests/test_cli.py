"""The command line under bad input and a hostile environment: one line, no traceback, true exit codes (2 only when
nothing ran), committed results never overwritten by accident, spec code restricted to installed modules."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import moewidgets.sweep as sw
from moewidgets.__main__ import main, reproduce_out_dir

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "name": "tiny",
    "base": {"model": {"n_experts": 4, "d_model": 8, "d_hidden": 16},
             "task": {"d_in": 8, "d_out": 8, "n_train": 256, "n_probe": 64},
             "train": {"steps": 5, "batch_size": 64, "device": "cpu"}},
    "grid": {"model.k": [1, 2]},
    "seeds": 1,
    "metrics": "loss",
    "probe_points": 64,
}


def _write(path: Path, **changes) -> Path:
    d = json.loads(json.dumps(TINY))
    d.update(changes)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:          # argparse: usage errors exit with status 2
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*"))}


# ------------------------------------------------------------------------------------------------ reproduce

def test_reproduce_with_one_seed_exits_2_and_leaves_book_results_untouched():
    """As a user runs it: a real process, book/results compared byte for byte before and after."""
    before = _digest(REPO / "book" / "results")
    proc = subprocess.run([sys.executable, "-m", "moewidgets", "reproduce", "chapter4", "--seeds", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seeds must be an integer >= 2" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and _digest(REPO / "book" / "results") == before


@pytest.mark.parametrize("argv,message", [
    (["--seed-start", "-1"], "--seed-start must be a non-negative integer"),
    (["--seed-start", "x"], "'x' is not an integer"),
    (["--seeds", "two"], "--seeds must be an integer >= 2"),
    (["--seed-start", str(2**70)], "seeds must be <= 4294967295"),
    (["--out", "book/results"], "pass --commit-results instead"),
    (["--commit-results", "--out", "x"], "not allowed with argument"),
])
def test_reproduce_bad_options_exit_2_before_any_run(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    started = sw.STARTED["jobs"]
    code, _, err = _cli(["reproduce", "chapter1", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err and sw.STARTED["jobs"] == started


def test_reproduce_writes_book_results_only_with_commit_results(monkeypatch, tmp_path):
    from moewidgets.reproduce import DEFAULT_OUT_DIR
    from moewidgets.reproduce.common import results_dir
    assert reproduce_out_dir(False, None) == DEFAULT_OUT_DIR == Path("build") / "results"
    assert reproduce_out_dir(False, str(tmp_path)) == tmp_path
    assert reproduce_out_dir(True, None) == results_dir()
    with pytest.raises(ValueError, match="pass --commit-results"):
        reproduce_out_dir(False, str(results_dir()))


# ------------------------------------------------------------------------------------------------ sweep errors

@pytest.mark.parametrize("change,message", [
    ({"base": {**TINY["base"], "train": {"device": "cuda:x"}}}, "TrainConfig.device='cuda:x' must be"),
    ({"seeds": [2**70]}, "integers in 0..4294967295"),
    ({"seeds": 10**9}, "seeds=1000000000 exceeds the budget of 10000 seeds"),
    ({"grid": {"model.k": [1, 2], "model.aux_weight": [i / 1000 for i in range(1000)],
               "model.z_weight": [i / 100 for i in range(100)]}}, "= 200000 grid points): 200000 exceeds the budget"),
    ({"base": {**TINY["base"], "model": {"n_experts": 4, "d_model": 10**5, "d_hidden": 16},
               "task": {"d_in": 10**5, "d_out": 8, "n_train": 256, "n_probe": 64}}}, "exceeds the budget of 16 GiB"),
    ({"base": {**TINY["base"], "train": {"steps": 10**12}}}, "train.steps=1000000000000 exceeds the budget"),
])
def test_sweep_config_errors_exit_2_naming_the_field(change, message, tmp_path, capsys):
    spec = _write(tmp_path / "bad.yml", **change)
    code, _, err = _cli(["sweep", str(spec), "--executor", "serial", "--cache", str(tmp_path / "c"),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_a_file_where_a_folder_is_expected_exits_2(tmp_path, capsys):
    spec = _write(tmp_path / "tiny.yml")
    (tmp_path / "afile").write_text("x")
    code, _, err = _cli(["sweep", str(spec), "--executor", "serial", "--out", str(tmp_path / "afile"),
                         "--cache", str(tmp_path / "c")], capsys)
    assert code == 2 and "afile: a file is in the way where a folder is expected" in err
    code, _, err = _cli(["sweep", str(spec), "--executor", "serial", "--out", str(tmp_path / "o"),
                         "--cache", str(tmp_path / "afile" / "sub")], capsys)
    assert code == 2 and "a file is in the way" in err and "Traceback" not in err


def test_disk_full_after_jobs_ran_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the results (after the jobs ran): exit 1 (something ran), one line, what to do."""
    spec = _write(tmp_path / "tiny.yml")

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(sw, "write_atomic", full)
    code, _, err = _cli(["sweep", str(spec), "--executor", "serial", "--out", str(tmp_path / "o"),
                         "--cache", str(tmp_path / "c")], capsys)
    assert code == 1 and "no space left on the disk; free some space" in err and "Traceback" not in err


def test_memory_error_in_a_job_exits_1_without_a_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "oom_job.py").write_text("def job(payload, seed):\n    raise MemoryError('cannot allocate 80 GB')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _write(tmp_path / "tiny.yml", metrics="oom_job:job")
    code, _, err = _cli(["sweep", str(spec), "--executor", "serial", "--out", str(tmp_path / "o"),
                         "--cache", str(tmp_path / "c")], capsys)
    assert code == 1 and "MemoryError: cannot allocate 80 GB" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ spec code

def test_metrics_from_the_current_folder_need_allow_local(tmp_path, capsys, monkeypatch):
    (tmp_path / "local_metrics.py").write_text(
        "from moewidgets.reproduce import chapter1_job\n"
        "def job(payload, seed):\n    return chapter1_job({**payload, 'converge_only': True}, seed)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _write(tmp_path / "tiny.yml", metrics="local_metrics:job")
    argv = ["sweep", str(spec), "--executor", "serial", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
    code, _, err = _cli(argv, capsys)
    assert code == 2 and "module 'local_metrics' comes from the current folder" in err and "--allow-local" in err
    assert "local_metrics" not in sys.modules                  # refused before importing (running) it
    code, out, err = _cli(argv + ["--allow-local"], capsys)
    assert code == 0 and ": 2 rows in " in out, err


def test_installed_module_metrics_are_allowed():
    spec = sw.SweepSpec.from_dict({**TINY, "metrics": "moewidgets.reproduce:chapter1_job"})
    assert spec.jobs()[0].fn == "moewidgets.reproduce:chapter1_job"
