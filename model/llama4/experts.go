package llama4

import (
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
)

// Expert load on a backend that counts on the device (backend.ExpertTallier).
//
// The model keeps one tally for all its MoE layers: per layer, one counter per slot of the group's expert
// tensors, counted from the routing the experts run on (after MapExperts where the plan holds replicas).
// The tokens per checkpoint expert follow from the slots on the host: every choice of a router row goes
// to exactly one slot that holds the row's expert, so an expert's tokens are the sum over its slots —
// the numbers a host routing (backend.ExpertCounter) gives by counting the router's rows, with one
// kernel a layer instead of two.

// newTally gives the MoE layers their counters in one tally when the backend has ExpertTallier.
func (m *Model) newTally() error {
	et, ok := m.ops.(backend.ExpertTallier)
	if !ok {
		return nil
	}
	var layers []*moe
	n := 0
	for _, d := range m.layers {
		if f, ok := d.ffn.(*moe); ok {
			f.tallyFirst = n
			n += len(f.slotUnits)
			layers = append(layers, f)
		}
	}
	if len(layers) == 0 {
		return nil
	}
	t, err := et.NewExpertTally(n)
	if err != nil {
		return fmt.Errorf("llama4: expert counters: %w", err)
	}
	m.tally = t
	for _, f := range layers {
		f.tally = t
	}
	return nil
}

// countSlots counts the slots the step's routing sends tokens to: on the device when the model has a
// tally, else on the host where the routing can be read there.
func (f *moe) countSlots(s *step, r backend.Routing) {
	if f.tally == nil {
		count(r, f.slotTokens, nil)
		return
	}
	if s.err != nil {
		return
	}
	s.fail("count_experts", f.tally.Add(r, f.tallyFirst, len(f.slotUnits)))
}

// tallied is ExpertLoad (slots false) or SlotLoad (slots true) from the tally. A failed read gives no
// layer any counts, as a backend that does not count.
func (m *Model) tallied(slots bool) [][]int64 {
	out := make([][]int64, len(m.layers))
	counts, err := m.tally.Counts()
	if err != nil {
		return out
	}
	for i, d := range m.layers {
		f, ok := d.ffn.(*moe)
		if !ok {
			continue
		}
		if f.tallyFirst+len(f.slotUnits) > len(counts) {
			continue
		}
		c := counts[f.tallyFirst : f.tallyFirst+len(f.slotUnits)]
		if slots {
			out[i] = c
			continue
		}
		out[i] = make([]int64, len(f.tokens))
		for slot, u := range f.slotUnits {
			if u >= 0 && u < len(out[i]) {
				out[i][u] += c[slot]
			}
		}
	}
	return out
}
