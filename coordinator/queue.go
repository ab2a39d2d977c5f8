package coordinator

import (
	"container/list"
	"fmt"
	"sync"
	"time"
)

// maxFailures is how many group failures in a row, with no token chosen between them, a request
// survives: the next ends it with the failure's error. A step that fails for one request whatever group
// runs it (bad input the checks missed, a kernel fault) fails that request, instead of every group that
// takes it in turn.
const maxFailures = 3

// queue holds the requests waiting for a place in a batch, shared by the groups' step loops. New
// requests are bounded by max; requests handed back by a group that stopped (resumed) go first and are
// not bounded, since they were admitted already. It is safe for concurrent use.
type queue struct {
	max int
	// resumeTimeout bounds how long a request handed back by a group waits here (see resume).
	resumeTimeout time.Duration

	mu      sync.Mutex
	items   list.List     // of *request
	waiting int           // items that count against max
	changed chan struct{} // closed and replaced when an item is added
}

func newQueue(max int) *queue { return newQueueTimeout(max, DefaultResumeTimeout) }

// newQueueTimeout makes a queue of max new requests whose resumed requests wait at most resumeTimeout.
func newQueueTimeout(max int, resumeTimeout time.Duration) *queue {
	return &queue{max: max, resumeTimeout: resumeTimeout, changed: make(chan struct{})}
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

// resume hands a started request back to the head of the queue, to run again from its prompt and the
// ids chosen so far in whichever group pops it first. cause is why its group let it go: nil when the
// group was stopped (a plan change), else the group's failure. A request that failed maxFailures times
// without choosing a token in between ends with cause instead; one that waits longer than
// q.resumeTimeout since it was first handed back without progress ends with ErrNotPlaced. Only the
// group holding r calls resume; it reports whether r is queued.
func (q *queue) resume(r *request, cause error) bool {
	if cause != nil {
		r.failures++
		r.lastErr = cause
		if r.failures >= maxFailures {
			r.end("", cause)
			return false
		}
	}
	now := time.Now()
	if r.stalled.IsZero() {
		r.stalled = now
	}
	left := q.resumeTimeout - now.Sub(r.stalled)
	if left <= 0 {
		r.end("", r.notPlaced(q.resumeTimeout))
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	r.elem = q.items.PushFront(r)
	r.counted = false
	var t *time.Timer
	t = time.AfterFunc(left, func() {
		q.mu.Lock()
		mine := r.elem != nil && r.timer == t
		if mine {
			q.items.Remove(r.elem)
			q.forget(r)
		}
		q.mu.Unlock()
		if mine {
			r.end("", r.notPlaced(q.resumeTimeout))
		}
	})
	r.timer = t
	q.signal()
	return true
}

func (q *queue) signal() {
	close(q.changed)
	q.changed = make(chan struct{})
}

// popIf removes and returns the head of the queue when ok accepts it (called under the queue's lock: it
// must not block); nil when the queue is empty or ok refuses the head, which then stays first.
func (q *queue) popIf(ok func(*request) bool) *request {
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.items.Front()
	if e == nil || !ok(e.Value.(*request)) {
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
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
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
		q.forget(r)
		rs = append(rs, r)
	}
	q.items.Init()
	q.waiting = 0
	return rs
}

// drainNew removes and returns the requests that never ran; the ones handed back by a group (resume)
// stay, waiting for a group until their deadline.
func (q *queue) drainNew() []*request {
	q.mu.Lock()
	defer q.mu.Unlock()
	var rs []*request
	for e := q.items.Front(); e != nil; {
		next := e.Next()
		if r := e.Value.(*request); r.counted {
			q.items.Remove(e)
			q.forget(r)
			rs = append(rs, r)
		}
		e = next
	}
	return rs
}

// len returns the number of requests that count against max.
func (q *queue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.waiting
}
