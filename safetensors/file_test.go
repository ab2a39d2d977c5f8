package safetensors_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/safetensors"
)

var allDTypes = []safetensors.DType{
	safetensors.BF16, safetensors.F16, safetensors.F32, safetensors.F64,
	safetensors.F8_E4M3, safetensors.F8_E5M2, safetensors.I64, safetensors.I32,
	safetensors.I16, safetensors.I8, safetensors.U8, safetensors.BOOL,
}

func TestDType(t *testing.T) {
	sizes := []int{2, 2, 4, 8, 1, 1, 8, 4, 2, 1, 1, 1}
	for i, dt := range allDTypes {
		if got, err := safetensors.ParseDType(dt.String()); got != dt || err != nil {
			t.Errorf("ParseDType(%q) = %v, %v, want %v, nil", dt.String(), got, err, dt)
		}
		if got := dt.Size(); got != sizes[i] {
			t.Errorf("%v.Size() = %d, want %d", dt, got, sizes[i])
		}
	}
	if got, err := safetensors.ParseDType("bf16"); err == nil {
		t.Errorf("ParseDType(%q) = %v, nil, want an error", "bf16", got)
	}
	if got := safetensors.DType(0).String(); got != "DType(0)" {
		t.Errorf("DType(0).String() = %q, want %q", got, "DType(0)")
	}
}

// randomTensors returns one tensor of every dtype, plus a scalar and an
// empty tensor, with random data.
func randomTensors(r *rand.Rand) []safetensors.Tensor {
	var ts []safetensors.Tensor
	for _, dt := range allDTypes {
		ts = append(ts, randomTensor(r, "t."+dt.String(), dt, []int{2, 3}))
	}
	ts = append(ts, randomTensor(r, "scalar", safetensors.F32, []int{}))
	ts = append(ts, randomTensor(r, "empty", safetensors.BF16, []int{4, 0}))
	return ts
}

func randomTensor(r *rand.Rand, name string, dt safetensors.DType, shape []int) safetensors.Tensor {
	n := dt.Size()
	for _, d := range shape {
		n *= d
	}
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	return safetensors.Tensor{Name: name, DType: dt, Shape: shape, Data: data}
}

func TestRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	tensors := randomTensors(r)
	meta := map[string]string{"format": "pt", "note": `quotes " and <html>`}
	path := filepath.Join(t.TempDir(), "model.safetensors")
	if err := safetensors.WriteFile(path, tensors, meta); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if hl := binary.LittleEndian.Uint64(raw); hl%8 != 0 {
		t.Errorf("header length = %d, want a multiple of 8", hl)
	}
	mapped, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer mapped.Close()
	viaReader, err := safetensors.OpenSource(path, bytes.NewReader(raw), int64(len(raw)))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []*safetensors.File{mapped, viaReader} {
		if got := f.Metadata(); !maps.Equal(got, meta) {
			t.Errorf("Metadata() = %v, want %v", got, meta)
		}
		infos := f.Tensors()
		if len(infos) != len(tensors) || !slices.IsSortedFunc(infos, func(a, b safetensors.TensorInfo) int {
			return strings.Compare(a.Name, b.Name)
		}) {
			t.Fatalf("Tensors() = %v, want %d tensors sorted by name", infos, len(tensors))
		}
		for _, want := range tensors {
			info, err := f.Info(want.Name)
			if err != nil || info.DType != want.DType || !slices.Equal(info.Shape, want.Shape) || info.NumBytes() != int64(len(want.Data)) {
				t.Errorf("Info(%q) = %+v, %v, want %v %v", want.Name, info, err, want.DType, want.Shape)
			}
			got, err := f.ReadAll(want.Name)
			if err != nil || !bytes.Equal(got, want.Data) {
				t.Errorf("ReadAll(%q) = %x, %v, want %x", want.Name, got, err, want.Data)
			}
		}
		if _, err := f.Info("missing"); !errors.Is(err, safetensors.ErrNotFound) {
			t.Errorf("Info(%q) = %v, want %v", "missing", err, safetensors.ErrNotFound)
		}
	}
	if err := mapped.Close(); err != nil {
		t.Errorf("Close() = %v, want nil", err)
	}
	if err := mapped.Close(); err != nil {
		t.Errorf("second Close() = %v, want nil", err)
	}
	if _, err := mapped.ReadAll("scalar"); !errors.Is(err, os.ErrClosed) {
		t.Errorf("ReadAll after Close = %v, want %v", err, os.ErrClosed)
	}
}

func TestOpenFileEdgeCases(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.safetensors")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := safetensors.Open(empty); !errors.Is(err, safetensors.ErrTruncated) {
		t.Errorf("Open(empty file) = %v, want %v", err, safetensors.ErrTruncated)
	}
	// A file whose data section is empty maps and reads fine.
	noData := filepath.Join(dir, "nodata.safetensors")
	if err := safetensors.WriteFile(noData, []safetensors.Tensor{{Name: "e", DType: safetensors.F32, Shape: []int{0}}}, nil); err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.Open(noData)
	if err != nil {
		t.Fatalf("Open(%s) = %v, want nil", noData, err)
	}
	defer f.Close()
	if b, err := f.ReadAll("e"); len(b) != 0 || err != nil {
		t.Errorf("ReadAll(%q) = %x, %v, want empty, nil", "e", b, err)
	}
	if _, err := safetensors.Open(filepath.Join(dir, "nope")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open(missing) = %v, want %v", err, os.ErrNotExist)
	}
}

func TestWriteErrors(t *testing.T) {
	f32 := safetensors.F32Tensor("w", []int{2}, []float32{1, 2})
	tests := []struct {
		name    string
		tensors []safetensors.Tensor
		err     error
	}{
		{"short data", []safetensors.Tensor{safetensors.F32Tensor("w", []int{3}, []float32{1, 2})}, nil},
		{"negative dim", []safetensors.Tensor{{Name: "w", DType: safetensors.U8, Shape: []int{-1}}}, nil},
		{"invalid dtype", []safetensors.Tensor{{Name: "w", Shape: []int{0}}}, nil},
		{"metadata name", []safetensors.Tensor{{Name: "__metadata__", DType: safetensors.U8, Shape: []int{0}}}, nil},
		{"duplicate", []safetensors.Tensor{f32, f32}, safetensors.ErrDuplicate},
	}
	for _, tt := range tests {
		err := safetensors.Write(io.Discard, tt.tensors, nil)
		if err == nil || (tt.err != nil && !errors.Is(err, tt.err)) {
			t.Errorf("%s: Write(...) = %v, want an error (%v)", tt.name, err, tt.err)
		}
	}
	path := filepath.Join(t.TempDir(), "bad.safetensors")
	if err := safetensors.WriteFile(path, tests[0].tensors, nil); err == nil {
		t.Errorf("WriteFile(short data) = nil, want an error")
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "*")); len(left) != 0 {
		t.Errorf("WriteFile(short data) left %v, want nothing", left)
	}
}
