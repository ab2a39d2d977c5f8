package safetensors_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/safetensors"
)

// naiveSlice slices a full row-major tensor element by element: each output
// element's index is mapped back to its source index.
func naiveSlice(data []byte, shape []int, size, dim int, ranges []safetensors.Range) ([]byte, []int) {
	var src []int // output index along dim -> source index
	for _, r := range ranges {
		for i := r.Start; i < r.End; i++ {
			src = append(src, i)
		}
	}
	outShape := slices.Clone(shape)
	outShape[dim] = len(src)
	n := 1
	for _, d := range outShape {
		n *= d
	}
	out := make([]byte, 0, n*size)
	idx := make([]int, len(shape))
	for e := 0; e < n; e++ {
		rem := e
		for k := len(shape) - 1; k >= 0; k-- {
			idx[k] = rem % outShape[k]
			rem /= outShape[k]
		}
		off := 0
		for k := range shape {
			i := idx[k]
			if k == dim {
				i = src[i]
			}
			off = off*shape[k] + i
		}
		out = append(out, data[off*size:(off+1)*size]...)
	}
	return out, outShape
}

// countingReader counts the ReadAt calls and bytes read through it.
type countingReader struct {
	r            io.ReaderAt
	calls, bytes int64
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.calls++
	n, err := c.r.ReadAt(p, off)
	c.bytes += int64(n)
	return n, err
}

func TestReadSliceRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	dts := []safetensors.DType{safetensors.U8, safetensors.BF16, safetensors.F32}
	var tensors []safetensors.Tensor
	for rank := 1; rank <= 4; rank++ {
		for _, dt := range dts {
			shape := make([]int, rank)
			for i := range shape {
				shape[i] = 1 + r.IntN(7)
			}
			name := dt.String() + "." + strings.Repeat("x", rank)
			tensors = append(tensors, randomTensor(r, name, dt, shape))
		}
	}
	var buf bytes.Buffer
	if err := safetensors.Write(&buf, tensors, nil); err != nil {
		t.Fatal(err)
	}
	counter := &countingReader{r: bytes.NewReader(buf.Bytes())}
	f, err := safetensors.OpenSource("random", counter, int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tensors {
		for range 50 {
			dim := r.IntN(len(tt.Shape))
			ranges := make([]safetensors.Range, 1+r.IntN(4))
			for i := range ranges {
				a, b := r.IntN(tt.Shape[dim]+1), r.IntN(tt.Shape[dim]+1)
				ranges[i] = safetensors.Range{Start: min(a, b), End: max(a, b)}
			}
			counter.bytes = 0
			got, gotShape, err := f.ReadSlice(tt.Name, dim, ranges...)
			want, wantShape := naiveSlice(tt.Data, tt.Shape, tt.DType.Size(), dim, ranges)
			if err != nil || !bytes.Equal(got, want) || !slices.Equal(gotShape, wantShape) {
				t.Fatalf("ReadSlice(%q %v, %d, %v) = %x %v, %v, want %x %v",
					tt.Name, tt.Shape, dim, ranges, got, gotShape, err, want, wantShape)
			}
			if counter.bytes != int64(len(want)) {
				t.Fatalf("ReadSlice(%q %v, %d, %v) read %d bytes, want %d",
					tt.Name, tt.Shape, dim, ranges, counter.bytes, len(want))
			}
		}
	}
}

