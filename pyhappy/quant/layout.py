"""The packed layout every quant_linear kernel reads (C++ CPU, Triton), and its pure-PyTorch
pack/unpack. Formats (nf4.py, intq.py) only produce and consume the *logical* form
(codes [N, K] uint8, per-(row, group) parameters [N, G]); this file is the one place that knows
how those are laid out in memory.

Rows are grouped in tiles of 8 (the AVX2 lane count: one 256-bit register holds one value per
row of a tile, so the decode kernel never reduces horizontally) and K in blocks of 32. Tiles come
in pairs (2p, 2p + 1) whose blocks alternate in memory: ``qdata`` is [N8/2, K/32, 2 * bytes], row
p holding block 0 of tile 2p, block 0 of tile 2p + 1, block 1 of tile 2p, ... The CPU decode kernels
take a pair side by side (two tiles in one 512-bit register, or one broadcast activation for both),
and so read the pair's codes as one sequential stream rather than two. N is padded up to a multiple
of 16 (N8 even; padded rows have code 0, scale 0, zero 0 and dequantize to 0).

Within one block of one tile (the "block" below; ``bytes`` = 128 or 96):

4-bit (nf4, int4): 128 bytes. In tile t, block b, byte j:
    s = j // 32, r = (j % 32) // 4, kk = j % 4, n = 8t + r
    low nibble  = code[n, 32b + 8s + kk]
    high nibble = code[n, 32b + 8s + 4 + kk]
  so one 32-byte load holds 8 rows x 8 consecutive k; masking the low nibbles gives bytes
  (row r, k = 4-run) that multiply a broadcast of 4 activations.

3-bit (int3): 96 bytes, three 32-byte vectors V0, V1, V2 (bytes
0..31, 32..63, 64..95). With p = j % 32 = 4r + kk (r the row in the tile, kk = k % 4), the three
bytes at p form the 24-bit value u = V0[p] | V1[p] << 8 | V2[p] << 16, and
    bits 3i .. 3i+2 of u (i = 0..7) = code[n, 32b + 4i + kk]
  so six of the eight code vectors of a block are one shift and one mask of one vector, and the
  other two (i = 2, 5) straddle two vectors (3/8 of a byte per weight: 25% fewer bytes than 4-bit).

Per-group parameters, group g covering k in [g*group_size, (g+1)*group_size), group_size a
multiple of 32: ``[N8, G, 8]`` (tile, group, row-in-tile), so the 8 rows of a tile load together.
  int4/int3: ``scales`` float16, ``zeros`` uint8;  w = (code - zero) * scale
  nf4:       ``absmax`` float32;                   w = NF4[code] * absmax

Layout versions (QuantLinear's extra state records the one it saved): 1, int3 in bit planes
(int3_from_planes); 2, tiles one after another ([N8, K/32, bytes], N padded to a multiple of 8;
pairs_from_tiles); 3, the tile pairs above.
"""

from __future__ import annotations

import torch

TILE_N = 8
BLOCK_K = 32
BYTES_PER_BLOCK = {4: 128, 3: 96}
# The integer the C++ and Triton kernels take for a format, and its bits.
FORMAT_CODE = {"nf4": 0, "int4": 1, "int3": 2}
FORMAT_BITS = {"nf4": 4, "int4": 4, "int3": 3}

# bitsandbytes' NF4 code table (functional.get_4bit_type("nf4")), exactly as it stores it.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0)
NF4_TABLE = torch.tensor(NF4_VALUES, dtype=torch.float32)


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if bits not in BYTES_PER_BLOCK:
        raise ValueError(f"layout: bits must be 3 or 4, got {bits!r}")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"layout: codes must be a uint8 [N, K] tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[1] % BLOCK_K:
        raise ValueError(f"layout: K = {codes.shape[1]} must be a multiple of {BLOCK_K}")


LAYOUT_VERSION = 3


