package safetensors

import "fmt"

// Range selects the indices [Start, End) along one dimension.
type Range struct{ Start, End int }

// ReadSlice reads the parts of the tensor called name that lie in the given
// index ranges along dimension dim, concatenated in order along that
// dimension, and returns them as a fresh row-major slice with the resulting
// shape. For example, with a packed experts tensor of shape [E, H, 2I] split over
// two ranks, rank 0's slices of both halves are
//
//	f.ReadSlice("experts", 2, Range{0, I/2}, Range{I, I + I/2})
//
// It reads only the bytes of the result, merging reads of pieces that are
// adjacent in the file: slicing dimension 0 is one read per range, and
// slicing the last dimension of an [A, B] tensor is at most A×len(ranges)
// reads. At least one range is required; empty ranges are allowed.
func (f *File) ReadSlice(name string, dim int, ranges ...Range) ([]byte, []int, error) {
	t, err := f.Info(name)
	if err != nil {
		return nil, nil, err
	}
	shape, pieces, err := slicePlan(t, dim, ranges)
	if err != nil {
		return nil, nil, &fileError{f.name, err}
	}
	if err := f.checkOpen(); err != nil {
		return nil, nil, err
	}
	var total int64
	for _, p := range pieces {
		total += p.n
	}
	out := make([]byte, total)
	pos := int64(0)
	for _, p := range pieces {
		if err := f.readAt(out[pos:pos+p.n], p.off); err != nil {
			return nil, nil, err
		}
		pos += p.n
	}
	return out, shape, nil
}

// piece is a run of n bytes at offset off of the data section.
type piece struct{ off, n int64 }

// slicePlan validates a slice of t and returns its shape and the runs of
// bytes to read, in output order, with adjacent runs merged.
func slicePlan(t TensorInfo, dim int, ranges []Range) ([]int, []piece, error) {
	if dim < 0 || dim >= len(t.Shape) {
		return nil, nil, fmt.Errorf("tensor %q: slice dimension %d out of range for shape %v", t.Name, dim, t.Shape)
	}
	if len(ranges) == 0 {
		return nil, nil, fmt.Errorf("tensor %q: slice of dimension %d has no ranges", t.Name, dim)
	}
	size := t.Shape[dim]
	sum := 0
	for _, r := range ranges {
		if r.Start < 0 || r.Start > r.End || r.End > size {
			return nil, nil, fmt.Errorf("tensor %q: range [%d, %d) out of bounds for dimension %d of size %d",
				t.Name, r.Start, r.End, dim, size)
		}
		sum += r.End - r.Start
	}
	shape := append([]int(nil), t.Shape...)
	shape[dim] = sum
	if t.NumBytes() == 0 { // other dimensions may be huge; there is nothing to read
		return shape, nil, nil
	}
	outer := int64(1) // number of blocks before dim
	for _, d := range t.Shape[:dim] {
		outer *= int64(d)
	}
	stride := int64(t.DType.Size()) // bytes per index of dim
	for _, d := range t.Shape[dim+1:] {
		stride *= int64(d)
	}
	block := int64(size) * stride
	var pieces []piece
	for o := int64(0); o < outer; o++ {
		for _, r := range ranges {
			p := piece{t.Begin + o*block + int64(r.Start)*stride, int64(r.End-r.Start) * stride}
			if p.n == 0 {
				continue
			}
			if last := len(pieces) - 1; last >= 0 && pieces[last].off+pieces[last].n == p.off {
				pieces[last].n += p.n
				continue
			}
			pieces = append(pieces, p)
		}
	}
	return shape, pieces, nil
}

// Extent is where the bytes of a tensor, or of a slice of one, lie in their file: runs of bytes at
// absolute file offsets, in the order of the result. A loader that reads the file itself (pread,
// O_DIRECT) reads exactly these bytes and nothing else.
type Extent struct {
	Path   string // the file's name as opened (its path for Open and OpenCheckpoint)
	DType  DType
	Shape  []int   // the shape of the result
	Pieces []Piece // in output order, adjacent runs merged
}

// Piece is a run of N bytes at offset Off of a file.
type Piece struct{ Off, N int64 }

// Bytes is the total size of e's pieces.
func (e Extent) Bytes() int64 {
	var n int64
	for _, p := range e.Pieces {
		n += p.N
	}
	return n
}

// Locate returns where the tensor called name lies in the file: the whole tensor for dim < 0, else the
// index ranges along dim as ReadSlice would read them. It reads nothing.
func (f *File) Locate(name string, dim int, ranges ...Range) (Extent, error) {
	t, err := f.Info(name)
	if err != nil {
		return Extent{}, err
	}
	e := Extent{Path: f.name, DType: t.DType}
	if dim < 0 {
		e.Shape = append([]int(nil), t.Shape...)
		if t.End > t.Begin {
			e.Pieces = []Piece{{f.base + t.Begin, t.End - t.Begin}}
		}
		return e, nil
	}
	shape, pieces, err := slicePlan(t, dim, ranges)
	if err != nil {
		return Extent{}, &fileError{f.name, err}
	}
	e.Shape = shape
	e.Pieces = make([]Piece, len(pieces))
	for i, p := range pieces {
		e.Pieces[i] = Piece{f.base + p.off, p.n}
	}
	return e, nil
}

// Locate returns where a tensor, or index ranges along dim of it (dim >= 0), lie in their file; see
// File.Locate.
func (c *Checkpoint) Locate(name string, dim int, ranges ...Range) (Extent, error) {
	f, err := c.file(name)
	if err != nil {
		return Extent{}, err
	}
	return f.Locate(name, dim, ranges...)
}
