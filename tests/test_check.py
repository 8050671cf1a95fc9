"""
Tests for C{./check}, the one test command: what it decides to run (which
Debian packages are missing, root or sudo, a virtualenv or not), shown with
C{--dry-run} and a PATH of stand-ins for C{dpkg-query}, C{id} and C{sudo};
and how it ends when a step fails, with stand-ins for the virtualenv's tools.
Nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "check"
PACKAGES = ["chromium", "redis-server", "nginx", "systemd"]


def stand_in(path: Path, script: str) -> None:
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def fake_system(
    directory: Path, installed: list[str], uid: int, sudo: bool, venv_works: bool = True
) -> dict[str, str]:
    """
    A PATH holding only stand-ins: dpkg-query knowing C{installed}, id
    answering C{uid}, sudo if C{sudo}, and python3 (this one, unable to
    make a virtualenv unless C{venv_works}).  Returns the environment.
    """
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    bash = shutil.which("bash")
    assert bash
    (bin_dir / "bash").symlink_to(bash)
    stand_in(
        bin_dir / "dpkg-query",
        "for last; do :; done\n"
        'for p in $INSTALLED; do [ "$p" = "$last" ] && echo "ii " && exit 0; done\nexit 1\n',
    )
    stand_in(bin_dir / "id", f"echo {uid}\n")
    if sudo:
        stand_in(bin_dir / "sudo", 'exec "$@"\n')
    no_ensurepip = directory / "no-ensurepip"
    no_ensurepip.mkdir()
    (no_ensurepip / "ensurepip.py").write_text("raise ImportError('python3-venv is missing')\n")
    pythonpath = "" if venv_works else f"PYTHONPATH={no_ensurepip} "
    stand_in(bin_dir / "python3", f'{pythonpath}exec {sys.executable} "$@"\n')
    return {"PATH": str(bin_dir), "INSTALLED": " ".join(installed), "HOME": str(directory)}


def run_check(
    directory: Path, environ: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """
    Run a copy of ./check in C{directory} (a clone without .venv).
    """
    copy = directory / "check"
    if not copy.exists():
        shutil.copy(CHECK, copy)
    return subprocess.run(
        [str(copy), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def commands(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_check_is_executable_at_the_root() -> None:
    """./check is an executable file at the repository's root, and CI runs exactly it."""
    assert os.access(CHECK, os.X_OK)
    ci = (REPO / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith("#")][-1] == "./check"
    assert "set -euo pipefail" in ci and "DEBIAN_FRONTEND=noninteractive" in ci


def test_help_says_where_the_arguments_go(tmp_path: Path) -> None:
    """./check --help says that its arguments go to pytest, and runs nothing."""
    result = run_check(tmp_path, fake_system(tmp_path, [], uid=1000, sudo=False), "--help")
    assert result.returncode == 0, result.stderr
    assert "./check -k tap" in result.stdout and "go to pytest" in result.stdout
    assert not commands(result)


def test_nothing_missing_installs_nothing(tmp_path: Path) -> None:
    """With every package installed and no .venv: the venv, pip, pytest, mypy, ruff, in order."""
    result = run_check(
        tmp_path, fake_system(tmp_path, PACKAGES, uid=1000, sudo=False), "--dry-run", "-k", "tap"
    )
    assert result.returncode == 0, result.stderr
    assert commands(result) == [
        "python3 -m venv .venv",
        ".venv/bin/python -m pip install -q -e .[test]",
        ".venv/bin/python -m pytest -k tap",
        ".venv/bin/mypy",
        ".venv/bin/ruff check .",
    ]


def test_missing_packages_are_installed_as_root(tmp_path: Path) -> None:
    """As root, the missing packages (only those) are installed with apt-get, after one update."""
    result = run_check(
        tmp_path, fake_system(tmp_path, ["redis-server", "systemd"], uid=0, sudo=False), "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert commands(result)[:2] == [
        "env DEBIAN_FRONTEND=noninteractive apt-get update -q",
        "env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium nginx",
    ]
    assert "chromium nginx" in result.stderr


def test_missing_packages_are_installed_through_sudo(tmp_path: Path) -> None:
    """Not root, with sudo: apt-get runs through sudo."""
    result = run_check(
        tmp_path, fake_system(tmp_path, ["chromium", "nginx"], uid=1000, sudo=True), "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert commands(result)[:2] == [
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server systemd",
    ]


def test_without_a_way_to_install_it_says_what_to_run(tmp_path: Path) -> None:
    """Not root and no sudo: one line naming the packages and the command, and exit 1."""
    environ = fake_system(tmp_path, ["systemd"], uid=1000, sudo=False)
    result = run_check(tmp_path, environ, "--dry-run")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "./check: missing Debian packages: chromium redis-server nginx; install them as root "
        "with: apt-get install chromium redis-server nginx"
    ]
    assert not commands(result)


def test_python3_venv_is_installed_when_venv_cannot_work(tmp_path: Path) -> None:
    """A python3 that cannot make a virtualenv (no ensurepip) gets python3-venv installed."""
    environ = fake_system(tmp_path, PACKAGES, uid=0, sudo=False, venv_works=False)
    result = run_check(tmp_path, environ, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert commands(result)[1] == (
        "env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv"
    )


def test_an_existing_venv_is_kept(tmp_path: Path) -> None:
    """A .venv already there is used as it is, not made again."""
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    stand_in(venv / "python", "exit 0\n")
    result = run_check(tmp_path, fake_system(tmp_path, PACKAGES, uid=1000, sudo=False), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "python3 -m venv .venv" not in commands(result)


@pytest.mark.parametrize("failing", ["pytest", "mypy", "ruff"])
def test_any_failure_fails_the_check_after_every_step_ran(tmp_path: Path, failing: str) -> None:
    """A failing pytest, mypy or ruff makes ./check exit 1, naming it, after all three ran."""
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    ran = tmp_path / "ran"
    fail = {name: "exit 0\n" for name in ("pytest", "mypy", "ruff")}
    fail[failing] = "exit 3\n"
    stand_in(
        venv / "python",
        f'echo "python $*" >> {ran}\nif [ "$2" = pytest ]; then {fail["pytest"]}fi\nexit 0\n',
    )
    stand_in(venv / "mypy", f"echo mypy >> {ran}\n{fail['mypy']}")
    stand_in(venv / "ruff", f'echo "ruff $*" >> {ran}\n{fail["ruff"]}')
    environ = fake_system(tmp_path, PACKAGES, uid=1000, sudo=False)
    result = run_check(tmp_path, environ, "tests/test_tap.py", "-x")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"./check: FAILED: {failing}"
    assert ran.read_text().splitlines() == [
        "python -m pip install -q -e .[test]",
        "python -m pytest tests/test_tap.py -x",
        "mypy",
        "ruff check .",
    ]


def test_all_passing_exits_zero(tmp_path: Path) -> None:
    """When pytest, mypy and ruff all pass, ./check exits 0 and says so."""
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    for name in ("python", "mypy", "ruff"):
        stand_in(venv / name, "exit 0\n")
    result = run_check(tmp_path, fake_system(tmp_path, PACKAGES, uid=1000, sudo=False))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == "./check: all passed: pytest, mypy, ruff"
