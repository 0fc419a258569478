"""The CLI's global contract: --version, --help, non-zero exit with a one-line error."""

import json
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


def test_json_is_accepted_before_and_after_the_command(tmp_path):
    for args in (["--json", "layers"], ["layers", "--json"], ["list", "--json"], ["--json", "list"]):
        out = subprocess.run([script("fusesnap"), "--root", str(tmp_path), *args],
                             capture_output=True, text=True)
        assert out.returncode == 0, (args, out.stderr)
        assert json.loads(out.stdout) == [], args


def test_os_errors_are_one_line_for_every_command():
    for cmd in (["layers"], ["list"]):
        out = subprocess.run([script("fusesnap"), "--root", "/proc/self/nonexistent/root", *cmd],
                             capture_output=True, text=True)
        assert out.returncode == 1, cmd
        assert out.stderr.startswith("fusesnap: error: ") and out.stderr.count("\n") == 1, out.stderr
