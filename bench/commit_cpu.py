"""CPU of the group commit alone in the saturated shape (``Queues.commit``, one process).

    python -m pigeon.bench.commit_cpu [--users 1000] [--devices 1] [--per-commit 256]
        [--commits 200] [--no-receipts] [--json]

Every commit holds ``--per-commit`` 1:1 messages of 100 bytes between random
users (every device of a user but one sends; each of the recipient's devices
and the sender's other devices gets a copy) and the device acks of everything
the previous commit queued (so delivered receipts are written and acked too), as
the throughput bench's server does at saturation.  Prints the thread CPU time
spent in ``Queues.commit`` per message and per device copy (a copy: an entry
queued for a device, receipts included), with no socket, no event loop and no
other worker: what the store's per-message code costs, less noisy than a whole
server on a shared machine.  ``PIGEON_PUREPYTHON=1`` measures the pure-Python twins.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time

import orjson

from pigeon.server.queues import QueueLimits, Queues, Send
from pigeon.server.store import Store

KEYS = (b"salt", b"stored", b"server", 4096)


def run(users: int, devices: int, per_commit: int, commits: int, receipts: bool,
        seed: int = 1, new_chats: int = 0) -> dict:  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="pigeon-commit-cpu-")
    try:
        store = Store(tmp, map_size=4 << 30, sync="os")
        phones = [f"4915{u:09d}" for u in range(users)]
        devs = {}
        for p in phones:
            devs[p] = [store.register_device(p, b"i" * 32, KEYS)[0]]
            for _ in range(devices - 1):
                devs[p].append(store.link_device(p, b"j" * 32, KEYS))
        q = Queues(store, QueueLimits(new_chats=new_chats), receipts=receipts)
        rnd = random.Random(seed)
        body = b"x" * 100
        acks: dict[str, int] = {}
        cpu = 0.0
        messages = copies = 0
        for c in range(commits):
            sends = []
            for i in range(per_commit):
                a, b = rnd.sample(phones, 2)
                sends.append(Send(devs[a][0], "message", f"{c}.{i}", b, "text", body))
            t0 = time.thread_time()
            pushes = q.commit(sends, acks)
            cpu += time.thread_time() - t0
            if c >= commits // 10:  # (the first tenth warms the caches and the tree)
                messages += len(sends)
                copies += len(pushes)
            else:
                cpu = 0.0
            acks = {}
            for p in pushes:
                if acks.get(p.device, 0) < p.seq:
                    acks[p.device] = p.seq
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "users": users,
        "devices_per_user": devices,
        "per_commit": per_commit,
        "commits": commits,
        "receipts": receipts,
        "new_chats": new_chats,
        "commit_cpu_us_per_msg": round(cpu / messages * 1e6, 2),
        "commit_cpu_us_per_copy": round(cpu / copies * 1e6, 2),
        "copies_per_msg": round(copies / messages, 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pigeon.bench.commit_cpu",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=1, help="devices per user (1-5)")
    ap.add_argument("--per-commit", type=int, default=256)
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--no-receipts", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--new-chats",
        type=int,
        default=0,
        help="the new-chats limit (0: off, as the bench profile; a server's default is 100)",
    )
    ap.add_argument("--json", action="store_true")
    o = ap.parse_args(argv)
    res = run(o.users, o.devices, o.per_commit, o.commits, not o.no_receipts, o.seed, o.new_chats)
    if o.json:
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
