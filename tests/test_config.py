"""Server configuration: defaults, TOML file, flags, and errors that say what to fix."""

import json

import pytest

from pigeon.server.config import GROUPS, OPTIONS, ConfigError, load, problems


def test_defaults_need_no_file():
    c = load()
    assert c.listen == "127.0.0.1:7650" and c.data_dir == "var" and not c.tls_enabled
    assert c.worker_count >= 1 and c.max_frame == 1 << 20
    assert all(o.help for o in OPTIONS)


def test_file_then_flags(tmp_path):
    f = tmp_path / "pigeon.toml"
    f.write_text('listen = "127.0.0.1:9000"\nlogin-timeout = 3\nidle_timeout = 30.5\nworkers = 2\n')
    c = load(str(f))
    assert (c.listen, c.login_timeout, c.idle_timeout, c.workers) == (
        "127.0.0.1:9000",
        3.0,
        30.5,
        2,
    )
    c = load(str(f), {"listen": "127.0.0.1:9001", "workers": "3", "data_dir": None})
    assert (c.listen, c.workers, c.data_dir) == ("127.0.0.1:9001", 3, "var")
    assert c.replace(workers=1).workers == 1 and c.workers == 3


def test_settings_are_plain_attributes():
    """Each setting is read as an ordinary instance attribute (no __getattr__
    miss per read on the accept and login paths), with its value; an unknown
    name is still an AttributeError, and the class's own names are never shadowed."""
    c = load(overrides={"login_window": 7, "workers": 2})
    own = vars(c)
    for o in OPTIONS:
        assert own[o.name] == c.values[o.name] == getattr(c, o.name)
    assert c.login_window == 7 and c.worker_count == 2 and c.tls_enabled is False
    assert c.replace(login_window=9).login_window == 9 and c.login_window == 7
    assert c == load(overrides={"login_window": 7, "workers": 2})
    with pytest.raises(AttributeError):
        c.no_such_setting  # noqa: B018


