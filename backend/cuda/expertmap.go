package cuda

import (
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
)

var _ backend.ExpertMapper = (*Backend)(nil)

// MapExperts returns r with token t's choice of expert e replaced by slot slots[e][spread[t] mod
// len(slots[e])] (backend.ExpertMapper), scores and order unchanged: one kernel (map_experts) over the
// choices in device memory, with the slots and spreads uploaded as one small table. The table is
// checked here: slots must name every expert the router chose among.
func (b *Backend) MapExperts(r backend.Routing, slots [][]int, spread []int) (backend.Routing, error) {
	rt, err := b.asRouting("map experts", r)
	if err != nil {
		return nil, err
	}
	if err := b.materialize(rt); err != nil {
		return nil, err
	}
	if len(spread) != rt.tokens {
		return nil, fmt.Errorf("cuda: map experts: %d spreads for %d tokens: %w", len(spread), rt.tokens, backend.ErrShape)
	}
	E := len(slots)
	// The choices stay on the device, so every expert the router can choose must have slots (the cpu
	// backend checks the experts actually chosen).
	if E < rt.choices {
		return nil, fmt.Errorf("cuda: map experts: slots for %d experts, the router chose among %d: %w", E, rt.choices, backend.ErrShape)
	}
	table := make([]int, 0, E+1+E+len(spread))
	table = append(table, 0)
	for e, s := range slots {
		if len(s) == 0 {
			return nil, fmt.Errorf("cuda: map experts: expert %d has no slot: %w", e, backend.ErrShape)
		}
		table = append(table, table[e]+len(s))
	}
	for _, s := range slots {
		table = append(table, s...)
	}
	P := len(table) - (E + 1)
	for t, sp := range spread {
		if sp < 0 {
			return nil, fmt.Errorf("cuda: map experts: spread %d of token %d: %w", sp, t, backend.ErrShape)
		}
		table = append(table, sp)
	}
	out := &routing{b: b, tokens: rt.tokens, k: rt.k, choices: rt.choices}
	n := int64(rt.tokens) * int64(rt.k) * 4
	if out.experts, err = b.pool.get(n); err != nil {
		return nil, err
	}
	out.experts = b.pool.owned(out.experts)
	if out.scores, err = b.pool.get(n); err != nil {
		return nil, err
	}
	out.scores = b.pool.owned(out.scores)
	choices := rt.tokens * rt.k
	if choices == 0 {
		return out, nil
	}
	data, err := int32Bytes("map experts table", table)
	if err != nil {
		return nil, err
	}
	tbuf, err := b.temp(data)
	if err != nil {
		return nil, err
	}
	defer b.pool.release(*tbuf)
	err = b.stream.launch(b.k.mapExperts, dim3{uint32((choices + 127) / 128), 1, 1}, dim3{128, 1, 1}, 0,
		rt.experts, rt.scores, rt.tokens, rt.k, tbuf, E, P, out.experts, out.scores)
	if err != nil {
		return nil, fmt.Errorf("cuda: map experts: %w", err)
	}
	return out, nil
}