def n_tiles(n: int) -> int:
    """Tiles of 8 rows for an n-row weight: n padded to a multiple of 16 (whole tile pairs)."""
    return 2 * ((n + 2 * TILE_N - 1) // (2 * TILE_N))


def _pairs(tiles: torch.Tensor) -> torch.Tensor:
    """[N8, KB, bytes] (tile by tile, N8 even) -> qdata [N8/2, KB, 2 * bytes] (pairs interleaved)."""
    N8, KB, nb = tiles.shape
    return tiles.view(N8 // 2, 2, KB, nb).transpose(1, 2).reshape(N8 // 2, KB, 2 * nb).contiguous()


def _tiles(qdata: torch.Tensor) -> torch.Tensor:
    """qdata [N8/2, KB, 2 * bytes] -> [N8, KB, bytes] (inverse of _pairs)."""
    P, KB, nb2 = qdata.shape
    return qdata.view(P, KB, 2, nb2 // 2).transpose(1, 2).reshape(2 * P, KB, nb2 // 2)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] uint8 (values < 2**bits) -> qdata [N8/2, K/32, 256 or 192] uint8."""
    _check_codes(codes, bits)
    N, K = codes.shape
    N8, KB = n_tiles(N), K // BLOCK_K
    c = codes.new_zeros(N8 * TILE_N, K)
    c[:N] = codes
    # c5[t, r, b, i, kk] = code[8t + r, 32b + 4i + kk]
    c5 = c.view(N8, TILE_N, KB, 8, 4).permute(0, 2, 3, 1, 4)  # [t, b, i, r, kk]
    if bits == 4:
        lo, hi = c5[:, :, 0::2], c5[:, :, 1::2]  # i = 2s and 2s + 1  -> [t, b, s, r, kk]
        return _pairs((lo | (hi << 4)).reshape(N8, KB, 128))
    return _pairs(_triples(c5))


def pairs_from_tiles(qdata: torch.Tensor, groups: dict) -> tuple:
    """(qdata, groups) in layout version 2 (qdata [N8', K/32, bytes] tile by tile, per-group tensors
    [N8', G, 8], N8' = ceil(N / 8)) -> the same weight in the current layout: an odd N8' gains one
    tile of padding (codes 0, parameters 0). ``groups``: name -> per-group tensor. For checkpoints
    of layout version 1 or 2 (QuantLinear's extra state says which)."""
    if qdata.shape[0] % 2:
        qdata = torch.cat([qdata, qdata.new_zeros(1, *qdata.shape[1:])])
        groups = {n: torch.cat([t, t.new_zeros(1, *t.shape[1:])]) for n, t in groups.items()}
    return _pairs(qdata), groups


def int3_from_planes(qdata: torch.Tensor) -> torch.Tensor:
    """3-bit qdata in the layout before pyhappy 0.1's byte triples (a 2-bit plane, bytes 0..63:
    bits 2i..2i+1 of byte 32h + 4r + kk = code(r, 16h + 4i + kk) & 3; a 1-bit plane, bytes 64..95:
    bit i of byte 64 + 4r + kk = code(r, 4i + kk) >> 2), [N8', KB, 96] tile by tile -> byte triples,
    still tile by tile (layout version 2: pairs_from_tiles takes it on). For checkpoints of layout
    version 1 (QuantLinear's extra state says which)."""
    N8, KB = qdata.shape[0], qdata.shape[1]
    plane2 = qdata[:, :, :64].reshape(N8, KB, 2, TILE_N, 4)
    plane1 = qdata[:, :, 64:].reshape(N8, KB, TILE_N, 4)
    low2 = torch.stack([(plane2 >> (2 * i)) & 3 for i in range(4)], dim=3).reshape(N8, KB, 8, TILE_N, 4)
    c5 = low2 | (torch.stack([(plane1 >> i) & 1 for i in range(8)], dim=2) << 2)  # [t, b, i, r, kk]
    return _triples(c5)


def _triples(c5: torch.Tensor) -> torch.Tensor:
    """3-bit codes c5[t, b, i, r, kk] (k = 4i + kk) -> qdata [N8, KB, 96] (byte triples)."""
    N8, KB = c5.shape[0], c5.shape[1]
    u = torch.zeros(N8, KB, TILE_N, 4, dtype=torch.int32, device=c5.device)  # [t, b, r, kk]
    for i in range(8):
        u |= c5[:, :, i].to(torch.int32) << (3 * i)
    return torch.stack([(u >> (8 * v)) & 255 for v in range(3)], dim=2).to(torch.uint8).reshape(N8, KB, 96).contiguous()


def unpack_codes(qdata: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """qdata -> codes [n, k] uint8 (inverse of pack_codes)."""
    if bits not in BYTES_PER_BLOCK:
        raise ValueError(f"layout: bits must be 3 or 4, got {bits!r}")
    N8, KB = n_tiles(n), k // BLOCK_K
    want = (N8 // 2, KB, 2 * BYTES_PER_BLOCK[bits])
    if qdata.dtype != torch.uint8 or tuple(qdata.shape) != want:
        raise ValueError(f"layout: qdata must be uint8 {want} for a {bits}-bit [{n}, {k}] weight, "
                         f"got {qdata.dtype} {tuple(qdata.shape)}")
    qdata = _tiles(qdata)
    if bits == 4:
        q = qdata.view(N8, KB, 4, TILE_N, 4)  # [t, b, s, r, kk]
        c5 = torch.stack([q & 15, q >> 4], dim=3).reshape(N8, KB, 8, TILE_N, 4)  # [t, b, i, r, kk]
    else:
        v = qdata.view(N8, KB, 3, TILE_N, 4).to(torch.int32)  # [t, b, vector, r, kk]
        u = v[:, :, 0] | (v[:, :, 1] << 8) | (v[:, :, 2] << 16)
        c5 = torch.stack([(u >> (3 * i)) & 7 for i in range(8)], dim=2).to(torch.uint8)  # [t, b, i, r, kk]
    return c5.permute(0, 3, 1, 2, 4).reshape(N8 * TILE_N, k)[:n].contiguous()


def pack_groups(t: torch.Tensor) -> torch.Tensor:
    """Per-(row, group) values [N, G] -> [N8, G, 8] (padded rows 0)."""
    if t.dim() != 2:
        raise ValueError(f"layout: per-group values must be [N, G], got {tuple(t.shape)}")
    N, G = t.shape
    N8 = n_tiles(N)
    out = t.new_zeros(N8 * TILE_N, G)
    out[:N] = t
    return out.view(N8, TILE_N, G).transpose(1, 2).contiguous()


def unpack_groups(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N8, G, 8] -> [n, G]."""
    if t.dim() != 3 or t.shape[2] != TILE_N or t.shape[0] != n_tiles(n):
        raise ValueError(f"layout: per-group values must be [{n_tiles(n)}, G, {TILE_N}] for N = {n}, "
                         f"got {tuple(t.shape)}")
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n].contiguous()


def dequantize_packed(qdata: torch.Tensor, scales: torch.Tensor, zeros, format: str, n: int, k: int,
                      group_size: int) -> torch.Tensor:
    """The float32 [n, k] weight (kernel column order) of packed data: the reference every kernel
    is tested against. ``scales`` is the nf4 absmax or the int scale; ``zeros`` None for nf4."""
    codes = unpack_codes(qdata, FORMAT_BITS[format], n, k)
    s = unpack_groups(scales, n).float().unsqueeze(-1)
    if format == "nf4":
        # Built per call (not NF4_TABLE.to(...)) so this also runs on fake tensors under torch.compile.
        table = torch.tensor(NF4_VALUES, dtype=torch.float32, device=codes.device)
        w = table[codes.long()].view(n, -1, group_size) * s
    else:
        z = unpack_groups(zeros, n).float().unsqueeze(-1)
        w = (codes.float().view(n, -1, group_size) - z) * s
    return w.reshape(n, k)
