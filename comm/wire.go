package comm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// The ring's wire format, all integers little-endian.
//
// A connection starts with a hello from each side (the dialer's first):
//
//	magic "TPFR" | version uint16 | 0 uint16 | rank uint32 | world size uint32
//
// Then only the dialing rank r sends, to rank r+1, a stream of frames: a 32-byte header, then count
// elements of the wire dtype (or, for an abort frame, count bytes of error text):
//
//	seq uint64 | op uint8 | dtype uint8 | wire uint8 | 0 uint8 | root uint32 | total uint64 |
//	count uint32 | 0 uint32
//
// seq numbers the collectives on the communicator, op is the collective, dtype and total the caller's
// buffer (AllGather's send), root Broadcast's root. The receiver expects an exact header and fails on
// any other, so peers that are out of step or disagree on a buffer are caught before their data is used.
const (
	helloMagic   = "TPFR"
	helloVersion = 1
	helloSize    = 16
	headerSize   = 32

	maxAbortText = 1024 // longest error text an abort frame carries
)

// Wire codes of the collectives.
const (
	codeAllReduce uint8 = 1 + iota
	codeAllGather
	codeBroadcast
	codeBarrier
	codeAbort uint8 = 0xff // the sender's collective failed; the payload is its error text
)

// errWrongPeer reports a hello from a process that is not the expected rank of this ring.
var errWrongPeer = errors.New("wrong peer")

func putHello(b []byte, rank, size int) {
	copy(b, helloMagic)
	binary.LittleEndian.PutUint16(b[4:], helloVersion)
	binary.LittleEndian.PutUint16(b[6:], 0)
	binary.LittleEndian.PutUint32(b[8:], uint32(rank))
	binary.LittleEndian.PutUint32(b[12:], uint32(size))
}

// checkHello checks that hello b comes from rank wantRank of a ring of wantSize ranks.
func checkHello(b []byte, wantRank, wantSize int) error {
	if string(b[:4]) != helloMagic {
		return fmt.Errorf("%w: not a tpfleet ring (magic %q)", errWrongPeer, b[:4])
	}
	if v := binary.LittleEndian.Uint16(b[4:]); v != helloVersion {
		return fmt.Errorf("%w: protocol version %d, want %d", errWrongPeer, v, helloVersion)
	}
	rank, size := int(binary.LittleEndian.Uint32(b[8:])), int(binary.LittleEndian.Uint32(b[12:]))
	if rank != wantRank || size != wantSize {
		return fmt.Errorf("%w: it is rank %d of %d, want rank %d of %d", errWrongPeer, rank, size, wantRank, wantSize)
	}
	return nil
}

// exchangeHello sends this rank's hello on rw and checks the peer's; the dialer speaks first.
func exchangeHello(rw io.ReadWriter, dialer bool, rank, size, wantRank int) error {
	var mine, theirs [helloSize]byte
	putHello(mine[:], rank, size)
	if dialer {
		if _, err := rw.Write(mine[:]); err != nil {
			return err
		}
	}
	if _, err := io.ReadFull(rw, theirs[:]); err != nil {
		return err
	}
	if !dialer {
		if _, err := rw.Write(mine[:]); err != nil {
			return err
		}
	}
	return checkHello(theirs[:], wantRank, size)
}

// header is a frame header.
type header struct {
	seq             uint64
	op, dtype, wire uint8
	root            uint32
	total           uint64
	count           uint32
}

func (h header) put(b []byte) {
	binary.LittleEndian.PutUint64(b[0:], h.seq)
	b[8], b[9], b[10], b[11] = h.op, h.dtype, h.wire, 0
	binary.LittleEndian.PutUint32(b[12:], h.root)
	binary.LittleEndian.PutUint64(b[16:], h.total)
	binary.LittleEndian.PutUint32(b[24:], h.count)
	binary.LittleEndian.PutUint32(b[28:], 0)
}

func readHeader(b []byte) header {
	return header{
		seq:   binary.LittleEndian.Uint64(b[0:]),
		op:    b[8],
		dtype: b[9],
		wire:  b[10],
		root:  binary.LittleEndian.Uint32(b[12:]),
		total: binary.LittleEndian.Uint64(b[16:]),
		count: binary.LittleEndian.Uint32(b[24:]),
	}
}

// with returns h for a frame of count elements.
func (h header) with(count int) header {
	h.count = uint32(count)
	return h
}

// payloadSize is the number of bytes that follow the header.
func (h header) payloadSize() int {
	if h.op == codeAbort {
		return int(h.count)
	}
	return int(h.count) * DType(h.wire).Size()
}

// String describes the collective a header belongs to, as "all-reduce #3 float32[1024]".
func (h header) String() string {
	s := fmt.Sprintf("%s #%d", codeName(h.op), h.seq)
	if h.op != codeBarrier {
		s += fmt.Sprintf(" %s[%d]", DType(h.dtype), h.total)
	}
	if h.op == codeBroadcast {
		s += fmt.Sprintf(" from root %d", h.root)
	}
	return s
}

func codeName(code uint8) string {
	switch code {
	case codeAllReduce:
		return OpAllReduce
	case codeAllGather:
		return OpAllGather
	case codeBroadcast:
		return OpBroadcast
	case codeBarrier:
		return OpBarrier
	case codeAbort:
		return "abort"
	}
	return fmt.Sprintf("op %d", code)
}

// putF32 encodes src into dst (4 bytes each).
func putF32(dst []byte, src []float32) {
	for i, x := range src {
		binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(x))
	}
}

// addF32 adds the float32 values encoded in src to dst.
func addF32(dst []float32, src []byte) {
	for i := range dst {
		dst[i] += math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
	}
}

// putElems encodes elements [lo, hi) of host buffer b into dst in b's dtype.
func putElems(dst []byte, b Buffer, lo, hi int) {
	switch b := b.(type) {
	case HostF32:
		putF32(dst, b[lo:hi])
	case HostBF16:
		for i, x := range b[lo:hi] {
			binary.LittleEndian.PutUint16(dst[2*i:], x)
		}
	}
}

// getElems decodes src, encoded in host buffer b's dtype, into b from element lo.
func getElems(b Buffer, lo int, src []byte) {
	switch b := b.(type) {
	case HostF32:
		for i := range len(src) / 4 {
			b[lo+i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
		}
	case HostBF16:
		for i := range len(src) / 2 {
			b[lo+i] = binary.LittleEndian.Uint16(src[2*i:])
		}
	}
}
