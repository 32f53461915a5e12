"""Settings from flags and SISYPHUS_* variables, validated at start-up (sisyphus.config)."""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

import pytest

from sisyphus.config import (
    OPTIONS,
    PUBLISHER_OPTIONS,
    TOKEN_OPTIONS,
    Option,
    Settings,
    load,
    option,
    read,
)
from sisyphus.errors import ConfigError, SisyphusError

SECRET = "s" * 32
SECRET_64 = "k" * 64
PEM = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"


def config_error(flags: dict[str, str | None], environ: dict[str, str]) -> str:
    """The message of the ConfigError that loading these settings raises."""
    with pytest.raises(ConfigError) as caught:
        load(flags, environ)
    return str(caught.value)


# Sources and precedence ---------------------------------------------------------------


def test_defaults() -> None:
    """With no flag and no variable, every option has its documented default."""
    settings = load({}, {})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 3001
    assert settings.redis_url is None
    assert settings.keepalive == 15.0
    assert settings.max_unsent_bytes == 256 * 1024
    assert settings.max_head_bytes == 8192
    assert settings.log_level == "INFO"
    assert settings.development_mode


def test_environment_variable_is_read() -> None:
    """A SISYPHUS_* variable sets its option."""
    settings = load({}, {"SISYPHUS_PORT": "8080", "SISYPHUS_KEEPALIVE": "2.5"})
    assert settings.port == 8080
    assert settings.keepalive == 2.5


def test_flag_wins_over_variable() -> None:
    """A flag given on the command line wins over the environment."""
    settings = load({"port": "9000"}, {"SISYPHUS_PORT": "8080"})
    assert settings.port == 9000


def test_flag_not_given_falls_back_to_variable() -> None:
    """A flag left out (None) lets the variable decide."""
    settings = load({"port": None}, {"SISYPHUS_PORT": "8080"})
    assert settings.port == 8080


