package cpu

import "github.com/tpfleet/tpfleet/backend"

var _ backend.KVSizer = (*Backend)(nil)

// KVElementBytes is 4: the cache holds float32 keys and values.
func (b *Backend) KVElementBytes() int { return 4 }
