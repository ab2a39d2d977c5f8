package tpgroup

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/comm/nccl"
)

// Rendezvous is where the ranks of one group meet. Records and the id are opaque bytes to it.
// Implementations: Dir (a directory) and cluster.Rendezvous (etcd). Its methods may be called from the
// goroutines of several ranks at once.
type Rendezvous interface {
	// Exchange publishes rec as rank's record and waits until ranks 0..size-1 have published theirs,
	// returning them in rank order. When ctx ends first the error names the missing ranks.
	Exchange(ctx context.Context, rank, size int, rec []byte) ([][]byte, error)
	// PublishID publishes the group's NCCL unique id; rank 0 calls it after Exchange.
	PublishID(ctx context.Context, id []byte) error
	// WaitID waits for the id rank 0 published. When ctx ends first the error says it is missing.
	WaitID(ctx context.Context) ([]byte, error)
	// String names the meeting place in errors and logs.
	String() string
}

// Options configure Join. A zero field means its default.
type Options struct {
	// Device is the backend's name (as registered, e.g. "cpu"), recorded so that a group whose ranks run
	// on different backends fails with an error saying so.
	Device string
	// Name is how this rank shows in its peers' logs when it joins on a device (host, process, GPU).
	// Empty means the backend's Name.
	Name string
	// RingHost is the host the TCP ring listener binds, on a free port; its address is published to the
	// peers. Empty means 127.0.0.1, which only works within one host.
	RingHost string
	// AdvertiseHost replaces an unspecified RingHost (0.0.0.0) in the published address.
	AdvertiseHost string
	// RingServerTLS and RingClientTLS, when set, secure the TCP ring's connections (comm.RingConfig's
	// ServerTLS and ClientTLS): the worker passes configurations that admit only workers of its
	// cluster. Nil means plain TCP.
	RingServerTLS, RingClientTLS *tls.Config
	// OpTimeout bounds one collective of the communicator, and the ring's dials. Zero means
	// comm.DefaultOpTimeout.
	OpTimeout time.Duration
	// Logger receives the progress of the meeting. Nil means zap.NewNop().
	Logger *zap.Logger
}

// record is what a rank publishes.
type record struct {
	// Device is the backend's name: every rank of a group must run on the same.
	Device string `json:"device"`
	// Addr is the rank's TCP ring address, or on a device its Name (for errors and logs).
	Addr string `json:"addr"`
}

// CheckDeviceComm reports whether the device communicator's library (NCCL) can be loaded here: callers
// that will join on a device check it first, so that a host without it fails at once, not after
// loading weights and waiting for peers.
func CheckDeviceComm() error {
	_, _, err := nccl.Library()
	return err
}

// DeviceCommLibrary returns the path and version of the device communicator's library (NCCL), for logs.
func DeviceCommLibrary() (path string, version int, err error) { return nccl.Library() }

