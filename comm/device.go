package comm

// DeviceBuffer is GPU memory for a device communicator (comm/nccl): Len elements of Type at device
// address Ptr, and the CUDA stream (a CUstream; 0 is the legacy default stream) the collective is
// enqueued on. Only a device communicator accepts it; the CPU communicators of this package reject it
// with an error wrapping errors.ErrUnsupported, and a device communicator rejects host buffers the same
// way.
type DeviceBuffer struct {
	Ptr    uintptr
	N      int
	Type   DType
	Stream uintptr
	// Captured says Stream is capturing a CUDA graph: the collective becomes a node of the graph and
	// runs when the graph is launched, so the communicator records no completion event for it (an event
	// recorded during capture cannot be polled). Whoever launches the graph watches its completion.
	Captured bool
}

// DType returns the element type.
func (b DeviceBuffer) DType() DType { return b.Type }

// Len returns the number of elements.
func (b DeviceBuffer) Len() int { return b.N }

var _ Buffer = DeviceBuffer{}

// Underlying returns the communicator c forwards its collectives to now: c itself, unless c has a method
// Current() Comm (a forwarder, such as a worker's communicator that is replaced at every plan epoch), in
// which case the one it currently forwards to. A CUDA graph that captured a collective is bound to the
// underlying communicator.
func Underlying(c Comm) Comm {
	for range 8 { // forwarders of forwarders, but never a cycle
		f, ok := c.(interface{ Current() Comm })
		if !ok {
			return c
		}
		n := f.Current()
		if n == nil {
			return c
		}
		c = n
	}
	return c
}

// AcceptsDeviceBuffers reports whether c takes DeviceBuffer values: a device communicator (comm/nccl), or
// a Comm that forwards its collectives to one (replaced at every plan epoch, say). Either says so with a
// method AcceptsDeviceBuffers() bool that returns true. (The CPU communicators reject device buffers, but
// only once their peers have joined the call, so callers ask first.)
func AcceptsDeviceBuffers(c Comm) bool {
	d, ok := c.(interface{ AcceptsDeviceBuffers() bool })
	return ok && d.AcceptsDeviceBuffers()
}
