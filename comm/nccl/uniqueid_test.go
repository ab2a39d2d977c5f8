package nccl_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/comm/nccl"
)

// fakeID is an id with every byte set, as NCCL's are opaque bytes (including zeros).
func fakeID() nccl.UniqueID {
	var id nccl.UniqueID
	for i := range id {
		id[i] = byte(i*7 + 3)
	}
	id[5] = 0
	return id
}

// TestUniqueIDEncoding: the id survives its binary, text and JSON forms; other lengths and non-base64
// text are errors wrapping ErrInvalidUniqueID that leave the id unchanged.
func TestUniqueIDEncoding(t *testing.T) {
	id := fakeID()
	if nccl.UniqueIDSize != 128 {
		t.Fatalf("UniqueIDSize = %d, want 128 (NCCL_UNIQUE_ID_BYTES)", nccl.UniqueIDSize)
	}

	b, err := id.MarshalBinary()
	if err != nil || len(b) != 128 {
		t.Fatalf("MarshalBinary() = %d bytes, %v; want 128", len(b), err)
	}
	var back nccl.UniqueID
	if err := back.UnmarshalBinary(b); err != nil || back != id {
		t.Errorf("UnmarshalBinary(MarshalBinary()) = %v, equal %v; want the id", err, back == id)
	}
	b[0] ^= 0xff // the id does not alias the bytes
	if back != id {
		t.Errorf("UnmarshalBinary kept a reference to its input")
	}

	text, err := id.MarshalText()
	if err != nil || len(text) != 172 || strings.ContainsAny(string(text), "\n ") {
		t.Fatalf("MarshalText() = %q (%d), %v; want 172 base64 characters", text, len(text), err)
	}
	back = nccl.UniqueID{}
	if err := back.UnmarshalText(text); err != nil || back != id {
		t.Errorf("UnmarshalText(MarshalText()) = %v, equal %v; want the id", err, back == id)
	}
	if parsed, err := nccl.ParseUniqueID(string(text)); err != nil || parsed != id {
		t.Errorf("ParseUniqueID = %v, equal %v; want the id", err, parsed == id)
	}

	js, err := json.Marshal(struct {
		ID nccl.UniqueID `json:"nccl_id"`
	}{id})
	if err != nil || !strings.Contains(string(js), `"nccl_id":"`+string(text)+`"`) {
		t.Fatalf("json.Marshal = %s, %v; want the base64 string", js, err)
	}
	var dec struct {
		ID nccl.UniqueID `json:"nccl_id"`
	}
	if err := json.Unmarshal(js, &dec); err != nil || dec.ID != id {
		t.Errorf("json round trip = %v, equal %v; want the id", err, dec.ID == id)
	}

	for _, tc := range []struct {
		name string
		f    func(*nccl.UniqueID) error
	}{
		{"127 bytes", func(u *nccl.UniqueID) error { return u.UnmarshalBinary(make([]byte, 127)) }},
		{"129 bytes", func(u *nccl.UniqueID) error { return u.UnmarshalBinary(make([]byte, 129)) }},
		{"no bytes", func(u *nccl.UniqueID) error { return u.UnmarshalBinary(nil) }},
		{"short text", func(u *nccl.UniqueID) error { return u.UnmarshalText(text[:168]) }},
		{"long text", func(u *nccl.UniqueID) error { return u.UnmarshalText(append(append([]byte(nil), text...), "AAAA"...)) }},
		{"not base64", func(u *nccl.UniqueID) error { return u.UnmarshalText([]byte(strings.Repeat("!", 172))) }},
		{"empty text", func(u *nccl.UniqueID) error { return u.UnmarshalText(nil) }},
	} {
		u := id
		err := tc.f(&u)
		if !errors.Is(err, nccl.ErrInvalidUniqueID) {
			t.Errorf("%s: error = %v, want ErrInvalidUniqueID", tc.name, err)
		}
		if u != id {
			t.Errorf("%s: the id changed on error", tc.name)
		}
	}
	if _, err := nccl.ParseUniqueID("AAAA"); !errors.Is(err, nccl.ErrInvalidUniqueID) || !strings.Contains(err.Error(), "3 bytes, want 128") {
		t.Errorf("ParseUniqueID(3 bytes) = %v, want ErrInvalidUniqueID naming the lengths", err)
	}
}

// TestJoinArguments: Join checks its arguments before it needs NCCL, and without NCCL fails with
// ErrUnavailable at once (no GPU needed).
func TestJoinArguments(t *testing.T) {
	ctx := context.Background()
	current := func() error { return nil }
	for _, cfg := range []nccl.Config{
		{Rank: 2, Size: 2, MakeCurrent: current},
		{Rank: -1, Size: 2, MakeCurrent: current},
		{Rank: 0, Size: 0, MakeCurrent: current},
	} {
		if _, err := nccl.Join(ctx, cfg); !errors.Is(err, comm.ErrMismatch) {
			t.Errorf("Join(rank %d of %d) = %v, want ErrMismatch", cfg.Rank, cfg.Size, err)
		}
	}
	if _, err := nccl.Join(ctx, nccl.Config{Rank: 0, Size: 2}); err == nil || !strings.Contains(err.Error(), "MakeCurrent") {
		t.Errorf("Join without MakeCurrent = %v, want an error naming it", err)
	}
	if _, _, err := nccl.Library(); err == nil {
		t.Skip("NCCL is available here: the unavailable path cannot be checked")
	}
	_, err := nccl.Join(ctx, nccl.Config{ID: fakeID(), Rank: 1, Size: 2, MakeCurrent: current})
	if !errors.Is(err, nccl.ErrUnavailable) || !strings.Contains(err.Error(), "lib") {
		t.Errorf("Join without NCCL = %v, want ErrUnavailable naming the library", err)
	}
}

// ncclForwarder is a Comm of another package that forwards to an NCCL communicator.
type ncclForwarder struct {
	comm.Comm
	device bool
}

func (f ncclForwarder) AcceptsDeviceBuffers() bool { return f.device }

func TestAcceptsDeviceBuffersOfForwarders(t *testing.T) {
	if comm.AcceptsDeviceBuffers(comm.Solo()) || comm.AcceptsDeviceBuffers(comm.NewLocalGroup(2)[0]) {
		t.Errorf("AcceptsDeviceBuffers of a CPU communicator = true")
	}
	if !comm.AcceptsDeviceBuffers(ncclForwarder{comm.Solo(), true}) || comm.AcceptsDeviceBuffers(ncclForwarder{comm.Solo(), false}) {
		t.Errorf("AcceptsDeviceBuffers does not ask a forwarding Comm")
	}
}
