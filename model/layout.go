package model

// Layout says how a loaded tensor was cut for this rank: Dim < 0 means the whole tensor (replicated);
// otherwise the tensor was split along Dim into Parts pieces and this rank holds piece Part. Packed splits
// (each rank holding the matching slice of both halves of Dim) report Dim like a plain split: the local
// tensor keeps the two halves in order.
type Layout struct {
	Dim, Part, Parts int
	// Units is set where the plan placed the units of one of the tensor's dimensions itself (the experts
	// of an MoE layer: shard.Plan.WithOrder): Units[i] is the checkpoint's unit at index i of that
	// dimension over the whole group, so a tensor split on it holds indices [Part·n/Parts, (Part+1)·n/Parts)
	// of n = len(Units), and a whole one all of them. A unit may appear more than once in a split tensor's
	// Units (replicas of a hot expert on several ranks): the group then has more indices (slots) than the
	// checkpoint has units. Nil: the checkpoint's order.
	Units []int
}

// Replicated is the Layout of a whole tensor.
var Replicated = Layout{Dim: -1, Parts: 1}

// Split reports whether the tensor was cut, so that its product is partial or sliced.
func (l Layout) Split() bool { return l.Dim >= 0 && l.Parts > 1 }
