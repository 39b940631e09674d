"""Canonical Huffman coding of small-alphabet symbol streams (cluster indices).

Only the code length of each symbol is stored: canonical codes are rebuilt from
the lengths (codes of one length are consecutive integers, shorter codes first,
ties by symbol), so no tree goes into the artifact (Deep Compression, Han et
al. 2016, codes cluster indices this way). Codes are held as uint64, which
bounds lengths at 64 bits: a Huffman code that long needs more than Fib(64),
about 1e13, symbols. Bits are written first bit first,
high bit of each byte first, and the last byte is zero-padded.
"""

from __future__ import annotations

import heapq

import numpy as np

TABLE_BITS = 16  # decode codes up to this long with one table lookup; longer ones continue bit by bit


def code_lengths(frequencies: np.ndarray) -> np.ndarray:
    """Huffman code length of each symbol (0 for a symbol that never occurs; 1 when only one occurs).

    Ties are broken by the order the nodes were made, so the lengths are deterministic.
    """
    frequencies = np.asarray(frequencies, dtype=np.int64)
    lengths = np.zeros(frequencies.size, dtype=np.int64)
    present = [int(symbol) for symbol in np.flatnonzero(frequencies)]
    if len(present) == 1:
        lengths[present[0]] = 1
        return lengths
    heap = [(int(frequencies[symbol]), order, [symbol]) for order, symbol in enumerate(present)]
    heapq.heapify(heap)
    order = len(heap)
    while len(heap) > 1:
        weight_a, _, symbols_a = heapq.heappop(heap)
        weight_b, _, symbols_b = heapq.heappop(heap)
        lengths[symbols_a + symbols_b] += 1
        heapq.heappush(heap, (weight_a + weight_b, order, symbols_a + symbols_b))
        order += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (as an integer, ``lengths[s]`` bits wide; 0 where the length is 0)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code += 1
        previous = int(lengths[symbol])
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The bitstream (uint8, ceil(sum of the code lengths / 8) bytes) of ``symbols`` under the canonical code of ``lengths``."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)[symbols]
    widths = lengths[symbols]
    starts = np.cumsum(widths) - widths
    total = int(widths.sum())
    # bit j of a code (j = 0 the first written) is bit (width - 1 - j) of the integer
    owner = np.repeat(np.arange(symbols.size), widths)
    position = np.arange(total) - starts[owner]
    shift = (widths[owner] - 1 - position).astype(np.uint64)
    bits = ((codes[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits)


def decode(stream: np.ndarray, lengths: np.ndarray, count: int) -> np.ndarray:
    """Inverse of ``encode``: the first ``count`` symbols (int64) of ``stream``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    longest = int(lengths.max())
    window = min(longest, TABLE_BITS)
    bits = np.unpackbits(np.asarray(stream, dtype=np.uint8))
    bits = np.concatenate([bits, np.zeros(window, dtype=np.uint8)])
    nbits = bits.size - window
    # value of the ``window`` bits starting at every position
    windows = np.zeros(nbits, dtype=np.int64)
    for offset in range(window):
        windows = (windows << 1) | bits[offset : offset + nbits]
    # table: window value -> (symbol, length) for codes no longer than the window; length 0 marks a longer code
    codes = canonical_codes(lengths)
    table_symbol = np.zeros(1 << window, dtype=np.int64)
    table_length = np.zeros(1 << window, dtype=np.int64)
    for symbol in np.flatnonzero((lengths > 0) & (lengths <= window)):
        spare = window - int(lengths[symbol])
        first = int(codes[symbol]) << spare
        table_symbol[first : first + (1 << spare)] = symbol
        table_length[first : first + (1 << spare)] = lengths[symbol]
    # canonical decoding of longer codes: per length, the first code and the symbols in code order
    order = sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s))
    by_length: dict[int, tuple[int, list[int]]] = {}
    for symbol in order:
        length = int(lengths[symbol])
        by_length.setdefault(length, (int(codes[symbol]), []))[1].append(int(symbol))
    windows_list, bit_list = windows.tolist(), bits.tolist()
    symbol_list, length_list = table_symbol.tolist(), table_length.tolist()
    out = [0] * count
    position = 0
    for i in range(count):
        value = windows_list[position]
        length = length_list[value]
        if length:
            out[i] = symbol_list[value]
            position += length
            continue
        code, length = value, window
        while True:
            first, symbols = by_length.get(length, (0, []))
            if 0 <= code - first < len(symbols):
                out[i] = symbols[code - first]
                break
            code = (code << 1) | bit_list[position + length]
            length += 1
        position += length
    return np.asarray(out, dtype=np.int64)
