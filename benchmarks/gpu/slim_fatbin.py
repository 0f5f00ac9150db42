"""Keep one GPU architecture's machine code in a CUDA library's fat binaries (as ``nvprune``
does for objects), so the library travels in fewer parts: ``python slim_fatbin.py LIB.so 90``.

Each fat binary container in the ``.nv_fatbin`` section keeps its entries of that architecture
(and any PTX), moved to the front; its size field shrinks to theirs and the bytes freed become
zeros (the section keeps its layout, so the pointers the host code registers stay valid). The
driver then finds only those entries: the library runs on that architecture alone. A container with
no code for it (which could not run there anyway) stays as it was. onnxruntime-
gpu 1.31.1's CUDA provider carries sm_75/80/86/89/90/120 code: 218 MB of fat binaries, 77 MB of
them sm_90 (H100, H200).
"""

from __future__ import annotations

import struct
import sys

MAGIC = 0xBA55ED50
PTX, ELF = 1, 2


def sections(data: bytes) -> dict[str, tuple[int, int]]:
    """ELF64 section name -> (offset, size)."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = heads[shstrndx][4]
    out = {}
    for name, _, _, _, off, size in heads:
        end = data.index(b"\0", strtab + name)
        out[data[strtab + name : end].decode()] = (off, size)
    return out


def entries(data, start: int, end: int):
    """(offset, length, kind, arch) of each entry of a container's payload."""
    e = start
    while e < end:
        kind, _, header, size = struct.unpack_from("<HHIQ", data, e)
        arch = struct.unpack_from("<I", data, e + 28)[0]
        yield e, header + size, kind, arch
        e += header + size


def slim(path: str, arch: int) -> tuple[int, int]:
    data = bytearray(open(path, "rb").read())
    off, size = sections(bytes(data))[".nv_fatbin"]
    pos, kept, dropped = off, 0, 0
    while pos < off + size:
        magic, _, header, fat = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:  # alignment padding between containers
            pos += 8
            continue
        start, end = pos + header, pos + header + fat
        keep = [
            bytes(data[e : e + n])
            for e, n, kind, a in entries(data, start, end)
            if kind == PTX or a == arch
        ]
        if not keep:  # no code for this architecture (it could not run there): as it was
            pos = end
            continue
        body = b"".join(keep)
        data[start:end] = body + bytes(fat - len(body))
        struct.pack_into("<Q", data, pos + 8, len(body))
        kept, dropped = kept + len(body), dropped + fat - len(body)
        pos = end
    open(path, "wb").write(data)
    return kept, dropped


if __name__ == "__main__":
    k, d = slim(sys.argv[1], int(sys.argv[2]))
    print(f"kept {k / 1e6:.1f} MB of sm_{sys.argv[2]} (and PTX), zeroed {d / 1e6:.1f} MB")
