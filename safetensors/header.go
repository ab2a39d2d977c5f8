package safetensors

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
)

// MaxHeaderSize is the largest header length, in bytes, that a file may
// declare. It matches the limit of the reference implementation.
const MaxHeaderSize = 100_000_000

// metadataKey is the header key that holds the file's metadata.
const metadataKey = "__metadata__"

// Sentinel errors, tested with errors.Is. Returned errors wrap them with the
// file, the tensor and the detail.
var (
	// ErrTruncated means a file is shorter than its header says.
	ErrTruncated = errors.New("safetensors: truncated")
	// ErrInvalidHeader means a header is malformed or inconsistent.
	ErrInvalidHeader = errors.New("safetensors: invalid header")
	// ErrNotFound means a tensor name is not in the file or checkpoint.
	ErrNotFound = errors.New("safetensors: tensor not found")
	// ErrDuplicate means a tensor name appears in two shards of a checkpoint
	// or twice in the input to Write. (A name twice in one header is an
	// ErrInvalidHeader.)
	ErrDuplicate = errors.New("safetensors: duplicate tensor")
)

// fileError puts a file name into an error's message after the package
// prefix, keeping err in the chain.
type fileError struct {
	name string
	err  error
}

func (e *fileError) Error() string {
	return "safetensors: " + e.name + ": " + strings.TrimPrefix(e.err.Error(), "safetensors: ")
}

func (e *fileError) Unwrap() error { return e.err }

// TensorInfo describes one tensor of a file.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int // empty for a scalar
	// Begin and End are the tensor's byte offsets into the data section,
	// which starts right after the header; End is exclusive.
	Begin, End int64
}

// NumElements returns the product of the dimensions (1 for a scalar).
func (t TensorInfo) NumElements() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// NumBytes returns the size of the tensor's data in bytes.
func (t TensorInfo) NumBytes() int64 {
	return int64(t.NumElements()) * int64(t.DType.Size())
}

// headerEntry is one tensor of the JSON header.
type headerEntry struct {
	DType       string  `json:"dtype"`
	Shape       []int64 `json:"shape"`
	DataOffsets []int64 `json:"data_offsets"`
}

// ParseHeader parses and validates the JSON header of a file whose data
// section is dataSize bytes long. It returns the tensors sorted by name and
// the metadata (nil if the header has none). Errors wrap ErrInvalidHeader
// and name the offending tensor. Tensors may leave gaps in the
// data section but may not overlap.
func ParseHeader(header []byte, dataSize int64) ([]TensorInfo, map[string]string, error) {
	if dataSize < 0 {
		return nil, nil, fmt.Errorf("%w: negative data size %d", ErrInvalidHeader, dataSize)
	}
	raw, err := splitObject(header)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrInvalidHeader, err)
	}
	var metadata map[string]string
	tensors := make([]TensorInfo, 0, len(raw))
	seen := make(map[string]bool, len(raw))
	for _, kv := range raw {
		if seen[kv.key] {
			return nil, nil, fmt.Errorf("%w: key %q appears twice", ErrInvalidHeader, kv.key)
		}
		seen[kv.key] = true
		if kv.key == metadataKey {
			if err := json.Unmarshal(kv.value, &metadata); err != nil {
				return nil, nil, fmt.Errorf("%w: %s must map strings to strings: %v", ErrInvalidHeader, metadataKey, err)
			}
			continue
		}
		t, err := parseEntry(kv.key, kv.value, dataSize)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: tensor %q: %v", ErrInvalidHeader, kv.key, err)
		}
		tensors = append(tensors, t)
	}
	if err := checkOverlap(tensors); err != nil {
		return nil, nil, err
	}
	slices.SortFunc(tensors, func(a, b TensorInfo) int { return strings.Compare(a.Name, b.Name) })
	return tensors, metadata, nil
}

type keyValue struct {
	key   string
	value json.RawMessage
}

// splitObject splits a JSON object into its members in order, keeping
// duplicate keys so that the caller can reject them.
func splitObject(data []byte) ([]keyValue, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil {
		return nil, err
	} else if tok != json.Delim('{') {
		return nil, fmt.Errorf("header is not a JSON object")
	}
	var kvs []keyValue
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string) // the decoder only yields string keys in an object
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		kvs = append(kvs, keyValue{key, v})
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("data after the header object")
	}
	return kvs, nil
}

// parseEntry parses and checks one tensor entry; its errors name no tensor.
func parseEntry(name string, value json.RawMessage, dataSize int64) (TensorInfo, error) {
	var e headerEntry
	if err := json.Unmarshal(value, &e); err != nil {
		return TensorInfo{}, err
	}
	dt, err := ParseDType(e.DType)
	if err != nil {
		return TensorInfo{}, fmt.Errorf("unknown dtype %q", e.DType)
	}
	if e.Shape == nil {
		return TensorInfo{}, fmt.Errorf("missing shape")
	}
	if len(e.DataOffsets) != 2 {
		return TensorInfo{}, fmt.Errorf("data_offsets has %d entries, want 2", len(e.DataOffsets))
	}
	begin, end := e.DataOffsets[0], e.DataOffsets[1]
	switch {
	case begin < 0 || begin > end:
		return TensorInfo{}, fmt.Errorf("data_offsets [%d, %d] out of order", begin, end)
	case end > dataSize:
		return TensorInfo{}, fmt.Errorf("data_offsets [%d, %d] out of range of the %d-byte data section (file truncated?)", begin, end, dataSize)
	}
	shape := make([]int, len(e.Shape))
	for i, d := range e.Shape {
		if d < 0 || d > math.MaxInt {
			return TensorInfo{}, fmt.Errorf("shape %v has invalid dimension %d", e.Shape, d)
		}
		shape[i] = int(d)
	}
	if n, ok := shapeBytes(e.Shape, int64(dt.Size())); !ok || n != end-begin {
		return TensorInfo{}, fmt.Errorf("%s %v needs %s bytes, data_offsets [%d, %d] hold %d",
			dt, e.Shape, bytesString(n, ok), begin, end, end-begin)
	}
	return TensorInfo{Name: name, DType: dt, Shape: shape, Begin: begin, End: end}, nil
}

// shapeBytes returns size times the product of shape, and false if that
// overflows int64. The dimensions must be non-negative.
func shapeBytes(shape []int64, size int64) (int64, bool) {
	if slices.Contains(shape, 0) {
		return 0, true
	}
	n := size
	for _, d := range shape {
		if n > math.MaxInt64/d {
			return 0, false
		}
		n *= d
	}
	return n, true
}

// bytesString formats a result of shapeBytes for an error message.
func bytesString(n int64, ok bool) string {
	if !ok {
		return "more than 2^63"
	}
	return strconv.FormatInt(n, 10)
}

// checkOverlap reports two tensors whose non-empty byte ranges overlap.
func checkOverlap(tensors []TensorInfo) error {
	byBegin := slices.Clone(tensors)
	slices.SortFunc(byBegin, func(a, b TensorInfo) int {
		if c := cmp.Compare(a.Begin, b.Begin); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	var prev *TensorInfo // the last non-empty tensor
	for i := range byBegin {
		t := &byBegin[i]
		if t.Begin == t.End {
			continue
		}
		if prev != nil && t.Begin < prev.End {
			return fmt.Errorf("%w: tensor %q [%d, %d] overlaps tensor %q [%d, %d]",
				ErrInvalidHeader, t.Name, t.Begin, t.End, prev.Name, prev.Begin, prev.End)
		}
		prev = t // sorted by Begin and not overlapping, so t ends last
	}
	return nil
}
