"""Store and accounts on a real LMDB in a temp dir, with a controllable clock."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scramp import ScramClient, ScramException

from pigeon.client.identity import Identity
from pigeon.core.errors import ErrorCode
from pigeon.server.accounts import Accounts, LogGateway, ServiceError, WebhookGateway, make_gateway
from pigeon.server.config import load
from pigeon.server.store import Store, StoreError

PHONE = "491701234567"


class Clock:
    def __init__(self):
        self.t = 1_763_830_000_000

    def __call__(self):
        return self.t


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    config = load(overrides={"data_dir": str(tmp_path), "scram_iterations": 4096})
    store = Store(str(tmp_path / "store"), map_size=64 << 20, clock=clock)
    accounts = Accounts(store, config, make_gateway(config))
    yield accounts, store, clock, tmp_path
    store.close()


def outbox_code(tmp_path, phone=PHONE):
    lines = (tmp_path / "sms-outbox.txt").read_text().splitlines()
    return [line.split()[1] for line in lines if line.split()[0] == phone][-1]


def register(accounts, tmp_path, phone=PHONE, source="127.0.0.1"):
    asyncio.run(accounts.request_code(phone, "sms", source))
    return accounts.verify(phone, outbox_code(tmp_path, phone), b"k" * 32)


def scram_login(accounts, address, secret):
    client = ScramClient(["SCRAM-SHA-256"], address, secret.hex())
    server = accounts.scram_server()
    server.set_client_first(client.get_client_first())
    client.set_server_first(server.get_server_first())
    server.set_client_final(client.get_client_final())
    client.set_server_final(server.get_server_final())  # the client checks the server too


def test_register_and_login(env):
    accounts, store, _, tmp_path = env
    address, secret, removed = register(accounts, tmp_path)
    assert address == PHONE + ":0" and len(secret) == 32 and removed == []
    dev = store.device(address)
    assert dev["identity_key"] == b"k" * 32
    assert secret not in repr(dev).encode() and secret.hex() not in repr(
        dev
    )  # no usable secret kept
    scram_login(accounts, address, secret)


def test_wrong_proof_and_unknown_device(env):
    accounts, _, _, tmp_path = env
    address, secret, _ = register(accounts, tmp_path)
    with pytest.raises(ScramException):
        scram_login(accounts, address, b"\x00" * 32)
    with pytest.raises(ScramException):
        scram_login(accounts, "4915112345678:0", secret)


def test_code_is_single_use_and_expires(env):
    accounts, _, clock, tmp_path = env
    asyncio.run(accounts.request_code(PHONE, "sms", "127.0.0.1"))
    code = outbox_code(tmp_path)
    accounts.verify(PHONE, code, b"k" * 32)
    with pytest.raises(ServiceError) as info:
        accounts.verify(PHONE, code, b"k" * 32)  # reused
    assert info.value.code == ErrorCode.BAD_CODE
    asyncio.run(accounts.request_code(PHONE, "sms", "127.0.0.1"))
    code = outbox_code(tmp_path)
    clock.t += 300_000  # code-ttl
    with pytest.raises(ServiceError):
        accounts.verify(PHONE, code, b"k" * 32)  # expired


def test_wrong_codes_void_the_code(env):
    accounts, _, _, tmp_path = env
    asyncio.run(accounts.request_code(PHONE, "sms", "127.0.0.1"))
    code = outbox_code(tmp_path)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(5):  # code-attempts-per-net (no source: one network)
        with pytest.raises(ServiceError):
            accounts.verify(PHONE, wrong, b"k" * 32)
    with pytest.raises(ServiceError):
        accounts.verify(PHONE, code, b"k" * 32)  # right, but too late


def test_code_requests_count_per_network_under_a_total_per_number(env):
    """register-per-phone is per (number, network): a stranger's requests from his
    networks leave the owner's network its own; register-per-phone-total caps them all."""
    accounts, _, _, _ = env
    for i in range(3):  # register-per-phone, from one /24 (three addresses)
        asyncio.run(accounts.request_code(PHONE, "sms", f"203.0.113.{i + 1}"))
    with pytest.raises(ServiceError, match="for this number from this network") as info:
        asyncio.run(accounts.request_code(PHONE, "sms", "203.0.113.9"))
    assert info.value.code == ErrorCode.RATE_LIMITED
    asyncio.run(accounts.request_code(PHONE, "sms", "198.51.100.7"))  # the owner's network
    # the total: 10 (register-per-phone-total) from all networks together
    for i in range(6):
        asyncio.run(accounts.request_code(PHONE, "sms", f"10.0.{i}.1"))
    with pytest.raises(ServiceError, match="for this number; try again in 60 min") as info:
        asyncio.run(accounts.request_code(PHONE, "sms", "10.0.99.1"))  # a network never seen
    assert info.value.code == ErrorCode.RATE_LIMITED