// Join builds the communicator of rank (of size) whose backend is ops, meeting the group's other ranks
// in rdzv; ctx bounds the whole (rendezvous and the communicator's set-up) and its end is reported as
// such. Size 1 is comm.Solo. See the package doc for how the communicator is chosen. The caller closes
// the communicator.
func Join(ctx context.Context, rdzv Rendezvous, rank, size int, ops backend.Ops, o Options) (comm.Comm, error) {
	if size < 1 || rank < 0 || rank >= size {
		return nil, fmt.Errorf("tpgroup: rank %d of %d", rank, size)
	}
	if size == 1 {
		return comm.Solo(), nil
	}
	if o.OpTimeout == 0 {
		o.OpTimeout = comm.DefaultOpTimeout
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	lg := o.Logger.With(zap.Int("rank", rank), zap.Int("tp", size), zap.Stringer("rendezvous", rdzv))
	if dc, ok := ops.(backend.DeviceContext); ok {
		return joinDevice(ctx, rdzv, rank, size, ops, dc, o, lg)
	}
	return joinRing(ctx, rdzv, rank, size, o, lg)
}

// joinRing listens for the ring, exchanges addresses and connects the TCP ring.
func joinRing(ctx context.Context, rdzv Rendezvous, rank, size int, o Options, lg *zap.Logger) (comm.Comm, error) {
	host := o.RingHost
	if host == "" {
		host = "127.0.0.1"
	}
	l, err := comm.Listen(net.JoinHostPort(host, "0"))
	if err != nil {
		return nil, err
	}
	defer l.Close()
	addr := l.Addr()
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() && o.AdvertiseHost != "" {
		_, port, _ := net.SplitHostPort(addr)
		addr = net.JoinHostPort(o.AdvertiseHost, port)
	}
	lg.Info("waiting for the group's peers", zap.String("ring-addr", addr))
	recs, err := exchange(ctx, rdzv, rank, size, record{Device: o.Device, Addr: addr})
	if err != nil {
		return nil, err
	}
	addrs := make([]string, len(recs))
	for r, rec := range recs {
		addrs[r] = rec.Addr
	}
	c, err := comm.Connect(ctx, l, comm.RingConfig{Rank: rank, Addrs: addrs, OpTimeout: o.OpTimeout, DialTimeout: o.OpTimeout,
		ServerTLS: o.RingServerTLS, ClientTLS: o.RingClientTLS})
	if err != nil {
		return nil, err
	}
	lg.Info("communicator ready", zap.String("kind", "ring"), zap.Strings("ring", addrs), zap.Bool("tls", o.RingServerTLS != nil))
	return c, nil
}

// joinDevice checks NCCL, meets the peers, shares rank 0's unique id and joins the NCCL communicator
// with the device's context current.
func joinDevice(ctx context.Context, rdzv Rendezvous, rank, size int, ops backend.Ops, dc backend.DeviceContext, o Options, lg *zap.Logger) (comm.Comm, error) {
	if err := CheckDeviceComm(); err != nil { // before the wait for peers
		return nil, err
	}
	name := o.Name
	if name == "" {
		name = ops.Name()
	}
	lg.Info("waiting for the group's peers", zap.String("name", name))
	start := time.Now()
	id, recs, err := exchangeID(ctx, rdzv, rank, size, record{Device: o.Device, Addr: name}, nccl.NewUniqueID)
	if err != nil {
		return nil, err
	}
	lg.Debug("NCCL unique id exchanged; initialising NCCL", zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	c, err := nccl.Join(ctx, nccl.Config{ID: id, Rank: rank, Size: size, MakeCurrent: dc.MakeCurrent, OpTimeout: o.OpTimeout})
	if err != nil {
		return nil, err
	}
	names := make([]string, len(recs))
	for r, rec := range recs {
		names[r] = rec.Addr
	}
	lg.Info("communicator ready", zap.String("kind", "nccl"), zap.Strings("ranks", names),
		zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	return c, nil
}

// exchange publishes rec and returns every rank's record, after checking that they run on one device.
func exchange(ctx context.Context, rdzv Rendezvous, rank, size int, rec record) ([]record, error) {
	data, _ := json.Marshal(rec) // never fails
	raw, err := rdzv.Exchange(ctx, rank, size, data)
	if err != nil {
		return nil, err
	}
	recs := make([]record, len(raw))
	for r, d := range raw {
		if err := json.Unmarshal(d, &recs[r]); err != nil {
			return nil, fmt.Errorf("rendezvous in %v: rank %d's record %q: %w", rdzv, r, d, err)
		}
		if recs[r].Device != rec.Device {
			return nil, fmt.Errorf("rendezvous in %v: rank %d runs on %s (%s), this rank (%d) on %s: give every rank the same --device",
				rdzv, r, recs[r].Device, recs[r].Addr, rank, rec.Device)
		}
	}
	return recs, nil
}

// exchangeID meets the peers (exchange: all are alive and have loaded their weights before NCCL's
// uninterruptible initialisation starts); then rank 0 makes the group's unique id with newID and
// publishes it, and the other ranks wait for it. It returns the id and every rank's record.
func exchangeID(ctx context.Context, rdzv Rendezvous, rank, size int, rec record,
	newID func() (nccl.UniqueID, error)) (nccl.UniqueID, []record, error) {
	var id nccl.UniqueID
	recs, err := exchange(ctx, rdzv, rank, size, rec)
	if err != nil {
		return id, nil, err
	}
	if rank == 0 {
		if id, err = newID(); err != nil {
			return id, nil, fmt.Errorf("make the NCCL unique id: %w", err)
		}
		raw, _ := id.MarshalBinary() // never fails
		if err := rdzv.PublishID(ctx, raw); err != nil {
			return id, nil, err
		}
		return id, recs, nil
	}
	raw, err := rdzv.WaitID(ctx)
	if err != nil {
		return id, nil, err
	}
	if err := id.UnmarshalBinary(raw); err != nil {
		return id, nil, fmt.Errorf("the NCCL unique id in %v: %w", rdzv, err)
	}
	return id, recs, nil
}

// Local makes the communicators of a whole group run as goroutines of this process, one per backend in
// ops (rank r's is ops[r]): comm.Solo for one, an in-process NCCL group when the backends are
// DeviceContexts, else comm.NewLocalGroup. The caller closes them.
func Local(ctx context.Context, ops []backend.Ops) ([]comm.Comm, error) {
	switch {
	case len(ops) == 0:
		return nil, fmt.Errorf("tpgroup: a local group of 0 ranks")
	case len(ops) == 1:
		return []comm.Comm{comm.Solo()}, nil
	}
	if _, ok := ops[0].(backend.DeviceContext); !ok {
		return comm.NewLocalGroup(len(ops)), nil
	}
	ctxs := make([]uintptr, len(ops))
	for r, b := range ops {
		dc, ok := b.(backend.DeviceContext)
		if !ok {
			return nil, fmt.Errorf("tpgroup: rank %d (%s) has no device context, rank 0 (%s) has", r, b.Name(), ops[0].Name())
		}
		ctxs[r] = dc.Context()
	}
	return nccl.NewGroup(ctx, ctxs)
}
