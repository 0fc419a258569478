"""The CLI's global contract: --version, --help, non-zero exit with a one-line error."""

import subprocess

from helpers import script


def test_version_prints_one_line():
    out = subprocess.run([script("fusesnap"), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("fusesnap ")


def test_help_lists_global_options():
    out = subprocess.run([script("fusesnap"), "--help"], capture_output=True, text=True, check=True)
    for opt in ("--root", "--json", "-v"):
        assert opt in out.stdout


def test_unknown_command_fails():
    out = subprocess.run([script("fusesnap"), "no-such-command"], capture_output=True, text=True)
    assert out.returncode != 0
