package safetensors_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/safetensors"
)

// FuzzParseHeader checks that ParseHeader never panics, that every error
// wraps ErrInvalidHeader, and that an accepted header keeps its promises:
// tensors sorted by name, inside the data section, of the right size and not
// overlapping.
func FuzzParseHeader(f *testing.F) {
	for _, tt := range parseHeaderTests {
		f.Add([]byte(tt.header), tt.dataSize)
	}
	f.Add([]byte(`{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"a":{"dtype":"F8_E4M3","shape":[3],"data_offsets":[8,11]}}`), int64(11))
	f.Add([]byte(`{"a":{"dtype":"BOOL","shape":[9223372036854775807],"data_offsets":[0,9223372036854775807]}}`), int64(1<<62))
	f.Add([]byte(`{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"a":{}}`), int64(8))
	f.Fuzz(func(t *testing.T, header []byte, dataSize int64) {
		tensors, _, err := safetensors.ParseHeader(header, dataSize)
		if err != nil {
			if !errors.Is(err, safetensors.ErrInvalidHeader) {
				t.Fatalf("ParseHeader(%q, %d) = %v, want an error wrapping %v", header, dataSize, err, safetensors.ErrInvalidHeader)
			}
			return
		}
		for i, ti := range tensors {
			if i > 0 && strings.Compare(tensors[i-1].Name, ti.Name) >= 0 {
				t.Fatalf("ParseHeader(%q) = %q before %q, want sorted and unique", header, tensors[i-1].Name, ti.Name)
			}
			if ti.Begin < 0 || ti.Begin > ti.End || ti.End > dataSize || ti.NumBytes() != ti.End-ti.Begin {
				t.Fatalf("ParseHeader(%q, %d) accepted %+v", header, dataSize, ti)
			}
			for _, other := range tensors[:i] {
				if max(ti.Begin, other.Begin) < min(ti.End, other.End) {
					t.Fatalf("ParseHeader(%q) accepted overlapping %+v and %+v", header, other, ti)
				}
			}
		}
	})
}
