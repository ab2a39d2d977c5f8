package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"unicode/utf8"
)

// Tensor is a tensor to write: its name, dtype, shape and little-endian
// row-major data.
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
}

// Write writes a safetensors file to w: the header lists the tensors sorted
// by name, the data follows in that order without gaps, and the header is
// padded with spaces to a multiple of 8 bytes, as the reference
// implementation does. The metadata may be nil. Write checks that every
// tensor has a valid dtype and shape, a unique name, and len(Data) bytes
// matching its shape.
func Write(w io.Writer, tensors []Tensor, metadata map[string]string) error {
	sorted := slices.Clone(tensors)
	slices.SortFunc(sorted, func(a, b Tensor) int { return strings.Compare(a.Name, b.Name) })

	var h bytes.Buffer
	h.WriteByte('{')
	if len(metadata) > 0 {
		h.WriteString(`"` + metadataKey + `":`)
		h.Write(mustJSON(metadata)) // encoding/json sorts map keys
	}
	var offset int64
	for i, t := range sorted {
		if err := checkTensor(t); err != nil {
			return err
		}
		if i > 0 && t.Name == sorted[i-1].Name {
			return fmt.Errorf("%w: %q given twice to Write", ErrDuplicate, t.Name)
		}
		if h.Len() > 1 {
			h.WriteByte(',')
		}
		end := offset + int64(len(t.Data))
		fmt.Fprintf(&h, `%s:{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}`,
			mustJSON(t.Name), t.DType, mustJSON(nonNil(t.Shape)), offset, end)
		offset = end
	}
	h.WriteByte('}')
	for h.Len()%8 != 0 {
		h.WriteByte(' ')
	}

	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(h.Len()))
	if _, err := w.Write(lenBuf[:]); err != nil {
		return err
	}
	if _, err := w.Write(h.Bytes()); err != nil {
		return err
	}
	for _, t := range sorted {
		if _, err := w.Write(t.Data); err != nil {
			return err
		}
	}
	return nil
}

// checkTensor checks one tensor given to Write.
func checkTensor(t Tensor) error {
	if t.Name == metadataKey {
		return fmt.Errorf("safetensors: a tensor may not be called %q", metadataKey)
	}
	if !utf8.ValidString(t.Name) {
		return fmt.Errorf("safetensors: tensor name %q is not valid UTF-8", t.Name)
	}
	if !t.DType.valid() {
		return fmt.Errorf("safetensors: tensor %q: invalid dtype %s", t.Name, t.DType)
	}
	shape := make([]int64, len(t.Shape))
	for i, d := range t.Shape {
		if d < 0 {
			return fmt.Errorf("safetensors: tensor %q: negative dimension in shape %v", t.Name, t.Shape)
		}
		shape[i] = int64(d)
	}
	if n, ok := shapeBytes(shape, int64(t.DType.Size())); !ok || n != int64(len(t.Data)) {
		return fmt.Errorf("safetensors: tensor %q: %s %v needs %s bytes, Data has %d",
			t.Name, t.DType, t.Shape, bytesString(n, ok), len(t.Data))
	}
	return nil
}

// mustJSON encodes strings, string maps and int slices, which cannot fail.
func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func nonNil(shape []int) []int {
	if shape == nil {
		return []int{}
	}
	return shape
}

// WriteFile writes a safetensors file to path through a temporary file in
// the same directory, renamed into place once complete, so readers never see
// a partial file. See Write.
func WriteFile(path string, tensors []Tensor, metadata map[string]string) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := Write(tmp, tensors, metadata); err != nil {
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	return nil
}

// F32Tensor returns a float32 tensor holding v. Write rejects it if len(v)
// does not match the shape.
func F32Tensor(name string, shape []int, v []float32) Tensor {
	data := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(x))
	}
	return Tensor{Name: name, DType: F32, Shape: shape, Data: data}
}

// I64Tensor returns an int64 tensor holding v. Write rejects it if len(v)
// does not match the shape.
func I64Tensor(name string, shape []int, v []int64) Tensor {
	data := make([]byte, 8*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint64(data[8*i:], uint64(x))
	}
	return Tensor{Name: name, DType: I64, Shape: shape, Data: data}
}