def test_unrelated_variables_are_ignored() -> None:
    """Variables without the SISYPHUS_ prefix, or unknown ones, change nothing."""
    assert load({}, {"PORT": "1", "SISYPHUS_NOPE": "x", "sisyphus_port": "1"}) == Settings()


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, the process environment is read."""
    monkeypatch.setenv("SISYPHUS_PORT", "4321")
    assert load({}).port == 4321


@pytest.mark.parametrize(
    ("name", "raw", "value"),
    [
        ("host", "0.0.0.0", "0.0.0.0"),
        ("port", "0", 0),
        ("port", "65535", 65535),
        ("redis_url", "redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis_url", "", None),
        ("keepalive", "0.5", 0.5),
        ("api_key", "k" * 16, "k" * 16),
        ("api_key", "cl\u00e9-\u00e0-accents-\u2603\u2603", "cl\u00e9-\u00e0-accents-\u2603\u2603"),
        ("redis_url", "rediss://:pw@cache.test:6380/2", "rediss://:pw@cache.test:6380/2"),
        ("redis_url", "unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("host", "localhost", "localhost"),
        ("host", "::1", "::1"),
        ("api_key", "", None),
        ("secret", SECRET, SECRET),
        ("secret", "", None),
        ("audience", "app", "app"),
        ("issuer", "", None),
        ("leeway", "0", 0.0),
        ("token_cookie", "tok", "tok"),
        ("cors_origins", "", ()),
        ("cors_origins", "*", ("*",)),
        (
            "cors_origins",
            " https://a.test , https://b.test,,",
            ("https://a.test", "https://b.test"),
        ),
        ("algorithms", "HS256, HS512", ("HS256", "HS512")),
        ("retry_ms", "1", 1),
        ("max_connections", "0", 0),
        ("max_connections_per_user", "3", 3),
        ("previous_secret_until", "", None),
        ("previous_secret_until", "1767139200", 1767139200.0),
        ("previous_secret_until", "1767139200.5", 1767139200.5),
        ("previous_secret_until", "2025-12-31T00:00:00Z", 1767139200.0),
        ("previous_secret_until", "2025-12-31T02:00:00+02:00", 1767139200.0),
        ("log_level", "debug", "DEBUG"),
        ("log_level", "Warning", "WARNING"),
        ("history_max_age", "60", 60.0),
        ("replay_max_bytes", "1024", 1024),
        ("workers", "1", 1),
    ],
)
def test_values_are_parsed(name: str, raw: str, value: object) -> None:
    """Each option turns its text into the typed value the service uses."""
    assert getattr(load({name: raw}, {}), name) == value
    assert getattr(load({}, {"SISYPHUS_" + name.upper(): raw}), name) == value


def test_public_key_inline() -> None:
    """A PEM public key may be given inline."""
    settings = load({}, {"SISYPHUS_PUBLIC_KEY": PEM})
    assert settings.public_key == PEM
    assert not settings.development_mode


def test_public_key_from_a_file(tmp_path: Path) -> None:
    """A PEM public key may be given as the path of the file holding it."""
    path = tmp_path / "key.pem"
    path.write_text(PEM)
    assert load({"public_key": str(path)}, {}).public_key == PEM


# Errors name the source and the value ------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        (
            {"port": "abc"},
            {},
            "--port='abc' is invalid: invalid literal for int() with base 10: 'abc'",
        ),
        ({}, {"SISYPHUS_PORT": "abc"}, "SISYPHUS_PORT='abc' is invalid: invalid literal"),
        ({"port": "70000"}, {}, "--port='70000' is invalid: must be between 0 and 65535"),
        ({}, {"SISYPHUS_PORT": "-1"}, "SISYPHUS_PORT='-1' is invalid: must be between 0 and 65535"),
        ({"port": ""}, {}, "--port='' is invalid"),
        ({}, {"SISYPHUS_KEEPALIVE": "0"}, "SISYPHUS_KEEPALIVE='0' is invalid: must be > 0"),
        ({}, {"SISYPHUS_KEEPALIVE": "-3"}, "SISYPHUS_KEEPALIVE='-3' is invalid: must be > 0"),
        ({}, {"SISYPHUS_KEEPALIVE": "nan"}, "SISYPHUS_KEEPALIVE='nan' is invalid: must be > 0"),
        ({"keepalive": "soon"}, {}, "--keepalive='soon' is invalid: could not convert"),
        ({}, {"SISYPHUS_LEEWAY": "-1"}, "SISYPHUS_LEEWAY='-1' is invalid: must be >= 0"),
        ({}, {"SISYPHUS_LEEWAY": "nan"}, "SISYPHUS_LEEWAY='nan' is invalid: must be >= 0"),
        ({}, {"SISYPHUS_RETRY_MS": "0"}, "SISYPHUS_RETRY_MS='0' is invalid: must be > 0"),
        ({}, {"SISYPHUS_RETRY_MS": "1.5"}, "SISYPHUS_RETRY_MS='1.5' is invalid"),
        (
            {"max_connections": "-1"},
            {},
            "--max-connections='-1' is invalid: must be >= 0",
        ),
        (
            {"max_unsent_bytes": "0"},
            {},
            "--max-unsent-bytes='0' is invalid: must be > 0",
        ),
        (
            {"redis_url": "redis://x"},
            {"SISYPHUS_LOG_LEVEL": "verbose"},
            "SISYPHUS_LOG_LEVEL='verbose'",
        ),
        (
            {"log_level": "verbose"},
            {},
            "--log-level='verbose' is invalid: must be one of debug, info, warning, error",
        ),
        (
            {},
            {"SISYPHUS_ALGORITHMS": ""},
            "SISYPHUS_ALGORITHMS='' is invalid: unsupported empty list; "
            "use e.g. HS256, RS256, ES256",
        ),
        (
            {"algorithms": "HS256,none"},
            {},
            "--algorithms='HS256,none' is invalid: unsupported ['none']",
        ),
        (
            {},
            {"SISYPHUS_PREVIOUS_SECRET_UNTIL": "2026-12-31T00:00:00"},
            "SISYPHUS_PREVIOUS_SECRET_UNTIL='2026-12-31T00:00:00' is invalid: "
            "give a time zone, e.g. 2026-12-31T00:00:00Z",
        ),
        (
            {"previous_secret_until": "tomorrow"},
            {},
            "--previous-secret-until='tomorrow' is invalid",
        ),
        ({"workers": "0"}, {}, "--workers='0' is invalid: must be > 0"),
        ({}, {"SISYPHUS_WORKERS": "many"}, "SISYPHUS_WORKERS='many' is invalid"),
    ],
)
def test_bad_value_names_its_source_and_value(
    flags: dict[str, str | None], environ: dict[str, str], message: str
) -> None:
    """A bad value is refused at start-up with the flag or variable and the value quoted."""
    assert config_error(flags, environ).startswith(message)


def test_redis_flag_is_named_as_typed() -> None:
    """The Redis URL's flag is `--redis`, and that is the name an error would show."""
    option = {o.name: o for o in OPTIONS}["redis_url"]
    assert option.flag == "--redis"
    assert option.env == "SISYPHUS_REDIS_URL"