@pytest.mark.parametrize(
    "toml, message",
    [
        ("login-timeout = 'soon'", "login-timeout: must be a number > 0, got 'soon'"),
        ("workers = -1", "workers: must be an integer >= 0"),
        ("workers = 1.5", "workers: must be an integer >= 0"),
        ("max-frame = 0", "max-frame: must be an integer > 0"),
        ("listen = '7650'", "listen: must be HOST:PORT"),
        ("sms-gateway = 'carrier-pigeon'", "sms-gateway: must be one of log, webhook"),
        ("sms-gateway = 'webhook'", "needs sms-webhook-url"),
        ("tls-key = 'k.pem'", "tls-key is set but tls-cert is not"),
        ("listn = '127.0.0.1:1'", "unknown setting 'listn'"),
        ("listen = '127.0.0.1:70000'", "listen: port must be 1-65535, got 70000"),
        ("metrics-listen = '[::1]:0'", "metrics-listen: port must be 1-65535, got 0"),
        ("listen = ", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path, toml, message):
    f = tmp_path / "bad.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        load(str(f))
    assert message in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such file"):
        load("/nonexistent/pigeon.toml")


def test_operations_doc_lists_every_setting():
    from pathlib import Path

    from pigeon.server.config import OPTIONS
    from pigeon.tools import opsdoc

    doc = Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md"
    assert opsdoc.main(["--check", str(doc)]) == 0, "run python -m pigeon.tools.opsdoc"
    text = doc.read_text()
    for o in OPTIONS:
        assert f"| `{o.name.replace('_', '-')}` |" in text


def test_every_error_is_reported_at_once(tmp_path):
    """check-config and serve list every problem, one line each naming the file and key."""
    f = tmp_path / "bad.toml"
    f.write_text(
        "workers = -1\n"
        "listen = '127.0.0.1:70000'\n"
        "login-timeout = 'soon'\n"
        "idle-timout = 30\n"
        "write-buffer-low = 10\n"
        "write-buffer-high = 5\n"
        "tls-key = 'k.pem'\n"
    )
    with pytest.raises(ConfigError) as info:
        load(str(f), {"sync": "sometimes"})
    want = [
        f"{f}: workers: must be an integer >= 0, got -1",
        f"{f}: listen: port must be 1-65535, got 70000",
        f"{f}: login-timeout: must be a number > 0, got 'soon'",
        f"{f}: unknown setting 'idle-timout': did you mean idle-timeout?",
        "command line: --sync: must be one of fsync, os, got 'sometimes'",
        f"{f}: tls-key is set but tls-cert is not: set both, or neither",
        f"{f}: write-buffer-low must not be above write-buffer-high",
    ]
    assert info.value.errors == want
    assert str(info.value).splitlines() == ["7 errors in the settings:", *want]
    assert problems(str(f), {"sync": "sometimes"}) == want
    assert problems() == []


def test_a_rule_between_keys_is_not_judged_on_a_refused_value(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("write-buffer-low = 10\nwrite-buffer-high = 'lots'\n")
    with pytest.raises(ConfigError) as info:
        load(str(f))
    assert info.value.errors == [
        f"{f}: write-buffer-high: must be an integer > 0, got 'lots'"
    ]  # and not also "low must not be above high" (judged against the default)


@pytest.mark.parametrize(
    "key, answer",
    [
        ("listn", "did you mean listen?"),
        ("login_timout", "did you mean login-timeout?"),
        ("max-connection", "did you mean max-connections?"),
        ("timeout", "did you mean pair-timeout or idle-timeout or login-timeout?"),
        ("colour", "every setting is listed by pigeon serve --help"),
    ],
)
def test_unknown_key_gets_the_closest_names_not_all_of_them(tmp_path, key, answer):
    f = tmp_path / "bad.toml"
    f.write_text(f"{key} = 1\n")
    with pytest.raises(ConfigError) as info:
        load(str(f))
    message = str(info.value)
    assert answer in message
    assert "blocklist-max" not in message and "typing-burst" not in message


def test_every_option_is_in_exactly_one_group():
    grouped = [n for g in GROUPS for n in g.names]
    assert sorted(grouped) == sorted(o.name for o in OPTIONS)
    assert all(g.title and g.description for g in GROUPS)


def test_user_groups_max_past_what_one_list_answer_carries_is_refused():
    """A group list answer is one node (at most 1,024 children): a user in more
    groups could never list them (the client refuses the answer, error 122)."""
    assert load().user_groups_max == 1024
    with pytest.raises(ConfigError) as info:
        load(overrides={"user_groups_max": "1025"})
    assert "user-groups-max must be at most 1024" in str(info.value)


def test_blocklist_max_past_what_one_answer_node_carries_is_refused():
    """The blocklist answer is one node (at most 1,024 children): a larger
    blocklist-max would let an account block users it can never list."""
    assert load().blocklist_max == 1024
    assert load(overrides={"blocklist_max": "1024"}).blocklist_max == 1024
    with pytest.raises(ConfigError) as info:
        load(overrides={"blocklist_max": "1025"})
    assert "blocklist-max must be at most 1024" in str(info.value)


def test_a_file_that_is_not_utf8_is_one_error_not_a_traceback(tmp_path):
    """TOML is UTF-8: tomllib raises UnicodeDecodeError (not TOMLDecodeError) on other
    bytes, which went up as a traceback."""
    f = tmp_path / "latin1.toml"
    f.write_bytes(b"\xff\xfe listen = 1\n")
    with pytest.raises(ConfigError) as info:
        load(str(f))
    assert info.value.errors == [
        f"{f}: not UTF-8 text (byte 0xff at offset 0): a TOML file must be UTF-8"
    ]


@pytest.mark.parametrize(
    "toml, message",
    [
        ("map-size = 1e400", "map-size: must be an integer > 0, got inf"),
        ("workers = inf", "workers: must be an integer >= 0, got inf"),
        ("max-frame = -inf", "max-frame: must be an integer > 0, got -inf"),
        ("login-timeout = inf", "login-timeout: must be a number > 0, got inf"),
        ("login-timeout = nan", "login-timeout: must be a number > 0, got nan"),
        ("unauth-rate = nan", "unauth-rate: must be a number >= 0, got nan"),
        ("map-size = '8G'", "map-size: must be an integer > 0, got '8G'"),
    ],
)
def test_a_number_that_is_not_finite_is_refused(tmp_path, toml, message):
    """TOML's 1e400 is float inf, which int() cannot take (OverflowError, a traceback);
    inf and nan passed as seconds or rates (nan compares false with the minimum)."""
    f = tmp_path / "inf.toml"
    f.write_text(toml + "\n")
    assert problems(str(f)) == [f"{f}: {message}"]


@pytest.mark.parametrize("flag", ["--login-timeout", "--unauth-rate", "--idle-timeout"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e400"])
def test_a_flag_that_is_not_finite_is_refused(flag, value):
    name = flag[2:].replace("-", "_")
    assert problems(overrides={name: value}) == [
        f"command line: {flag}: must be a number {'>=' if name == 'unauth_rate' else '>'} 0, "
        f"got {value!r}"
    ]


def test_map_size_has_a_floor_and_a_ceiling():
    """Below 1 MiB LMDB could not even make the store's tables (MDB_MAP_FULL traceback
    at start, --map-size 1); at 2**64 lmdb raised OverflowError, a traceback too."""
    assert load(overrides={"map_size": str(1 << 20)}).map_size == 1 << 20
    assert load(overrides={"map_size": str(1 << 46)}).map_size == 1 << 46
    for small in ("1", str((1 << 20) - 1)):
        assert problems(overrides={"map_size": small}) == [
            "command line: map-size must be at least 1048576 (1 MiB)"
        ]
    for big in (str((1 << 46) + 1), str(1 << 50)):  # 2**64: past every number's ceiling
        assert problems(overrides={"map_size": big}) == [
            "command line: map-size must be at most 70368744177664 (64 TiB)"
        ]


def test_workers_has_a_ceiling():
    assert load(overrides={"workers": "1024"}).workers == 1024
    assert load(overrides={"workers": "0"}).worker_count >= 1
    assert problems(overrides={"workers": "1025"}) == [
        "command line: workers must be at most 1024 (0: one per core)"
    ]


BRACKETS = "an IPv6 address must be in brackets (e.g. [::1]:7650), got "


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("listen", "[::1", BRACKETS + "'[::1'"),
        ("listen", "[::1:7650", BRACKETS + "'[::1:7650'"),
        ("tls-listen", "::1]:7650", BRACKETS + "'::1]:7650'"),
        ("media-listen", "[x]:7652", BRACKETS + "'[x]:7652'"),
        ("metrics-listen", "[127.0.0.1]:7659", "an IPv6 address must be in brackets"),
        ("listen", "::1:7650", BRACKETS + "'::1:7650'"),
        ("listen", "a b:7650", "host must be an IP address or a host name, got 'a b'"),
        ("listen", "300.1.1.1:7650", "host must be an IP address or a host name, got '300.1.1.1'"),
        ("listen", "-x:7650", "host must be an IP address or a host name, got '-x'"),
        ("listen", "127.0.0.1:7650 ", "must be HOST:PORT"),
        ("listen", "127.0.0.1:\u0667", "must be HOST:PORT"),  # an Arabic-Indic 7
    ],
)
def test_a_listen_address_must_be_one_the_server_can_bind(tmp_path, key, value, message):
    """Each of these was taken (only a port of digits was checked) and failed at bind, in a
    worker, or as a ValueError traceback where the address was split again."""
    f = tmp_path / "addr.toml"
    f.write_text(f"{key} = {json.dumps(value)}\n")
    errors = problems(str(f))
    assert len(errors) == 1 and errors[0].startswith(f"{f}: {key}: {message}"), errors


@pytest.mark.parametrize(
    "value", ["[::1]:7650", "[::]:7650", "0.0.0.0:7650", "localhost:7650", "chat.example.:7650",
              "[fe80::1%lo]:7650", "192.0.2.1:1"]
)  # fmt: skip
def test_good_listen_addresses_are_taken(value):
    assert load(overrides={"listen": value}).listen == value


_SAME = "are the same address: give each listener its own port"
_WILD = (
    "overlap (0.0.0.0 is every IPv4 address, [::] every address): give each listener its own port"
)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"media_listen": "127.0.0.1:7650"},
         f"listen 127.0.0.1:7650 and media-listen 127.0.0.1:7650 {_SAME}"),
        ({"listen": "0.0.0.0:7659"},
         f"listen 0.0.0.0:7659 and metrics-listen 127.0.0.1:7659 {_WILD}"),
        ({"media_listen": "[::]:7650"}, f"listen 127.0.0.1:7650 and media-listen [::]:7650 {_WILD}"),
        ({"listen": "[::]:7000", "metrics_listen": "[::1]:7000"},
         f"listen [::]:7000 and metrics-listen [::1]:7000 {_WILD}"),
        ({"listen": "[::1]:7000", "metrics_listen": "[0:0::1]:7000"},
         f"listen [::1]:7000 and metrics-listen [0:0::1]:7000 {_SAME}"),
        ({"listen": "Chat.example:7000", "media_listen": "chat.example.:7000"},
         f"listen Chat.example:7000 and media-listen chat.example.:7000 {_SAME}"),
        ({"listen": "chat.example:7000", "media_listen": "0.0.0.0:7000"},
         f"listen chat.example:7000 and media-listen 0.0.0.0:7000 {_WILD}"),
        ({"tls_listen": "127.0.0.1:7650", "tls_cert": "c.pem"},
         f"listen 127.0.0.1:7650 and tls-listen 127.0.0.1:7650 {_SAME}"),
    ],
)  # fmt: skip
def test_two_listeners_on_one_address_are_refused(settings, message):
    """They were taken: the workers bind with SO_REUSEPORT, so the media service and the
    chat workers shared one port (each given a share of the other's clients), or the
    start failed later at bind."""
    assert problems(overrides=settings) == [f"command line: {message}"]


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the defaults: 7650, 7651 (TLS, off), 7659, 7652
        {"tls_listen": "127.0.0.1:7650"},  # unused without tls-cert
        {"media_listen": "off", "metrics_listen": "off", "tls_listen": "127.0.0.1:7650"},
        {"listen": "0.0.0.0:7000", "media_listen": "[::1]:7000"},  # IPv4 wildcard, IPv6
        {"listen": "127.0.0.1:7000", "media_listen": "127.0.0.2:7000"},
        {"listen": "127.0.0.1:7000", "metrics_listen": "127.0.0.1:7001"},
        {"listen": "[::1]:7000", "metrics_listen": "[::2]:7000"},
    ],
)
def test_listeners_on_different_addresses_are_taken(settings):
    assert problems(overrides=settings) == []


