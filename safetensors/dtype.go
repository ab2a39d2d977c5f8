package safetensors

import (
	"fmt"
	"strconv"
)

// DType is the element type of a tensor. The zero value is not a valid
// DType.
type DType uint8

// The dtypes of the safetensors format. Their String values are the strings
// used in file headers.
const (
	BF16    DType = iota + 1 // bfloat16
	F16                      // IEEE 754 half precision
	F32                      // IEEE 754 single precision
	F64                      // IEEE 754 double precision
	F8_E4M3                  // 8-bit float, 4 exponent bits, 3 mantissa bits, no infinities (e4m3fn)
	F8_E5M2                  // 8-bit float, 5 exponent bits, 2 mantissa bits
	I64                      // signed 64-bit integer
	I32                      // signed 32-bit integer
	I16                      // signed 16-bit integer
	I8                       // signed 8-bit integer
	U8                       // unsigned 8-bit integer
	BOOL                     // one byte, zero is false
)

var dtypes = [...]struct {
	name string
	size int
}{
	BF16:    {"BF16", 2},
	F16:     {"F16", 2},
	F32:     {"F32", 4},
	F64:     {"F64", 8},
	F8_E4M3: {"F8_E4M3", 1},
	F8_E5M2: {"F8_E5M2", 1},
	I64:     {"I64", 8},
	I32:     {"I32", 4},
	I16:     {"I16", 2},
	I8:      {"I8", 1},
	U8:      {"U8", 1},
	BOOL:    {"BOOL", 1},
}

// ParseDType returns the DType whose header string is s, such as "BF16".
func ParseDType(s string) (DType, error) {
	for dt := BF16; dt <= BOOL; dt++ {
		if dtypes[dt].name == s {
			return dt, nil
		}
	}
	return 0, fmt.Errorf("safetensors: unknown dtype %q", s)
}

// String returns the header string of dt, or "DType(n)" if dt is not valid.
func (dt DType) String() string {
	if !dt.valid() {
		return "DType(" + strconv.Itoa(int(dt)) + ")"
	}
	return dtypes[dt].name
}

// Size returns the size of one element in bytes, or 0 if dt is not valid.
func (dt DType) Size() int {
	if !dt.valid() {
		return 0
	}
	return dtypes[dt].size
}

func (dt DType) valid() bool { return dt >= BF16 && dt <= BOOL }