def test_a_refused_code_request_says_when_to_try_again(env):
    """A newcomer trying again and again from one address (register-per-ip, 20 per
    register-window) is told when the oldest request leaves the window, rounded up:
    trying at the time said succeeds."""
    accounts, _, clock, _ = env
    for i in range(20):
        asyncio.run(accounts.request_code(f"4917012345{i:02d}", "sms", "127.0.0.1"))
        clock.t += 60_000 if i == 0 else 1_000  # the oldest at 0, the others a minute on
    # (now: 79 s after the oldest, whose place frees 3,600 s after it)
    for advance, expected in ((0, "in 59 min"), (3_480_000, "in 41 s"), (30_000, "in 11 s")):
        clock.t += advance
        with pytest.raises(ServiceError, match="from this address; try again") as info:
            asyncio.run(accounts.request_code("491709999999", "sms", "127.0.0.1"))
        assert str(info.value).endswith(expected), str(info.value)
    clock.t += 11_000  # as said: the oldest request has left the window
    asyncio.run(accounts.request_code("491709999999", "sms", "127.0.0.1"))


def test_wrong_codes_count_per_network_under_a_total_per_code(env):
    """code-attempts-per-net (5) wrong codes from one network void the code for that
    network only; code-attempts (15) from all together void it for everyone."""
    accounts, _, _, tmp_path = env
    asyncio.run(accounts.request_code(PHONE, "sms", "198.51.100.7"))
    code = outbox_code(tmp_path)
    wrong = f"{(int(code) + 1) % 10**6:06d}"

    def guess(source, c=wrong):
        with pytest.raises(ServiceError) as info:
            accounts.verify(PHONE, c, b"k" * 32, source)
        return info.value.code

    # two addresses of one /24 (verify-failures is 3 per address): five wrong codes
    assert [guess(f"203.0.113.{1 + i // 3}") for i in range(5)] == [ErrorCode.BAD_CODE] * 5
    assert guess("203.0.113.3", code) == ErrorCode.BAD_CODE  # void for that network
    # five more from another network (ten in all): neither voids the owner's chance
    assert [guess(f"10.0.1.{1 + i // 3}") for i in range(5)] == [ErrorCode.BAD_CODE] * 5
    address, _, _ = accounts.verify(PHONE, code, b"k" * 32, "198.51.100.8")
    assert address == PHONE + ":0"
    # the total: a new code, 15 wrong ones from three other networks, and it is void
    asyncio.run(accounts.request_code(PHONE, "sms", "198.51.100.7"))
    code = outbox_code(tmp_path)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for net in (3, 4, 5):
        assert [guess(f"10.0.{net}.{1 + i // 3}", wrong) for i in range(5)] == [
            ErrorCode.BAD_CODE] * 5  # fmt: skip
    assert guess("198.51.100.7", code) == ErrorCode.BAD_CODE


def test_reregistration_moves_the_account(env):
    accounts, store, _, tmp_path = env
    first, secret1, _ = register(accounts, tmp_path)
    store.set_session(first, worker=0, conn=1)
    second, secret2, removed = register(accounts, tmp_path)
    assert second == PHONE + ":1" and removed == [first]
    assert store.device(first) is None and store.account(PHONE)["devices"] == [1]
    with pytest.raises(ScramException):
        scram_login(accounts, first, secret1)
    scram_login(accounts, second, secret2)


def test_registration_rate_limits_slide(env):
    accounts, _, clock, _ = env
    for _ in range(3):  # register-per-phone
        asyncio.run(accounts.request_code(PHONE, "sms", "127.0.0.1"))
    with pytest.raises(ServiceError) as info:
        asyncio.run(accounts.request_code(PHONE, "sms", "127.0.0.1"))
    assert info.value.code == ErrorCode.RATE_LIMITED
    clock.t += 3_600_000  # the window slides past the first requests
    asyncio.run(accounts.request_code(PHONE, "sms", "127.0.0.1"))
    for i in range(20):  # register-per-ip
        asyncio.run(accounts.request_code(f"49170123{i:04d}", "sms", "10.9.9.9"))
    with pytest.raises(ServiceError, match="this address"):
        asyncio.run(accounts.request_code("491709999995", "sms", "10.9.9.9"))


