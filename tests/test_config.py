import subprocess
import sys

import pytest

from stt_server.config import Config, ConfigError, build_arg_parser


def test_seed_defaults() -> None:
    config = Config()
    assert (config.host, config.port, config.max_connections) == ("0.0.0.0", 8012, 15)
    assert config.model == "embedded"
    assert config.min_silence == pytest.approx(0.6)
    assert config.partial_interval == pytest.approx(0.5)
    assert config.max_message_size == 2 * 1024 * 1024


def test_flags_override_file_which_overrides_defaults(tmp_path) -> None:
    path = tmp_path / "stt.toml"
    path.write_text('port = 9000\nmax_connections = 3\nmin_silence = 1\nlanguage = "de"\n')
    config = Config.from_sources(["--config", str(path), "--max-connections", "7"])
    assert config.port == 9000  # from the file
    assert config.max_connections == 7  # the flag wins
    assert config.min_silence == 1.0  # TOML integer accepted for a float setting
    assert config.language == "de"
    assert config.host == "0.0.0.0"  # default


def test_every_flag_has_a_config_key_and_back() -> None:
    flags = {a.dest for a in build_arg_parser()._actions if a.option_strings} - {
        "help",
        "version",
        "config",
    }
    import attrs

    assert flags == {f.name for f in attrs.fields(Config)}


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("prot = 1", "unknown setting"),
        ('port = "x"', "port must be int"),
        ("max_utterance = 45.0", "max_utterance must be between"),
        ("max_connections = 0", "max_connections must be > 0"),
        ('device = "tpu"', "device must be one of"),
        ("port = [", "invalid TOML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, toml, message) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=message):
        Config.from_toml(path)


def test_bad_flag_value_exits_with_a_message() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stt_server", "--max-utterance", "31"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "max_utterance must be between" in proc.stderr


def test_empty_language_means_detect() -> None:
    assert Config.from_sources(["--language", ""]).language is None


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    import attrs

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [f.name for f in attrs.fields(Config) if f"`{f.name}`" not in readme]
    assert not missing, f"settings missing from the README table: {missing}"


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
def test_nan_and_infinite_settings_are_rejected_from_the_file_and_the_flags(
    tmp_path, literal
) -> None:
    path = tmp_path / "stt.toml"
    path.write_text(f"inference_timeout = {literal}\n")
    with pytest.raises(ConfigError, match="inference_timeout must be"):
        Config.from_toml(path)
    with pytest.raises(ConfigError, match="send_timeout must be"):
        Config.from_sources([f"--send-timeout={literal}"])
    # NaN passes any comparison-based check (nan <= 0 is False): this is the one that stops it.
    with pytest.raises(ConfigError, match="max_realtime_factor must be a finite number"):
        Config(max_realtime_factor=float("nan"))


def test_an_empty_language_in_the_file_means_detect_as_the_flag_does(tmp_path) -> None:
    path = tmp_path / "stt.toml"
    path.write_text('language = ""\n')
    assert Config.from_toml(path).language is None
    assert Config.from_sources(["--language", ""]).language is None


def test_defaults_keep_one_address_from_taking_every_slot() -> None:
    config = Config()
    assert 0 < config.max_sessions_per_ip < config.max_connections