func TestReadSliceCountsReads(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	tensors := []safetensors.Tensor{
		randomTensor(r, "vec", safetensors.F32, []int{100}),
		randomTensor(r, "mat", safetensors.BF16, []int{16, 32}),
		randomTensor(r, "gate_up_proj", safetensors.BF16, []int{4, 64, 128}),
		{Name: "empty", DType: safetensors.F32, Shape: []int{1 << 40, 1 << 20, 0}},
	}
	var buf bytes.Buffer
	if err := safetensors.Write(&buf, tensors, nil); err != nil {
		t.Fatal(err)
	}
	counter := &countingReader{r: bytes.NewReader(buf.Bytes())}
	f, err := safetensors.OpenSource("count", counter, int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	headerLen := int64(binary.LittleEndian.Uint64(buf.Bytes()))
	if counter.bytes != 8+headerLen || counter.calls != 2 {
		t.Errorf("OpenSource(...) read %d bytes in %d calls, want 8+%d in 2", counter.bytes, counter.calls, headerLen)
	}
	type rg = safetensors.Range
	tests := []struct {
		name   string
		dim    int
		ranges []rg
		calls  int64
	}{
		{"vec", 0, []rg{{10, 20}}, 1},
		{"vec", 0, []rg{{10, 20}, {20, 30}}, 1}, // adjacent: merged
		{"vec", 0, []rg{{10, 20}, {40, 50}}, 2},
		{"mat", 0, []rg{{2, 4}, {8, 9}}, 2},                     // dim 0: one read per range
		{"mat", 1, []rg{{0, 8}, {16, 24}}, 16 * 2},              // last dim: rows × ranges
		{"mat", 1, []rg{{0, 8}, {8, 16}}, 16},                   // adjacent ranges merge within a row
		{"mat", 1, []rg{{0, 32}}, 1},                            // whole rows merge across rows
		{"mat", 1, []rg{{4, 4}}, 0},                             // empty
		{"gate_up_proj", 2, []rg{{0, 8}, {64, 72}}, 4 * 64 * 2}, // rank 0 of 8: gate and up
		{"gate_up_proj", 1, []rg{{0, 32}}, 4},
		{"gate_up_proj", 0, []rg{{1, 3}}, 1},
		{"empty", 1, []rg{{0, 1 << 20}}, 0}, // no loop over the 2^40 outer blocks
	}
	for _, tt := range tests {
		counter.calls, counter.bytes = 0, 0
		got, shape, err := f.ReadSlice(tt.name, tt.dim, tt.ranges...)
		if err != nil {
			t.Fatalf("ReadSlice(%q, %d, %v) = %v", tt.name, tt.dim, tt.ranges, err)
		}
		if counter.calls != tt.calls || counter.bytes != int64(len(got)) {
			t.Errorf("ReadSlice(%q, %d, %v) = %d reads of %d bytes, want %d reads of %d bytes",
				tt.name, tt.dim, tt.ranges, counter.calls, counter.bytes, tt.calls, len(got))
		}
		n := 2
		if tt.name == "vec" || tt.name == "empty" {
			n = 4
		}
		for _, d := range shape {
			n *= d
		}
		if n != len(got) {
			t.Errorf("ReadSlice(%q, %d, %v) = %d bytes with shape %v, want %d", tt.name, tt.dim, tt.ranges, len(got), shape, n)
		}
	}
	counter.calls, counter.bytes = 0, 0
	if _, err := f.ReadAll("mat"); err != nil || counter.bytes != 16*32*2 || counter.calls != 1 {
		t.Errorf("ReadAll(%q) = %d reads of %d bytes, %v, want 1 of %d", "mat", counter.calls, counter.bytes, err, 16*32*2)
	}
}

func TestReadSliceErrors(t *testing.T) {
	var buf bytes.Buffer
	if err := safetensors.Write(&buf, []safetensors.Tensor{safetensors.F32Tensor("w", []int{2, 3}, make([]float32, 6))}, nil); err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.OpenSource("m", bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	type rg = safetensors.Range
	tests := []struct {
		name     string
		dim      int
		ranges   []rg
		contains string
	}{
		{"w", 2, []rg{{0, 1}}, `tensor "w": slice dimension 2 out of range for shape [2 3]`},
		{"w", -1, []rg{{0, 1}}, `slice dimension -1 out of range`},
		{"w", 1, nil, `tensor "w": slice of dimension 1 has no ranges`},
		{"w", 1, []rg{{0, 4}}, `tensor "w": range [0, 4) out of bounds for dimension 1 of size 3`},
		{"w", 0, []rg{{2, 1}}, `range [2, 1) out of bounds`},
		{"w", 0, []rg{{-1, 1}}, `range [-1, 1) out of bounds`},
		{"x", 0, []rg{{0, 1}}, `tensor not found: "x"`},
	}
	for _, tt := range tests {
		_, _, err := f.ReadSlice(tt.name, tt.dim, tt.ranges...)
		if err == nil || !strings.Contains(err.Error(), tt.contains) {
			t.Errorf("ReadSlice(%q, %d, %v) = %v, want error containing %q", tt.name, tt.dim, tt.ranges, err, tt.contains)
		}
	}
	if _, _, err := f.ReadSlice("x", 0, rg{0, 1}); !errors.Is(err, safetensors.ErrNotFound) {
		t.Errorf("ReadSlice(%q, ...) = %v, want %v", "x", err, safetensors.ErrNotFound)
	}
}