def test_login_failures_count_per_address_and_never_lock_out_the_owner(env):
    accounts, store, clock, _ = env
    addr = PHONE + ":0"
    stranger, owner = "203.0.113.9", "198.51.100.7"
    for _ in range(10):  # login-failures, per (device, address)
        assert accounts.login_allowed(addr, stranger)
        accounts.login_failed(addr, stranger)
    assert not accounts.login_allowed(addr, stranger)
    assert accounts.login_allowed(addr, owner)  # the owner elsewhere is not locked out
    clock.t += 300_000  # login-window: the count has drained
    assert accounts.login_allowed(addr, stranger)
    # per address, whatever the device (login-failures-per-ip = 100); an IPv6 /64 is one address
    for i in range(100):
        accounts.login_failed(f"49170000{i:04d}:0", f"2001:db8:1:2::{i:x}")
    assert not accounts.login_allowed("4915112345678:0", "2001:db8:1:2:ffff::1")
    assert accounts.login_allowed("4915112345678:0", "2001:db8:1:3::1")  # another /64
    # nothing of it is in the store
    with store.read() as txn:
        assert txn.stat(store._db["limits"])["entries"] == 0


def test_failed_login_table_is_capped(tmp_path):
    config = load(overrides={"data_dir": str(tmp_path), "login_table_size": 50})
    store = Store(str(tmp_path / "store"), map_size=64 << 20)
    try:
        accounts = Accounts(store, config, make_gateway(config))
        for i in range(1000):
            accounts.login_failed(f"49170000{i:04d}:0", f"10.0.{i // 250}.{i % 250}")
        assert len(accounts.failures) == 50 and accounts.failures.evicted == 1950
    finally:
        store.close()


def test_unknown_devices_get_a_stable_challenge_shaped_like_a_real_one(env):
    accounts, store, _, tmp_path = env
    address, _, _ = register(accounts, tmp_path)

    def challenge(user):
        client = ScramClient(["SCRAM-SHA-256"], user, "x" * 64)
        server = accounts.scram_server()
        server.set_client_first(client.get_client_first())
        fields = dict(f.split("=", 1) for f in server.get_server_first().split(","))
        return fields["s"], fields["i"]

    real, unknown = challenge(address), challenge("4915112345678:0")
    assert challenge(address) == real and challenge("4915112345678:0") == unknown  # stable
    assert len(real[0]) == len(unknown[0]) and real[1] == unknown[1]  # same shape
    assert challenge("4915112345678:1")[0] != unknown[0]
    # keyed: another store (another secret) makes other salts
    other = Store(str(tmp_path / "other"), map_size=64 << 20)
    try:
        acc2 = Accounts(other, accounts.config, accounts.gateway)
        client = ScramClient(["SCRAM-SHA-256"], "4915112345678:0", "x" * 64)
        server = acc2.scram_server()
        server.set_client_first(client.get_client_first())
        assert f"s={unknown[0]}," not in server.get_server_first()
    finally:
        other.close()


def test_sessions(env):
    accounts, store, _, tmp_path = env
    assert store.sessions_of(PHONE) is None  # no such user
    address, _, _ = register(accounts, tmp_path)
    assert store.sessions_of(PHONE) == {}
    store.set_session(address, worker=1, conn=7)
    assert store.sessions_of(PHONE)[address]["worker"] == 1
    store.clear_session(address, worker=1, conn=8)  # not that connection: kept
    assert address in store.sessions_of(PHONE)
    store.set_session(address, worker=2, conn=9)
    assert store.clear_worker_sessions(1) == (0, []) and store.clear_worker_sessions(2) == (1, [])
    assert store.sessions_of(PHONE) == {}


def test_delete_account_and_remove_device(env):
    accounts, store, _, tmp_path = env
    address, _, _ = register(accounts, tmp_path)
    assert store.remove_device(address) and not store.remove_device(address)
    address, _, _ = register(accounts, tmp_path)
    assert store.delete_account(PHONE) == [address]
    assert store.account(PHONE) is None and store.device(address) is None


def test_store_format_is_checked(tmp_path):
    s = Store(str(tmp_path / "s"), map_size=1 << 20)
    with s.write() as txn:
        txn.put(b"format", b"99", db=s._db["meta"])
    s.close()
    with pytest.raises(StoreError, match="format 99"):
        Store(str(tmp_path / "s"), map_size=1 << 20)


def test_log_gateway_appends_lines(tmp_path):
    gw = LogGateway(str(tmp_path / "outbox"))
    asyncio.run(gw.send(PHONE, "012345", "sms"))
    asyncio.run(gw.send(PHONE, "999999", "voice"))
    assert (tmp_path / "outbox").read_text() == f"{PHONE} 012345\n{PHONE} 999999\n"