@pytest.mark.parametrize(
    ("flags", "environ", "source"),
    [
        ({"secret": "short"}, {}, "--secret="),
        ({}, {"SISYPHUS_SECRET": "s" * 31}, "SISYPHUS_SECRET="),
        ({}, {"SISYPHUS_PREVIOUS_SECRET": "short"}, "SISYPHUS_PREVIOUS_SECRET="),
    ],
)
def test_short_secret_is_refused(
    flags: dict[str, str | None], environ: dict[str, str], source: str
) -> None:
    """A token secret under 32 bytes is refused, naming the flag or variable."""
    message = config_error(flags, environ)
    assert message.startswith(source)
    assert "a token secret needs at least 32 bytes" in message


def test_secret_length_counts_bytes() -> None:
    """The 32-byte minimum counts UTF-8 bytes, not characters."""
    assert load({}, {"SISYPHUS_SECRET": "\u00e9" * 16}).secret == "\u00e9" * 16


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    """A key path that can't be read is refused, naming the variable and the path."""
    missing = tmp_path / "missing.pem"
    message = config_error({}, {"SISYPHUS_PUBLIC_KEY": str(missing)})
    assert message == (
        f"SISYPHUS_PUBLIC_KEY={str(missing)!r} is invalid: "
        "can't read the key file: No such file or directory"
    )


def test_key_file_without_pem_is_refused(tmp_path: Path) -> None:
    """A key file that holds no PEM block is refused."""
    path = tmp_path / "key.txt"
    path.write_text("not a key")
    message = config_error({"public_key": str(path)}, {})
    assert message == f"--public-key={str(path)!r} is invalid: the file holds no PEM key"


def test_config_error_is_a_sisyphus_error() -> None:
    """Callers that catch the package's base error also catch a bad setting."""
    assert issubclass(ConfigError, SisyphusError)


