package coordinator

import (
	"container/list"
	"fmt"
	"sync"
)

// queue holds the requests waiting for a place in a batch, shared by the groups' step loops. New
// requests are bounded by max; requests handed back by a group that stopped (resumed) go first and are
// not bounded, since they were admitted already. It is safe for concurrent use.
type queue struct {
	max int

	mu      sync.Mutex
	items   list.List     // of *request
	waiting int           // items that count against max
	changed chan struct{} // closed and replaced when an item is added
}

func newQueue(max int) *queue {
	return &queue{max: max, changed: make(chan struct{})}
}

// push appends a new request, or fails with ErrQueueFull.
func (q *queue) push(r *request) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.waiting >= q.max {
		return fmt.Errorf("%w: %d requests are waiting", ErrQueueFull, q.waiting)
	}
	r.elem = q.items.PushBack(r)
	q.waiting++
	r.counted = true
	q.signal()
	return nil
}

// pushFront puts a request that had started back at the head of the queue.
func (q *queue) pushFront(r *request) {
	q.mu.Lock()
	defer q.mu.Unlock()
	r.elem = q.items.PushFront(r)
	r.counted = false
	q.signal()
}

func (q *queue) signal() {
	close(q.changed)
	q.changed = make(chan struct{})
}

// pop removes and returns the head of the queue, or nil when it is empty.
func (q *queue) pop() *request {
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.items.Front()
	if e == nil {
		return nil
	}
	r := q.items.Remove(e).(*request)
	q.forget(r)
	return r
}

// remove takes r out of the queue if it is there, and reports whether it was.
func (q *queue) remove(r *request) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if r.elem == nil {
		return false
	}
	q.items.Remove(r.elem)
	q.forget(r)
	return true
}

// forget clears r's queue bookkeeping after it left the list; q.mu is held.
func (q *queue) forget(r *request) {
	if r.counted {
		q.waiting--
	}
	r.counted, r.elem = false, nil
}

// wait returns a channel that is closed when a request is added after the call. A caller checks the
// queue (pop) after wait, so that nothing added in between is missed.
func (q *queue) wait() <-chan struct{} {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.changed
}

// drain removes and returns every request.
func (q *queue) drain() []*request {
	q.mu.Lock()
	defer q.mu.Unlock()
	var rs []*request
	for e := q.items.Front(); e != nil; e = e.Next() {
		r := e.Value.(*request)
		r.counted, r.elem = false, nil
		rs = append(rs, r)
	}
	q.items.Init()
	q.waiting = 0
	return rs
}

// len returns the number of requests that count against max.
func (q *queue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.waiting
}