def test_webhook_gateway_posts_json_and_retries():
    """A real HTTP server on loopback: the first attempt fails with 500, the retry lands."""
    got, statuses = [], [500, 204]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(statuses.pop(0) if statuses else 204)
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/sms"
        asyncio.run(WebhookGateway(url, timeout=5, retries=2).send(PHONE, "123456", "sms"))
        assert got == [{"phone": PHONE, "code": "123456", "method": "sms"}] * 2
        statuses.extend([500, 500])
        with pytest.raises(ServiceError) as info:
            asyncio.run(WebhookGateway(url, timeout=5, retries=1).send(PHONE, "1", "sms"))
        assert info.value.code == ErrorCode.UNAVAILABLE
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_provision_writes_the_json_lines_operations_md_shows(tmp_path):
    """docs/OPERATIONS.md: one {"phone", "device", "secret", "identity"} object a line,
    secret the SCRAM password (64 lowercase hex characters), identity the Ed25519
    private key whose public key the store holds, file mode 0600."""
    import re
    from pathlib import Path

    from pigeon.server.provision import provision

    doc = (Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md").read_text()
    (shown,) = re.findall(r'^\{"phone".*\}$', doc, re.M)
    shown = json.loads(shown)
    store = Store(str(tmp_path / "store"), map_size=64 << 20)
    out = tmp_path / "creds.jsonl"
    try:
        creds = provision(store, 2, str(out), prefix="999")
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert lines == creds and len(lines) == 2
        assert out.stat().st_mode & 0o777 == 0o600
        for line in [shown, *lines]:
            assert list(line) == ["phone", "device", "secret", "identity"]
            assert line["device"] == line["phone"] + ":0"
            assert re.fullmatch(r"[0-9a-f]{64}", line["secret"])
            assert re.fullmatch(r"[0-9a-f]{64}", line["identity"])
        for line in lines:
            public = Identity.from_private_bytes(bytes.fromhex(line["identity"])).public
            assert store.device(line["device"])["identity_key"] == public
        assert lines[0]["phone"] == shown["phone"] == "999000000000"
        accounts = Accounts(store, load(overrides={"data_dir": str(tmp_path)}), None)
        scram_login(accounts, lines[1]["device"], bytes.fromhex(lines[1]["secret"]))
    finally:
        store.close()


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
def test_the_ascii_saslprep_shortcut_agrees_with_scramps(name):
    """The server's SASLprep returns printable ASCII at once; scramp's agrees."""
    from scramp.utils import saslprep

    from pigeon.server.accounts import _saslprep

    assert _saslprep(name) == saslprep(name)


def _nonce_outcome(init, text):
    import scramp.core

    obj = object.__new__(scramp.core.Nonce)
    try:
        init(obj, text)
    except ScramException as exc:
        return ("refused", str(exc), exc.server_error)
    return ("ok", vars(obj))


@given(
    st.one_of(
        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x80), max_size=140),
        st.text(max_size=20),
        st.binary(max_size=8),
        st.none(),
    )
)
def test_the_nonce_shortcut_agrees_with_scramps(text):
    """The server's nonce check accepts and refuses exactly what scramp's does."""
    from pigeon.server.accounts import _nonce_init, _scramp_nonce_init

    assert _nonce_outcome(_nonce_init, text) == _nonce_outcome(_scramp_nonce_init, text)


def test_scramp_nonces_use_the_shortcut_and_refuse_as_before():
    import scramp.core

    from pigeon.server.accounts import _nonce_init

    assert scramp.core.Nonce.__init__ is _nonce_init  # the server's sessions use it
    n = 64 * "a"
    assert str(scramp.core.Nonce(n) + scramp.core.Nonce("b")) == n + "b"
    for bad in ("", "a b", "a,b", "a\x7fb", "\u00e9", b"ab"):
        with pytest.raises(ScramException):
            scramp.core.Nonce(bad)


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_the_xor_shortcut_agrees_with_scramps(a, b):
    """ClientKey = ClientSignature XOR proof: the same bytes, and the same
    ValueError (an invalid proof to scramp) when the lengths differ."""
    import scramp.core
    import scramp.utils

    from pigeon.server.accounts import _xor

    assert scramp.core.xor is _xor  # the server's sessions use it
    if len(a) != len(b):
        with pytest.raises(ValueError):
            scramp.utils.xor(a, b)
        with pytest.raises(ValueError):
            _xor(a, b)
        b = (b + a)[: len(a)]
        b += bytes(len(a) - len(b))
    assert _xor(a, b) == scramp.utils.xor(a, b)


def test_saslprep_beyond_ascii_is_scramps():
    import scramp.core
    from scramp import ScramException
    from scramp.utils import saslprep

    from pigeon.server.accounts import _saslprep

    assert scramp.core.saslprep is _saslprep  # the server's sessions use it
    for name in ("I\u00adX", "\u2168", "a\u00a0b", "491701234567:0"):
        assert _saslprep(name) == saslprep(name)
    with pytest.raises(ScramException):
        _saslprep("a\x07b")  # a control character: prohibited