# Consistency between options ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"SISYPHUS_SECRET": SECRET, "SISYPHUS_ALGORITHMS": "RS256"},
            "SISYPHUS_SECRET is set but SISYPHUS_ALGORITHMS has no HS* algorithm",
        ),
        (
            {"SISYPHUS_SECRET": SECRET, "SISYPHUS_ALGORITHMS": "HS512"},
            "SISYPHUS_SECRET needs at least 64 bytes for HS512",
        ),
        (
            {"SISYPHUS_SECRET": SECRET, "SISYPHUS_ALGORITHMS": "HS256,HS384"},
            "SISYPHUS_SECRET needs at least 48 bytes for HS256, HS384",
        ),
        (
            {
                "SISYPHUS_SECRET": SECRET_64,
                "SISYPHUS_ALGORITHMS": "HS512",
                "SISYPHUS_PREVIOUS_SECRET": SECRET,
                "SISYPHUS_PREVIOUS_SECRET_UNTIL": "2030-01-01T00:00:00Z",
            },
            "SISYPHUS_PREVIOUS_SECRET needs at least 64 bytes for HS512",
        ),
        (
            {"SISYPHUS_PUBLIC_KEY": PEM, "SISYPHUS_ALGORITHMS": "HS256"},
            "SISYPHUS_PUBLIC_KEY is set but SISYPHUS_ALGORITHMS has no RS*/PS*/ES*/EdDSA algorithm",
        ),
        (
            {"SISYPHUS_SECRET": SECRET, "SISYPHUS_PREVIOUS_SECRET": SECRET},
            "SISYPHUS_PREVIOUS_SECRET needs SISYPHUS_PREVIOUS_SECRET_UNTIL",
        ),
        (
            {"SISYPHUS_REUSE_PORT": "yes"},
            "SISYPHUS_REUSE_PORT=yes needs SISYPHUS_REDIS_URL: with the embedded broker, "
            "processes sharing the port would not share messages",
        ),
        (
            {"SISYPHUS_WORKERS": "2"},
            "SISYPHUS_WORKERS=2 needs SISYPHUS_REDIS_URL: with the embedded broker, "
            "worker processes would not share messages",
        ),
        (
            {"SISYPHUS_WORKERS": "3", "SISYPHUS_REDIS_URL": "redis://x", "SISYPHUS_PORT": "0"},
            "SISYPHUS_WORKERS=3 needs a fixed SISYPHUS_PORT: with port 0 each worker would "
            "pick a port of its own",
        ),
        (
            {"SISYPHUS_CORS_ORIGINS": "*,https://a.test"},
            "SISYPHUS_CORS_ORIGINS: use either * or a list of origins, not both",
        ),
        (
            {
                "SISYPHUS_PREVIOUS_SECRET": SECRET,
                "SISYPHUS_PREVIOUS_SECRET_UNTIL": "2030-01-01T00:00:00Z",
            },
            "SISYPHUS_PREVIOUS_SECRET is set without SISYPHUS_SECRET: the service would run in "
            "development mode and accept no token; set SISYPHUS_SECRET to the new secret",
        ),
        (
            {"SISYPHUS_PREVIOUS_SECRET": SECRET, "SISYPHUS_PUBLIC_KEY": PEM},
            "SISYPHUS_PREVIOUS_SECRET is set without SISYPHUS_SECRET: the service would run in "
            "development mode and accept no token; set SISYPHUS_SECRET to the new secret",
        ),
    ],
)
def test_inconsistent_options_are_refused(environ: dict[str, str], message: str) -> None:
    """Combinations that would accept no token, or the wrong kind, stop the start-up."""
    assert config_error({}, environ) == message


def test_workers_auto_is_one_per_usable_core() -> None:
    """`auto` counts the cores this process may run on; with Redis, more than one is fine."""
    settings = load({"workers": "auto"}, {"SISYPHUS_REDIS_URL": "redis://x"})
    assert settings.workers == len(os.sched_getaffinity(0))
    assert load({}, {"SISYPHUS_WORKERS": "AUTO", "SISYPHUS_REDIS_URL": "redis://x"}) == settings
    assert load({"workers": "4", "redis_url": "redis://x"}, {}).workers == 4


