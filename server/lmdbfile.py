"""Is an LMDB data file whole?  Checked before LMDB maps it.

LMDB maps ``data.mdb`` and reads its pages straight from the map.  A page
past the end of a file cut short (a failed copy, a full disk during a
restore, ``truncate``) is not an error LMDB can return: touching it raises
SIGBUS and the process dies.  So before a store is opened its file is read
here with ordinary reads, which see a short file as a short read.

The layout is LMDB's 0.9 one (libraries/liblmdb/mdb.c, 64-bit: ``pgno_t``
and ``txnid_t`` are 8 bytes).  Pages 0 and 1 are meta pages: a 16-byte page
header (``MDB_page``: pgno, pad, flags with P_META, lower, upper) and then
an ``MDB_meta``: magic 0xBEEFC0DE, version, address, map size, the free and
main ``MDB_db`` records (48 bytes each; the free one's first field is the
page size), ``mm_last_pg`` and ``mm_txnid``.  Page 1 is ``psize`` bytes in,
the page size the first meta names.  LMDB uses the meta with the larger
txnid and refuses a file whose either meta lacks the flag or the magic.

Every page up to that meta's ``mm_last_pg`` is in use unless the free
list says otherwise, and LMDB may read any page in use.  The file is
whole when it reaches past ``mm_last_pg``, the common case, read in two
small reads.  It may legitimately end before that: LMDB does not write a
page that a transaction allocated and freed again (a "loose" page), and
when those are the last ones the file stops short of them.  Only then is
the free-list tree walked (``MDB_db`` 0's root): the file must reach the
last page that is not free.

A writer may commit while this reads (pigeon admin beside a live
server); a snapshot's pages are not reused before the second commit after
it, so a walk whose meta still has the same txnid at its end read one
consistent snapshot, and one that does not is read again.
"""

from __future__ import annotations

import os
import struct
import sys

MAGIC = 0xBEEFC0DE
PAGE_HEADER = 16  # PAGEHDRSZ: pgno (8), pad (2), flags (2), lower, upper (2 + 2)
P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
F_BIGDATA = 0x01  # a leaf node whose data is on overflow pages
NODE_HEADER = 8  # MDB_node: lo, hi, flags, ksize (2 each)
P_INVALID = (1 << 64) - 1  # the root of an empty tree
_META_AT = PAGE_HEADER  # METADATA(p): the meta follows the page header
_PSIZE_AT = _META_AT + 24  # mm_dbs[FREE_DBI].md_pad
_FREE_ROOT_AT = _META_AT + 24 + 40  # mm_dbs[FREE_DBI].md_root
_LAST_PG_AT = _META_AT + 24 + 2 * 48  # mm_last_pg, then mm_txnid
_META_END = _LAST_PG_AT + 16
_TRIES = 3


class Truncated(Exception):
    """The file is cut short or is not an LMDB file: the message says how."""


def check(path: str) -> None:
    """Raise Truncated if LMDB would read past the end of ``path`` (or it is no LMDB file).

    A 32-bit build lays the structures out otherwise: nothing is checked there.
    """
    if sys.maxsize <= 2**32:
        return
    with open(path, "rb") as f:
        for _ in range(_TRIES):
            txnid, need, psize = _need(f)
            size = os.fstat(f.fileno()).st_size
            if size >= need:
                return
            if _metas(f)[0] == txnid:  # no commit since: the walk saw one snapshot
                break
    raise Truncated(f"{size} bytes where its pages in use need {need} (page size {psize})")


def _metas(f) -> tuple[int, int, int, int]:
    """(txnid, last page, page size, free-list root) of the meta LMDB would use."""
    f.seek(0)
    head = f.read(_META_END)
    if len(head) == 0:
        raise Truncated("it is empty")
    best = None
    psize = 0
    for i in range(2):
        page = head if i == 0 else _read(f, psize, _META_END)
        if len(page) < _META_END:
            raise Truncated("it is shorter than LMDB's two meta pages")
        (flags,) = struct.unpack_from("=H", page, 10)
        (magic,) = struct.unpack_from("=I", page, _META_AT)
        if not flags & P_META or magic != MAGIC:
            raise Truncated(f"meta page {i} is not an LMDB meta page")
        if i == 0:
            (psize,) = struct.unpack_from("=I", page, _PSIZE_AT)
            if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
                raise Truncated(f"meta page 0 names a page size of {psize}")
        (root,) = struct.unpack_from("=Q", page, _FREE_ROOT_AT)
        last, txnid = struct.unpack_from("=QQ", page, _LAST_PG_AT)
        if best is None or txnid > best[0]:
            best = (txnid, last, psize, root)
    return best


def _read(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _need(f) -> tuple[int, int, int]:
    """(the txnid read, the bytes the file must hold for it, the page size)."""
    txnid, last, psize, root = _metas(f)
    if last < 1:
        raise Truncated(f"its meta names {last} as the last page")
    if os.fstat(f.fileno()).st_size >= (last + 1) * psize:
        return txnid, (last + 1) * psize, psize
    free = _free_pages(f, root, last, psize)
    top = last
    while top in free:
        top -= 1
    return txnid, (top + 1) * psize, psize


def _free_pages(f, root: int, last: int, psize: int) -> set[int]:
    """The page numbers the free-list tree lists (each an IDL: count, then pages)."""
    free: set[int] = set()
    if root == P_INVALID:
        return free
    seen = set()
    todo = [root]
    while todo:
        pgno = todo.pop()
        if pgno in seen or pgno > last:
            raise Truncated(f"the free list's page {pgno} is out of place")
        seen.add(pgno)
        page = _page(f, pgno, psize)
        (flags, lower) = struct.unpack_from("=HH", page, 10)
        for k in range(max(0, (lower - PAGE_HEADER) // 2)):
            (at,) = struct.unpack_from("=H", page, PAGE_HEADER + 2 * k)
            if at + NODE_HEADER > psize:
                raise Truncated(f"the free list's page {pgno} is damaged")
            lo, hi, nflags, ksize = struct.unpack_from("=HHHH", page, at)
            if flags & P_BRANCH:
                todo.append(lo | hi << 16 | nflags << 32)
                continue
            if not flags & P_LEAF:
                raise Truncated(f"the free list's page {pgno} is neither branch nor leaf")
            dsize = lo | hi << 16
            start = at + NODE_HEADER + ksize
            if nflags & F_BIGDATA:
                (over,) = struct.unpack_from("=Q", page, start)
                if over > last:
                    raise Truncated(f"the free list's page {over} is out of place")
                data = _read(f, over * psize + PAGE_HEADER, dsize)
            else:
                data = page[start : start + dsize]
            if len(data) < dsize or dsize < 8:
                raise Truncated(f"the free list's record on page {pgno} is cut short")
            (count,) = struct.unpack_from("=Q", data, 0)
            count = min(count, dsize // 8 - 1)
            free.update(struct.unpack_from(f"={count}Q", data, 8))
    return free


def _page(f, pgno: int, psize: int) -> bytes:
    page = _read(f, pgno * psize, psize)
    if len(page) < psize:
        raise Truncated(f"its page {pgno} is past the end of the file")
    return page
