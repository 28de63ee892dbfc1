"""Cython twins of the hot parts of pigeon.core.

``pigeon.fastpath._codec`` has the same API as ``pigeon.core._pycodec``
(framing, node encode/decode, envelope peek).  Import the selected one from
``pigeon.core.codec``; import this package directly only to compare the two.
"""