@pytest.mark.parametrize(
    ("environ", "symmetric", "asymmetric"),
    [
        ({}, (), ("RS256", "ES256")),
        ({"SISYPHUS_SECRET": SECRET}, ("HS256",), ()),
        ({"SISYPHUS_PUBLIC_KEY": PEM}, (), ("RS256", "ES256")),
        ({"SISYPHUS_SECRET": SECRET, "SISYPHUS_ALGORITHMS": "HS256,ES256"}, ("HS256",), ("ES256",)),
        ({"SISYPHUS_SECRET": SECRET_64, "SISYPHUS_ALGORITHMS": "HS512"}, ("HS512",), ()),
        (
            {"SISYPHUS_PUBLIC_KEY": PEM, "SISYPHUS_ALGORITHMS": "EdDSA,PS256"},
            (),
            ("EdDSA", "PS256"),
        ),
    ],
)
def test_token_algorithms(
    environ: dict[str, str], symmetric: tuple[str, ...], asymmetric: tuple[str, ...]
) -> None:
    """HS256 by default with a secret, RS256/ES256 with a public key, or exactly the list given."""
    assert load({}, environ).token_algorithms() == (symmetric, asymmetric)


def test_secret_and_public_key_together() -> None:
    """A secret and a public key may both verify tokens, each with its own algorithms."""
    settings = load(
        {},
        {
            "SISYPHUS_SECRET": SECRET,
            "SISYPHUS_PUBLIC_KEY": PEM,
            "SISYPHUS_ALGORITHMS": "HS256,RS256",
        },
    )
    assert not settings.development_mode
    assert settings.token_algorithms() == (("HS256",), ("RS256",))


def test_previous_secret_with_its_end() -> None:
    """A rotated-out secret is accepted with the time it stops being valid."""
    until = "2030-01-01T00:00:00Z"
    settings = load(
        {},
        {
            "SISYPHUS_SECRET": SECRET,
            "SISYPHUS_PREVIOUS_SECRET": "p" * 32,
            "SISYPHUS_PREVIOUS_SECRET_UNTIL": until,
        },
    )
    assert settings.previous_secret == "p" * 32
    expected = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC).timestamp()
    assert settings.previous_secret_until == expected


@pytest.mark.parametrize(
    ("environ", "development"),
    [
        ({}, True),
        ({"SISYPHUS_API_KEY": "k" * 16}, True),
        ({"SISYPHUS_SECRET": SECRET}, False),
        ({"SISYPHUS_PUBLIC_KEY": PEM}, False),
    ],
)
def test_development_mode(environ: dict[str, str], development: bool) -> None:
    """Without a secret or a public key the service runs in development mode."""
    assert load({}, environ).development_mode is development


# The option table ---------------------------------------------------------------------------


