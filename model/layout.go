package model

// Layout says how a loaded tensor was cut for this rank: Dim < 0 means the whole tensor (replicated);
// otherwise the tensor was split along Dim into Parts pieces and this rank holds piece Part. Packed splits
// (each rank holding the matching slice of both halves of Dim) report Dim like a plain split: the local
// tensor keeps the two halves in order.
type Layout struct {
	Dim, Part, Parts int
}

// Replicated is the Layout of a whole tensor.
var Replicated = Layout{Dim: -1, Parts: 1}

// Split reports whether the tensor was cut, so that its product is partial or sliced.
func (l Layout) Split() bool { return l.Dim >= 0 && l.Parts > 1 }
