"""Test images: a real, tiny-on-disk PNG of any size (a "decompression bomb" at 20000 x 20000)."""

from __future__ import annotations

import struct
import zlib


def bomb_png(side: int = 20000) -> bytes:
    """A valid ``side`` x ``side`` 1-bit black PNG; 20000 x 20000 is 400 M pixels in about 60 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
