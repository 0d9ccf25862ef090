"""The pure helper of `transports/uni.py` (the unidirectional transports on a real server:
tests/integration/test_uni.py)."""

from __future__ import annotations

import pytest

from centripy.engine.protocol.commands import ProtocolError
from centripy.transports.uni import decode_uni_connect


@pytest.mark.timeout(5)
def test_decode_uni_connect() -> None:
    assert decode_uni_connect(None).token == ""
    req = decode_uni_connect(b'{"token":"t","subs":{"a":{"recover":true,"offset":3}},"x":1}')
    assert req.token == "t" and req.subs["a"].recover and req.subs["a"].offset == 3
    for bad in (b"", b"[]", b"{", b'{"token":1}'):
        with pytest.raises(ProtocolError):
            decode_uni_connect(bad)
