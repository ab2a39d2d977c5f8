package safetensors_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/safetensors"
)

var parseHeaderTests = []struct {
	name     string
	header   string
	dataSize int64
	err      error  // nil: valid
	contains string // a substring the error must contain
}{
	{"empty object", `{}`, 0, nil, ""},
	{"metadata only", `{"__metadata__":{"format":"pt"}}`, 0, nil, ""},
	{"gap allowed", `{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[8,10]}}`, 16, nil, ""},
	{"scalar", `{"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}`, 8, nil, ""},
	{"empty tensor inside another", `{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]}}`, 8, nil, ""},
	{"trailing spaces", `{}      `, 0, nil, ""},

	{"bad JSON", `{"a":`, 0, safetensors.ErrInvalidHeader, "EOF"},
	{"empty header", ``, 0, safetensors.ErrInvalidHeader, "EOF"},
	{"not an object", `[1,2]`, 0, safetensors.ErrInvalidHeader, "not a JSON object"},
	{"data after object", `{} {}`, 0, safetensors.ErrInvalidHeader, "after the header"},
	{"entry not an object", `{"w":[1]}`, 0, safetensors.ErrInvalidHeader, `tensor "w"`},
	{"bad dtype", `{"w":{"dtype":"Q4_K","shape":[1],"data_offsets":[0,1]}}`, 1, safetensors.ErrInvalidHeader, `tensor "w": unknown dtype "Q4_K"`},
	{"missing shape", `{"w":{"dtype":"U8","data_offsets":[0,1]}}`, 1, safetensors.ErrInvalidHeader, `tensor "w": missing shape`},
	{"negative dim", `{"w":{"dtype":"U8","shape":[-2,-2],"data_offsets":[0,4]}}`, 4, safetensors.ErrInvalidHeader, `tensor "w": shape [-2 -2] has invalid dimension -2`},
	{"fractional dim", `{"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}`, 4, safetensors.ErrInvalidHeader, `tensor "w"`},
	{"size mismatch", `{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}`, 16, safetensors.ErrInvalidHeader, `tensor "w": F32 [2 2] needs 16 bytes, data_offsets [0, 12] hold 12`},
	{"size overflow", `{"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,16]}}`, 16, safetensors.ErrInvalidHeader, `tensor "w": F32 [4294967296 4294967296 4] needs more than 2^63 bytes`},
	{"product wraps to zero", `{"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}`, 16, safetensors.ErrInvalidHeader, `tensor "w"`},
	{"one offset", `{"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}}`, 1, safetensors.ErrInvalidHeader, `tensor "w": data_offsets has 1 entries, want 2`},
	{"end past data", `{"w":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}`, 8, safetensors.ErrInvalidHeader, `tensor "w": data_offsets [0, 16] out of range of the 8-byte data section (file truncated?)`},
	{"begin after end", `{"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}}`, 8, safetensors.ErrInvalidHeader, `tensor "w": data_offsets [8, 4] out of order`},
	{"negative begin", `{"w":{"dtype":"U8","shape":[4],"data_offsets":[-4,0]}}`, 8, safetensors.ErrInvalidHeader, `tensor "w": data_offsets [-4, 0] out of order`},
	{"overlap", `{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}`, 16, safetensors.ErrInvalidHeader, `tensor "b" [4, 12] overlaps tensor "a" [0, 8]`},
	{"same range", `{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[8],"data_offsets":[0,8]}}`, 8, safetensors.ErrInvalidHeader, `overlaps`},
	{"duplicate name", `{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, 2, safetensors.ErrInvalidHeader, `key "a" appears twice`},
	{"metadata not strings", `{"__metadata__":{"n":1}}`, 0, safetensors.ErrInvalidHeader, `__metadata__ must map strings to strings`},
	{"negative data size", `{}`, -1, safetensors.ErrInvalidHeader, `negative data size`},
}

func TestParseHeader(t *testing.T) {
	for _, tt := range parseHeaderTests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := safetensors.ParseHeader([]byte(tt.header), tt.dataSize)
			if tt.err == nil {
				if err != nil {
					t.Fatalf("ParseHeader(%#q, %d) = %v, want no error", tt.header, tt.dataSize, err)
				}
				return
			}
			if !errors.Is(err, tt.err) || !strings.Contains(err.Error(), tt.contains) {
				t.Fatalf("ParseHeader(%#q, %d) = %v, want %v containing %q", tt.header, tt.dataSize, err, tt.err, tt.contains)
			}
		})
	}
}

func TestParseHeaderResult(t *testing.T) {
	header := `{"z":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"__metadata__":{"format":"pt"},"a":{"dtype":"I64","shape":[],"data_offsets":[16,24]}}`
	tensors, meta, err := safetensors.ParseHeader([]byte(header), 24)
	if err != nil {
		t.Fatal(err)
	}
	want := []safetensors.TensorInfo{
		{Name: "a", DType: safetensors.I64, Shape: []int{}, Begin: 16, End: 24},
		{Name: "z", DType: safetensors.BF16, Shape: []int{2, 3}, Begin: 0, End: 12},
	}
	if len(tensors) != len(want) {
		t.Fatalf("ParseHeader(...) = %d tensors, want %d", len(tensors), len(want))
	}
	for i, w := range want {
		g := tensors[i]
		if g.Name != w.Name || g.DType != w.DType || !slices.Equal(g.Shape, w.Shape) || g.Begin != w.Begin || g.End != w.End {
			t.Errorf("ParseHeader(...)[%d] = %+v, want %+v", i, g, w)
		}
	}
	if got := tensors[1].NumElements(); got != 6 {
		t.Errorf("NumElements() = %d, want 6", got)
	}
	if got := tensors[1].NumBytes(); got != 12 {
		t.Errorf("NumBytes() = %d, want 12", got)
	}
	if got := tensors[0].NumElements(); got != 1 {
		t.Errorf("scalar NumElements() = %d, want 1", got)
	}
	if meta["format"] != "pt" || len(meta) != 1 {
		t.Errorf("ParseHeader(...) metadata = %v, want map[format:pt]", meta)
	}
}

// rawFile builds a file from a header length, a header and a data size.
func rawFile(headerLen uint64, header string, dataSize int) []byte {
	b := binary.LittleEndian.AppendUint64(nil, headerLen)
	b = append(b, header...)
	return append(b, make([]byte, dataSize)...)
}

func TestOpenSourceErrors(t *testing.T) {
	good := `{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}`
	tests := []struct {
		name string
		file []byte
		err  error
		msg  string // the whole message, or a prefix ending in "…"
	}{
		{"empty file", nil, safetensors.ErrTruncated,
			"safetensors: model.safetensors: truncated: file has 0 bytes, need at least 8"},
		{"short file", []byte{1, 2, 3}, safetensors.ErrTruncated,
			"safetensors: model.safetensors: truncated: file has 3 bytes, need at least 8"},
		{"header past end", rawFile(1234, "", 92), safetensors.ErrTruncated,
			"safetensors: model.safetensors: truncated: header says 1234 bytes, file has 100"},
		{"header over limit", rawFile(safetensors.MaxHeaderSize+1, "", 0), safetensors.ErrInvalidHeader,
			"safetensors: model.safetensors: invalid header: header length 100000001 exceeds limit 100000000"},
		{"huge header length", rawFile(1<<63, "", 0), safetensors.ErrInvalidHeader,
			"safetensors: model.safetensors: invalid header: header length 9223372036854775808 exceeds limit 100000000"},
		{"data too short", rawFile(uint64(len(good)), good, 3), safetensors.ErrInvalidHeader,
			`safetensors: model.safetensors: invalid header: tensor "w": data_offsets [0, 4] out of range of the 3-byte data section (file truncated?)`},
	}
	for _, tt := range tests {
		_, err := safetensors.OpenSource("model.safetensors", bytes.NewReader(tt.file), int64(len(tt.file)))
		if !errors.Is(err, tt.err) || err.Error() != tt.msg {
			t.Errorf("%s: OpenSource(...) = %v, want %v: %q", tt.name, err, tt.err, tt.msg)
		}
	}
}
