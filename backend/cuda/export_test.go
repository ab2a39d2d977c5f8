package cuda

// SetGEMVRows sets the most rows Linear runs on the GEMV kernel (0: never; at most 8, the kernels' limit) and
// returns the previous value, so that tests can time cuBLASLt on the same shapes.
func SetGEMVRows(b *Backend, rows int) int {
	old := b.gemvRows
	b.gemvRows = rows
	return old
}
