package shard

import (
	"fmt"
	"strings"
)

// Key identifies the bytes a rank holds of a tensor and what the model is told of them: two entries with
// equal keys (of the same checkpoint, held in the same format) hold the same bytes under the same Layout,
// so a rank that holds one need not read the other. It is the tensor's name, its split dimension, the
// ranges read along it and the Layout.
func (t TensorShard) Key() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s|%d|%t|", t.Name, t.Dim, t.Packed)
	for _, r := range t.Ranges {
		fmt.Fprintf(&b, "%d:%d,", r.Start, r.End)
	}
	fmt.Fprintf(&b, "|%d/%d/%d", t.Layout.Dim, t.Layout.Part, t.Layout.Parts)
	return b.String()
}

// Moves counts what a rank does to go from holding one manifest's tensors to holding another's: the
// entries it must read (Loaded), those it holds already (Kept) and those it holds and no longer needs
// (Dropped), with their bytes.
type Moves struct {
	Loaded       int   `json:"loaded"`
	LoadedBytes  int64 `json:"loaded_bytes"`
	Kept         int   `json:"kept"`
	KeptBytes    int64 `json:"kept_bytes"`
	Dropped      int   `json:"dropped"`
	DroppedBytes int64 `json:"dropped_bytes"`
}

// Diff returns the moves of a rank that holds from's tensors (nil: none) and must hold to's (nil: none).
// Entries match by Key.
func Diff(from, to *Manifest) Moves {
	held := make(map[string]int64)
	if from != nil {
		for _, t := range from.Tensors {
			held[t.Key()] = t.Bytes
		}
	}
	var m Moves
	if to != nil {
		for _, t := range to.Tensors {
			k := t.Key()
			if _, ok := held[k]; ok {
				m.Kept++
				m.KeptBytes += t.Bytes
				delete(held, k)
				continue
			}
			m.Loaded++
			m.LoadedBytes += t.Bytes
		}
	}
	for _, b := range held {
		m.Dropped++
		m.DroppedBytes += b
	}
	return m
}
