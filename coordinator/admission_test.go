package coordinator

import (
	"errors"
	"strings"
	"testing"

	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

func tokens(n int) []int32 { return make([]int32, n) }

// plan4 is the moe-top1 fixture's geometry: three chunked layers of window 16 and a global one.
func plan4(blocks int64) *pb.MemoryPlan {
	return &pb.MemoryPlan{KvBlocks: blocks, BlockSize: 16, Windows: []int32{16, 16, 16, 0}}
}

func TestBudgetOf(t *testing.T) {
	k, err := budgetOf([]*pb.MemoryPlan{plan4(20), plan4(12)}, 1)
	if err != nil || k == nil || k.blocks != 12 {
		t.Fatalf("budgetOf(20, 12 blocks) = %+v, %v; want the smaller, 12", k, err)
	}
	if k, err := budgetOf([]*pb.MemoryPlan{plan4(12), nil}, 1); k != nil || err != nil {
		t.Errorf("budgetOf with a rank without a plan = %+v, %v; want no budget", k, err)
	}
	odd := plan4(12)
	odd.BlockSize = 32
	if _, err := budgetOf([]*pb.MemoryPlan{plan4(12), odd}, 1); err == nil || !strings.Contains(err.Error(), "same --block-size") {
		t.Errorf("budgetOf with block sizes 16 and 32 = %v, want an error naming --block-size", err)
	}
}

// TestAdmitsFIFO: the queue's head joins only when its worst case fits what the batch leaves; while it
// waits, smaller requests behind it wait too (no starvation of the long one), it is counted once, and a
// request larger than the whole budget is taken (to be refused) rather than block the queue.
func TestAdmitsFIFO(t *testing.T) {
	k, _ := budgetOf([]*pb.MemoryPlan{plan4(12)}, 1) // decode-sized pieces: the formula
	b := &batch{kv: k}
	q := newQueue(10)
	long := newRequest(tokens(12), 30, sample.Params{}, nil) // 42 tokens: 3 + 3·2 = 9 blocks
	short := newRequest(tokens(4), 4, sample.Params{}, nil)  // 8 tokens: 1 + 3·1 = 4 blocks
	huge := newRequest(tokens(12), 100, sample.Params{}, nil)
	for _, r := range []*request{long, short, huge} {
		if err := q.push(r); err != nil {
			t.Fatal(err)
		}
	}
	if got := k.need(long); got != 9 {
		t.Fatalf("need(12 + 30 tokens) = %d, want 9", got)
	}
	k.used = 4 // a running sequence holds 4 blocks: 9 do not fit in the 8 left
	if r := q.popIf(b.admits); r != nil {
		t.Fatalf("popIf with 8 blocks free took a request of %d tokens, want the 9-block head to wait", len(r.prompt))
	}
	if r := q.popIf(b.admits); r != nil || !long.kvWaited {
		t.Fatalf("popIf again = %v, want nil and the head marked as waited", r)
	}
	if q.len() != 3 {
		t.Fatalf("queue holds %d, want 3 (the short request does not pass the waiting head)", q.len())
	}
	k.used = 0
	if r := q.popIf(b.admits); r != long {
		t.Fatalf("popIf with 12 blocks free = %v, want the long head", r)
	}
	k.used = 9
	if r := q.popIf(b.admits); r != nil {
		t.Fatalf("popIf with 3 blocks free took the 4-block request")
	}
	k.used = 8
	if r := q.popIf(b.admits); r != short {
		t.Fatalf("popIf with 4 blocks free = %v, want the short request", r)
	}
	k.used = 12
	if r := q.popIf(b.admits); r != huge {
		t.Fatalf("popIf of a request larger than the budget = %v, want it taken (to be refused)", r)
	}
}

func TestCapacitiesCheck(t *testing.T) {
	var c capacities
	r := newRequest(tokens(12), 100, sample.Params{}, nil)
	if err := c.check(r); err != nil || c.longest() != 0 {
		t.Errorf("check with no group serving = %v (longest %d), want admitted", err, c.longest())
	}
	k, _ := budgetOf([]*pb.MemoryPlan{plan4(12)}, 1)
	c.set(0, k)
	err := c.check(r)
	if !errors.Is(err, ErrKVCapacity) || !strings.Contains(err.Error(), "112 tokens need 13 KV blocks of 16 tokens; the largest group holds 12 blocks, a context of at most 96 tokens") {
		t.Errorf("check(12 + 100 tokens) against 12 blocks = %v", err)
	}
	if got := c.longest(); got != 96 {
		t.Errorf("longest() = %d, want 96", got)
	}
	big, _ := budgetOf([]*pb.MemoryPlan{plan4(20)}, 1)
	c.set(1, big)
	if err := c.check(r); err != nil {
		t.Errorf("check with a 20-block group = %v, want admitted", err)
	}
	c.set(1, nil)
	if err := c.check(r); err == nil {
		t.Errorf("check after the 20-block group stopped: admitted, want ErrKVCapacity")
	}
	// Steps of 512 tokens: a chunked layer may hold the window and the whole 42-token piece.
	k512, _ := budgetOf([]*pb.MemoryPlan{plan4(12)}, 512)
	if got := k512.need(newRequest(tokens(12), 30, sample.Params{}, nil)); got != 12 {
		t.Errorf("need(12 + 30 tokens) with pieces of 512 = %d, want 3 + 3·3 = 12", got)
	}
}