def test_a_file_and_a_flag_on_one_address_name_both(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("media-listen = '0.0.0.0:7000'\n")
    assert problems(str(f), {"listen": "127.0.0.1:7000"}) == [
        f"{f} and command line: listen 127.0.0.1:7000 and media-listen 0.0.0.0:7000 {_WILD}"
    ]


_URL_KEYS = ["sms-webhook-url", "push-webhook-url", "push-fcm-url", "push-apns-url", "media-url"]


@pytest.mark.parametrize("key", _URL_KEYS)
@pytest.mark.parametrize(
    "value",
    ["file:///etc/passwd", "gopher://h/", "ftp://h/hook", "http://", "sms.example/hook",
     "https://h:99999/", "http://a b/", "https://h/\nX-Injected: 1", "javascript:alert(1)"],
)  # fmt: skip
def test_a_url_setting_takes_only_http_and_https(tmp_path, key, value):
    """sms-webhook-url = 'file:///etc/passwd' was taken (urllib opens file: and ftp: too);
    the push and media URLs took anything as well."""
    f = tmp_path / "url.toml"
    f.write_text(f"{key} = {json.dumps(value)}\n")
    assert problems(str(f)) == [
        f"{f}: {key}: must be an http:// or https:// URL with a host, got {value!r}"
    ]


@pytest.mark.parametrize("key", _URL_KEYS)
def test_http_and_https_urls_are_taken(key):
    name = key.replace("-", "_")
    for url in ("http://127.0.0.1:9000/hook", "https://sms.example/v1?k=1", "HTTPS://[::1]:1/"):
        assert getattr(load(overrides={name: url}), name) == url


_NUMBERS = [o for o in OPTIONS if getattr(o.check, "metavar", None) == "N"]


@pytest.mark.parametrize("option", _NUMBERS, ids=[o.name for o in _NUMBERS])
def test_every_number_has_a_ceiling(option):
    """--max-frame 100000000000000000000 (any integer past 64 bits) was taken and the
    start then went up as orjson's TypeError sending the settings to the workers; 1e308
    seconds of queue-max-age became int(inf) milliseconds in the worker."""
    for value in ("100000000000000000000", "1e300", str(2**54)):
        if isinstance(option.default, int) and "e" in value:
            continue  # an integer setting refuses the string 1e300 as not an integer
        errors = problems(overrides={option.name: value})
        assert errors == [
            f"command line: --{option.name.replace('_', '-')}: must be at most "
            f"9007199254740992 (2**53), got {value!r}"
        ], errors


def test_max_frame_fits_the_frame_header_and_a_delivery():
    """A frame's length is 3 bytes: --max-frame 100000000 was taken and every worker
    went up with Limits' ValueError; --max-frame 10 started a server whose message bodies
    could be at most 10 - 256 bytes (the room a delivery adds)."""
    assert load(overrides={"max_frame": "4096"}).max_frame == 4096
    assert load(overrides={"max_frame": "16777215"}).max_frame == 16777215
    for value in ("10", "4095", "16777216", "100000000"):
        assert problems(overrides={"max_frame": value}) == [
            "command line: max-frame must be 4096-16777215 (a frame's length is 3 bytes)"
        ]


def test_scram_iterations_has_scramps_floor():
    """scramp refuses fewer than 4096 iterations (RFC 7677's floor): scram-iterations = 1
    was taken, and each registration's device_keys in a worker would raise scramp's
    ScramException (as admin provision --iterations 0 did)."""
    assert load(overrides={"scram_iterations": "4096"}).scram_iterations == 4096
    assert problems(overrides={"scram_iterations": "4095"}) == [
        "command line: scram-iterations must be at least 4096 (RFC 7677)"
    ]


def test_a_bad_url_setting_is_refused_without_its_secrets(tmp_path):
    """The error goes to the terminal and the journal: a URL's user part and
    query (keys) are REDACTED in it, as check-config shows them."""
    f = tmp_path / "url.toml"
    f.write_text('sms-webhook-url = "https://TOKEN-SECRET:P-SECRET@h:99999/x?key=Q-SECRET"\n')
    [problem] = problems(str(f))
    assert "SECRET" not in problem
    assert problem.endswith("got 'https://REDACTED@h:99999/x?REDACTED'")
