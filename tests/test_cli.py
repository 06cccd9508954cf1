"""The commands people expect: --help that lists the subcommands, --version, check-config."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import stt_server


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stt_server", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_the_subcommands_and_version_matches_the_metadata() -> None:
    help_text = run("--help")
    assert help_text.returncode == 0
    assert "stt-server token new LABEL" in help_text.stdout
    assert "stt-server check-config FILE" in help_text.stdout
    assert "--max-connections" in help_text.stdout
    version = run("--version")
    assert version.stdout.strip() == f"stt-server {stt_server.__version__}"
    assert importlib.metadata.version("stt-server") == stt_server.__version__
    token_help = run("token", "--help")
    assert token_help.returncode == 0 and "LABEL" in token_help.stdout.upper()
    assert run("token", "old", "x").returncode == 2


def test_check_config_reports_every_problem_without_starting(tmp_path) -> None:
    path = tmp_path / "stt.toml"
    path.write_text(
        "port = 99999\n"
        "max_connections = 0\n"
        "bogus = 1\n"
        "min_silence = nan\n"
        'tokens_file = "/nonexistent/tokens"\n'
        'trusted_proxies = "10.0.0.0/8, banana"\n'
        'keyfile = "/nonexistent/key.pem"\n'
        "max_sessions_per_ip = 0\n"
    )
    result = run("check-config", str(path))
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    for expected in (
        "unknown setting 'bogus'",
        "port must be between",
        "max_connections must be > 0",
        "min_silence must be a finite number",
        "'banana' is not an address",
        "tokens_file: cannot read",
        "keyfile: cannot read",
        "keyfile is set but certfile is not",
    ):
        assert any(expected in p for p in problems), (expected, problems)
    assert len(problems) == 8, problems
    assert "warning: max_sessions_per_ip is not below max_connections" in result.stdout
    assert f"{path}: 8 problems" in result.stdout


def test_check_config_prints_the_effective_settings_of_a_good_file(tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    path = tmp_path / "stt.toml"
    path.write_text(f'max_connections = 7\nlanguage = ""\ntokens_file = "{tokens}"\n')
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stdout
    assert "max_connections = 7  # from the file" in result.stdout
    assert 'language = ""  # from the file' in result.stdout  # "" = detect
    assert "max_sessions_per_ip = 5\n" in result.stdout  # a default, not marked
    assert "problem:" not in result.stdout and result.stdout.rstrip().endswith(": OK")


def test_check_config_on_a_broken_file_says_why() -> None:
    result = run("check-config", "/nonexistent/stt.toml")
    assert result.returncode == 1 and "cannot read /nonexistent/stt.toml" in result.stdout
