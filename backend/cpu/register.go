package cpu

import (
	"context"

	"github.com/tpfleet/tpfleet/backend"
)

// The backend registers itself as "cpu": backend.Open("cpu", o) returns New(Config{Threads: o.Threads}).
// It has no devices to count (it runs on the host's cores) and its TP groups join through the TCP ring.
func init() {
	backend.Register("cpu", backend.Driver{
		Open: func(_ context.Context, o backend.Options) (backend.Ops, error) {
			if err := (Config{Threads: o.Threads}).Validate(); err != nil {
				return nil, err
			}
			return New(Config{Threads: o.Threads}), nil
		},
	})
}

var _ backend.Threader = (*Backend)(nil)