def test_every_setting_is_one_option() -> None:
    """Each settings field has exactly one option, one flag and one variable."""
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert [o.name for o in OPTIONS] == fields
    assert len({o.flag for o in OPTIONS}) == len(OPTIONS)
    assert len({o.env for o in OPTIONS}) == len(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_option_names(option: Option) -> None:
    """Flags are --kebab-case, variables SISYPHUS_UPPER_CASE, and every option has help."""
    assert option.env == "SISYPHUS_" + option.name.upper()
    assert option.flag.startswith("--")
    assert "_" not in option.flag
    assert option.help
    assert option.metavar


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_every_default_loads(option: Option) -> None:
    """Leaving any option out gives its default."""
    assert getattr(load({}, {}), option.name) == option.default


def test_secrets_stay_out_of_the_repr() -> None:
    """The API key and token secrets never appear when settings are logged."""
    settings = load(
        {"api_key": "the-api-key-0123456"},
        {
            "SISYPHUS_SECRET": "current-secret-" + "x" * 20,
            "SISYPHUS_PREVIOUS_SECRET": "previous-secret-" + "y" * 20,
            "SISYPHUS_PREVIOUS_SECRET_UNTIL": "2030-01-01T00:00:00Z",
        },
    )
    text = repr(settings)
    assert "the-api-key" not in text
    assert "current-secret" not in text
    assert "previous-secret" not in text
    assert "port=3001" in text


def test_settings_are_immutable() -> None:
    """Settings can't be changed after start-up; `replace` makes a new value."""
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    changed = settings.replace(port=1)
    assert changed.port == 1
    assert settings.port == 3001


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_non_finite_rotation_deadline_is_refused(raw: str) -> None:
    """A NaN or infinite SISYPHUS_PREVIOUS_SECRET_UNTIL would keep an old secret forever."""
    message = config_error({}, {"SISYPHUS_PREVIOUS_SECRET_UNTIL": raw})
    assert "SISYPHUS_PREVIOUS_SECRET_UNTIL" in message


@pytest.mark.parametrize("variable", ["SISYPHUS_SECRET", "SISYPHUS_PREVIOUS_SECRET"])
def test_errors_about_secrets_never_print_them(variable: str) -> None:
    """A rejected secret is named by its variable, and its value stays out of the message."""
    message = config_error({}, {variable: "short-secret-value"})
    assert variable in message
    assert "short-secret-value" not in message


# First-hour mistakes: one line naming the flag or variable and the value ---------------------


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        (
            {"redis_url": "notaurl"},
            {},
            "--redis='notaurl' is invalid: Redis URL must specify one of the following schemes "
            "(redis://, rediss://, unix://); e.g. redis://localhost:6379/0",
        ),
        (
            {},
            {"SISYPHUS_REDIS_URL": "localhost:6379"},
            "SISYPHUS_REDIS_URL='localhost:6379' is invalid: Redis URL must specify one of",
        ),
        (
            {"redis_url": "redis://h:abc/0"},
            {},
            "--redis='redis://h:abc/0' is invalid: Port could not be cast to integer value",
        ),
        (
            {"redis_url": "redis://h:99999/0"},
            {},
            "--redis='redis://h:99999/0' is invalid: Port out of range",
        ),
        (
            {"redis_url": "redis://:hunter2@h:abc/0"},
            {},
            "--redis='redis://***@h:abc/0' is invalid: Port could not be cast",
        ),
        ({"host": "nohost.invalid"}, {}, "--host='nohost.invalid' is invalid: can't resolve it ("),
        ({}, {"SISYPHUS_HOST": ""}, "SISYPHUS_HOST='' is invalid: give an address such as"),
        (
            {},
            {"SISYPHUS_API_KEY": "fifteen-chars!!"},
            "SISYPHUS_API_KEY=<hidden> is invalid: too short: an API key needs at least 16 "
            "characters",
        ),
    ],
)
def test_first_hour_mistakes_name_the_source_and_value(
    flags: dict[str, str | None], environ: dict[str, str], message: str
) -> None:
    """A malformed Redis URL, an unresolvable host or a short API key is one clear line."""
    text = config_error(flags, environ)
    assert text.startswith(message)
    assert "\n" not in text
    assert "hunter2" not in text


def test_publishing_commands_share_the_service_options() -> None:
    """The CLI's publish commands read the same variables, parsed the same way, as `serve`."""
    shared = {o.name: o for o in PUBLISHER_OPTIONS + TOKEN_OPTIONS}
    assert {o.env for o in shared.values()} == {
        "SISYPHUS_URL",
        "SISYPHUS_REDIS_URL",
        "SISYPHUS_API_KEY",
        "SISYPHUS_HISTORY_SIZE",
        "SISYPHUS_HISTORY_MAX_AGE",
        "SISYPHUS_SECRET",
        "SISYPHUS_AUDIENCE",
        "SISYPHUS_ISSUER",
    }
    for name, opt in shared.items():
        if name != "url":
            assert opt.parse is option(name).parse
            assert opt.flag == option(name).flag
    values = read(PUBLISHER_OPTIONS, {"history_size": "7"}, {"SISYPHUS_HISTORY_MAX_AGE": "60"})
    assert values == {
        "url": "http://127.0.0.1:3001",
        "redis_url": None,
        "api_key": None,
        "history_size": 7,
        "history_max_age": 60.0,
    }
    with pytest.raises(ConfigError, match="SISYPHUS_URL='ftp://x' is invalid: use http"):
        read(PUBLISHER_OPTIONS, {}, {"SISYPHUS_URL": "ftp://x"})
