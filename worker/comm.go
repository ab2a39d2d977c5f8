package worker

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/nccl"
)

// epochComm is the communicator a loaded model holds for its whole life: it forwards every collective
// to the communicator of the current epoch, so weights outlive the epochs that reuse them. Between
// epochs it has none, and collectives fail with an error wrapping nccl.ErrClosed.
type epochComm struct {
	rank, size int
	cur        atomic.Pointer[commBox]
}

// commBox lets an atomic.Pointer hold an interface value.
type commBox struct{ c nccl.Comm }

var _ nccl.Comm = (*epochComm)(nil)

func newEpochComm(rank, size int) *epochComm { return &epochComm{rank: rank, size: size} }

// set makes c the communicator of the current epoch (nil: none). The caller closes the old one.
func (e *epochComm) set(c nccl.Comm) {
	if c == nil {
		e.cur.Store(nil)
		return
	}
	e.cur.Store(&commBox{c})
}

func (e *epochComm) get(op string) (nccl.Comm, error) {
	if b := e.cur.Load(); b != nil {
		return b.c, nil
	}
	return nil, &nccl.OpError{Rank: e.rank, Op: op, Peer: -1, Err: fmt.Errorf("%w: no communicator for this epoch", nccl.ErrClosed)}
}

func (e *epochComm) Rank() int { return e.rank }
func (e *epochComm) Size() int { return e.size }

func (e *epochComm) AllReduce(ctx context.Context, buf nccl.Buffer) error {
	c, err := e.get("all-reduce")
	if err != nil {
		return err
	}
	return c.AllReduce(ctx, buf)
}

func (e *epochComm) AllGather(ctx context.Context, send, recv nccl.Buffer) error {
	c, err := e.get("all-gather")
	if err != nil {
		return err
	}
	return c.AllGather(ctx, send, recv)
}

func (e *epochComm) Broadcast(ctx context.Context, buf nccl.Buffer, root int) error {
	c, err := e.get("broadcast")
	if err != nil {
		return err
	}
	return c.Broadcast(ctx, buf, root)
}

func (e *epochComm) Barrier(ctx context.Context) error {
	c, err := e.get("barrier")
	if err != nil {
		return err
	}
	return c.Barrier(ctx)
}

// Close does nothing: the worker closes each epoch's communicator itself.
func (e *epochComm) Close() error { return nil }

// connect builds the communicator of rank a.Rank of group g in plan p: Solo for TP 1; otherwise a TCP
// ring whose addresses meet in etcd (each rank publishes its listener's address, then waits for all
// the group's).
func (w *Worker) connect(ctx context.Context, p cluster.Plan, g cluster.Group, a cluster.Assignment) (nccl.Comm, error) {
	if p.TP == 1 {
		return nccl.Solo(), nil
	}
	ctx, cancel := context.WithTimeout(ctx, w.cfg.RendezvousTimeout)
	defer cancel()
	l, err := nccl.Listen(net.JoinHostPort(w.cfg.RingHost, "0"))
	if err != nil {
		return nil, err
	}
	defer l.Close()
	addr := l.Addr()
	if ip := net.ParseIP(w.cfg.RingHost); ip != nil && ip.IsUnspecified() {
		host, _, _ := net.SplitHostPort(w.addr)
		_, port, _ := net.SplitHostPort(addr)
		addr = net.JoinHostPort(host, port)
	}
	lg := w.lg.With(zap.Int64("epoch", p.Epoch), zap.Int("group", g.ID), zap.Int("rank", a.Rank), zap.Int("tp", p.TP))
	if err := w.cli.PutRendezvous(ctx, p.Epoch, g.ID, a.Rank, []byte(addr)); err != nil {
		return nil, err
	}
	lg.Info("waiting for the group's peers", zap.String("ring-addr", addr))
	data, err := w.cli.WaitRendezvous(ctx, p.Epoch, g.ID, p.TP)
	if err != nil {
		return nil, err
	}
	addrs := make([]string, len(data))
	for r, d := range data {
		addrs[r] = string(d)
	}
	comm, err := nccl.Connect(ctx, l, nccl.RingConfig{Rank: a.Rank, Addrs: addrs, OpTimeout: w.cfg.OpTimeout, DialTimeout: w.cfg.OpTimeout})
	if err != nil {
		return nil, err
	}
	lg.Info("communicator ready", zap.Strings("ring", addrs))
	return comm, nil
}
