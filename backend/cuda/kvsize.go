package cuda

import "github.com/tpfleet/tpfleet/backend"

var _ backend.KVSizer = (*Backend)(nil)

// KVElementBytes is 2: the cache holds bf16 keys and values.
func (b *Backend) KVElementBytes() int { return 2 }
