package nccl

import (
	"encoding/base64"
	"errors"
	"fmt"
)

// UniqueIDSize is the size of an NCCL unique id in bytes (NCCL_UNIQUE_ID_BYTES).
const UniqueIDSize = len(UniqueID{})

// ErrInvalidUniqueID reports bytes or text that are not an encoded UniqueID: another length, or text
// that is not base64. Test for it with errors.Is.
var ErrInvalidUniqueID = errors.New("nccl: invalid unique id")

var (
	_ interface {
		MarshalText() ([]byte, error)
		MarshalBinary() ([]byte, error)
	} = UniqueID{}
	_ interface {
		UnmarshalText([]byte) error
		UnmarshalBinary([]byte) error
	} = (*UniqueID)(nil)
)

// MarshalBinary returns the id's UniqueIDSize bytes, as NCCL made them: what a rendezvous stores (etcd
// values are raw bytes).
func (id UniqueID) MarshalBinary() ([]byte, error) { return append([]byte(nil), id[:]...), nil }

// UnmarshalBinary sets id from exactly UniqueIDSize bytes; any other length is an error wrapping
// ErrInvalidUniqueID, and id is left unchanged.
func (id *UniqueID) UnmarshalBinary(b []byte) error {
	if len(b) != UniqueIDSize {
		return fmt.Errorf("%w: %d bytes, want %d", ErrInvalidUniqueID, len(b), UniqueIDSize)
	}
	copy(id[:], b)
	return nil
}

// MarshalText returns the id in standard base64 (with padding): 172 characters that travel in a file,
// a flag, an environment variable or JSON (where a UniqueID field is encoded as this string).
func (id UniqueID) MarshalText() ([]byte, error) {
	out := make([]byte, base64.StdEncoding.EncodedLen(UniqueIDSize))
	base64.StdEncoding.Encode(out, id[:])
	return out, nil
}

// UnmarshalText sets id from the base64 text MarshalText makes. Text that is not base64, or that
// decodes to another length than UniqueIDSize, is an error wrapping ErrInvalidUniqueID, and id is left
// unchanged.
func (id *UniqueID) UnmarshalText(text []byte) error {
	b := make([]byte, base64.StdEncoding.DecodedLen(len(text)))
	n, err := base64.StdEncoding.Decode(b, text)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidUniqueID, err)
	}
	return id.UnmarshalBinary(b[:n])
}

// ParseUniqueID decodes the base64 text of an id (see UniqueID.MarshalText).
func ParseUniqueID(s string) (UniqueID, error) {
	var id UniqueID
	err := id.UnmarshalText([]byte(s))
	return id, err
}
