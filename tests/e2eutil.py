"""Helpers of the end-to-end tests (test_e2e, test_groups_sdk): encrypting SDK
clients connected through a recording TCP relay on loopback, so a test holds
every byte that crossed the wire and can look for plaintext in it."""

import asyncio
import os

import msgpack
import vodozemac
from serverutil import until

from pigeon.client import Client
from pigeon.client.keys import identity_keys, sign_key
from pigeon.core.codec import Codec
from pigeon.core.wire import PREAMBLE_SIZE
from pigeon.server.accounts import device_keys


class Relay:
    """A TCP relay on loopback that keeps every byte: all of it in ``captured``, and
    what the server sent on each connection in ``down`` (one bytearray each)."""

    def __init__(self, port: int):
        self.target = port
        self.captured = bytearray()
        self.down: list[bytearray] = []
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        down = bytearray()
        self.down.append(down)

        async def pipe(r, w, keep):
            try:
                while data := await r.read(65536):
                    self.captured += data
                    if keep is not None:
                        keep += data
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        try:
            await asyncio.gather(pipe(reader, up_w, None), pipe(up_r, writer, down))
        except asyncio.CancelledError:
            up_w.close()
            writer.close()

    def delivered(self, group: str) -> list:
        """Every ``message`` node from ``group`` the server sent on any connection."""
        out, codec = [], Codec()
        for stream in self.down:
            data, i = bytes(stream), PREAMBLE_SIZE
            while i + 3 <= len(data):
                n = int.from_bytes(data[i : i + 3], "big")
                if i + 3 + n > len(data):
                    break
                node = codec.decode(data[i + 3 : i + 3 + n])
                i += 3 + n
                if node.tag == "message" and node.attrs.get("from") == group:
                    out.append(node)
        return out

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


async def connect(relay, profile, **kw) -> Client:
    return await Client.connect("127.0.0.1", relay.port, plaintext=False, profile=profile, **kw)


async def register(srv, relay, phone, profile) -> Client:
    c = await connect(relay, profile)
    await c.register(phone)
    creds = await c.verify(phone, srv.code_for(phone))
    await c.login(creds)
    c.creds = creds
    return c


async def on_other_worker(srv, relay, client, profile, than):
    """Log in again through the relay until the device's session is on another worker."""
    creds = client.creds
    phone = creds.user
    await client.close()
    for _ in range(40):
        c = await connect(relay, profile)
        await c.login(creds)
        c.creds = creds
        await until(lambda: creds.device in srv.sessions(phone))
        if srv.sessions(phone)[creds.device]["worker"] != than:
            return c
        await c.close()
        await until(lambda: creds.device not in srv.sessions(phone))
    raise AssertionError("could not land on another worker in 40 connections")


async def companion(srv, relay, primary, profile) -> Client:
    """A second device of ``primary``'s account, linked by QR code, logged in."""
    comp = await connect(relay, profile)
    it = comp.pair_qr(name="laptop")
    code = await it.__anext__()
    _, creds = await asyncio.gather(primary.link(code.qr), it.__anext__())
    await comp.close()
    comp = await connect(relay, profile)
    await comp.login(creds)
    comp.creds = creds
    return comp


def grep_dir(path, needles):
    found = []
    for root, _, files in os.walk(path):
        for name in files:
            path_ = os.path.join(root, name)
            if not os.path.isfile(path_) or os.path.islink(path_):
                continue  # the control socket
            with open(path_, "rb") as f:
                data = f.read()
            found += [(name, n) for n in needles if n in data]
    return found


def provision_keyed(store, count: int, prefix: str, otks: int = 5) -> list[str]:
    """``count`` accounts straight in the store (``store``: a Store on the server's
    files), each one device whose identity key is a vodozemac Olm account's
    Ed25519 key, with ``otks`` signed one-time keys and a fallback key in the key
    directory, as the SDK publishes them; returns their numbers.  (They never log
    in: encrypting to them needs only what the directory holds.)"""
    phones = []
    db = store._db
    for i in range(count):
        phone = f"{prefix}{i:0{12 - len(prefix)}d}"
        acct = vodozemac.Account()
        curve, ed = identity_keys(acct)
        device, _ = store.register_device(phone, ed, device_keys(os.urandom(32), 4096))
        acct.generate_one_time_keys(otks)
        acct.generate_fallback_key()
        keys = [sign_key(acct, device, kid, k.to_bytes())
                for kid, k in acct.one_time_keys.items()]  # fmt: skip
        ((fkid, fk),) = acct.fallback_key.items()
        fb = sign_key(acct, device, fkid, fk.to_bytes(), True)
        with store.write() as txn:
            for k in keys:
                txn.put(f"{device}\x00{k.key_id}".encode(),
                        msgpack.packb([k.key, k.signature]), db=db["otks"])  # fmt: skip
            rec = [curve, ed, [fb.key_id, fb.key, fb.signature], len(keys), store.clock()]
            txn.put(device.encode(), msgpack.packb(rec, use_bin_type=True), db=db["keys"])
        phones.append(phone)
    return phones
