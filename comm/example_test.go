package comm_test

import (
	"context"
	"fmt"
	"sync"

	"github.com/tpfleet/tpfleet/comm"
)

// Two ranks in one process sum their activations; each rank is driven by its own goroutine.
func ExampleNewLocalGroup() {
	comms := comm.NewLocalGroup(2)
	bufs := []comm.HostF32{{1, 2, 3}, {10, 20, 30}}
	var wg sync.WaitGroup
	for r, c := range comms {
		wg.Go(func() {
			if err := c.AllReduce(context.Background(), bufs[r]); err != nil {
				fmt.Println(err)
			}
		})
	}
	wg.Wait()
	fmt.Println(bufs[0], bufs[1])
	// Output: [11 22 33] [11 22 33]
}
