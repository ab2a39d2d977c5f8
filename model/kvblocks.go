package model

import "fmt"

// DefaultKVBlockSize is the number of positions one KV cache block holds unless the operator says
// otherwise (--block-size). It is the one place the default is written: the workers' block pools and
// the coordinator's admission, which counts blocks, both use it.
const DefaultKVBlockSize = 16

// KVBlocks is the number of blocks of size positions that positions [0, n) take in a cache that keeps
// them all (a global layer).
func KVBlocks(n, size int) int {
	if n <= 0 || size <= 0 {
		return 0
	}
	return (n + size - 1) / size
}

// CheckKVBlockSize reports a block size an operator gave that cannot work.
func CheckKVBlockSize(size int) error {
	if size < 1 || size > 1<<16 {
		return fmt.Errorf("kv block size %d: must be in [1, 65536] positions", size)
	}
	return nil
}
