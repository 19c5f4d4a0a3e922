"""Settings: precedence of their sources, validation, and the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy import config as settings
from proxy.errors import ConfigError

README = Path(__file__).parent.parent / "README.md"


def parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_then_toml_then_environment_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "lightwire.toml"
    toml.write_text('port = 9000\nchunk_timeout = 5\nlog_level = "debug"\napi_keys = ["a", "b"]\n')
    environ = {"LIGHTWIRE_PORT": "9100", "LIGHTWIRE_CHUNK_TIMEOUT": "7.5"}
    config = settings.load(parse("--config", str(toml), "--port", "9200"), environ)
    assert config.port == 9200  # flag beats environment beats file
    assert config.chunk_timeout == 7.5  # environment beats file
    assert config.log_level == "debug"  # file beats default
    assert config.api_keys == ("a", "b")
    assert config.host == "127.0.0.1"  # default


def test_repeatable_and_list_settings() -> None:
    assert settings.load(parse("--api-key", "x", "--api-key", "y"), {}).api_keys == ("x", "y")
    assert settings.load(None, {"LIGHTWIRE_API_KEYS": "x, y"}).api_keys == ("x", "y")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LIGHTWIRE_PORT": "eighty"}, "cannot read 'eighty' as int"),
        ({"LIGHTWIRE_CAPTURE_TOKENS": "sometimes"}, "capture_tokens must be"),
        ({"LIGHTWIRE_UPSTREAM": "localhost:8000"}, "upstream must be an http(s) URL"),
        ({"LIGHTWIRE_MAX_BODY_MB": "0"}, "must be positive"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings.load(None, environ)


def test_unknown_toml_keys_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown settings.*prot"):
        settings.load(parse("--config", str(toml)), {})


def test_secrets_are_masked_in_what_is_logged() -> None:
    config = settings.load(None, {}, api_keys=("lw-secret",), upstream_api_key="sk-secret")
    assert "secret" not in str(config.redacted())


def test_readme_lists_every_setting() -> None:
    assert settings.markdown_table() in README.read_text(), "README's table is stale: paste `lightwire settings`"
