package worker

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/comm/nccl"
)

// epochComm is the communicator a loaded model holds for its whole life: it forwards every collective
// to the communicator of the current epoch, so weights outlive the epochs that reuse them. Between
// epochs it has none, and collectives fail with an error wrapping comm.ErrClosed.
type epochComm struct {
	rank, size int
	device     bool // the epochs' communicators are NCCL's, which take device buffers
	cur        atomic.Pointer[commBox]
}

// commBox lets an atomic.Pointer hold an interface value.
type commBox struct{ c comm.Comm }

var _ comm.Comm = (*epochComm)(nil)

func newEpochComm(rank, size int, device bool) *epochComm {
	return &epochComm{rank: rank, size: size, device: device}
}

// AcceptsDeviceBuffers tells comm.AcceptsDeviceBuffers (and so the GPU backend) that the epochs'
// communicators are NCCL's: device tensors go to them as they are.
func (e *epochComm) AcceptsDeviceBuffers() bool { return e.device }

// set makes c the communicator of the current epoch (nil: none). The caller closes the old one.
func (e *epochComm) set(c comm.Comm) {
	if c == nil {
		e.cur.Store(nil)
		return
	}
	e.cur.Store(&commBox{c})
}

// Current returns the communicator of the current epoch, nil between epochs (comm.Underlying).
func (e *epochComm) Current() comm.Comm {
	if b := e.cur.Load(); b != nil {
		return b.c
	}
	return nil
}

func (e *epochComm) get(op string) (comm.Comm, error) {
	if b := e.cur.Load(); b != nil {
		return b.c, nil
	}
	return nil, &comm.OpError{Rank: e.rank, Op: op, Peer: -1, Err: fmt.Errorf("%w: no communicator for this epoch", comm.ErrClosed)}
}

func (e *epochComm) Rank() int { return e.rank }
func (e *epochComm) Size() int { return e.size }

func (e *epochComm) AllReduce(ctx context.Context, buf comm.Buffer) error {
	c, err := e.get("all-reduce")
	if err != nil {
		return err
	}
	return c.AllReduce(ctx, buf)
}

func (e *epochComm) AllGather(ctx context.Context, send, recv comm.Buffer) error {
	c, err := e.get("all-gather")
	if err != nil {
		return err
	}
	return c.AllGather(ctx, send, recv)
}

func (e *epochComm) Broadcast(ctx context.Context, buf comm.Buffer, root int) error {
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

// connect builds the communicator of rank a.Rank of group g in plan p: Solo for TP 1; on GPU an NCCL
// communicator (connectNCCL); otherwise a TCP ring whose addresses meet in etcd (each rank publishes
// its listener's address, then waits for all the group's).
func (w *Worker) connect(ctx context.Context, p cluster.Plan, g cluster.Group, a cluster.Assignment) (comm.Comm, error) {
	if p.TP == 1 {
		return comm.Solo(), nil
	}
	if w.gpu != nil {
		return w.connectNCCL(ctx, p, g, a)
	}
	ctx, cancel := context.WithTimeout(ctx, w.cfg.RendezvousTimeout)
	defer cancel()
	l, err := comm.Listen(net.JoinHostPort(w.cfg.RingHost, "0"))
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
	comm, err := comm.Connect(ctx, l, comm.RingConfig{Rank: a.Rank, Addrs: addrs, OpTimeout: w.cfg.OpTimeout, DialTimeout: w.cfg.OpTimeout})
	if err != nil {
		return nil, err
	}
	lg.Info("communicator ready", zap.Strings("ring", addrs))
	return comm, nil
}

// connectNCCL builds the NCCL communicator of rank a.Rank of group g in plan p, on the worker's GPU:
// the group meets in etcd (ncclExchange: every rank marks itself ready once its weights are loaded;
// then rank 0 makes the NCCL unique id and publishes it under nccl/<epoch>/<group>, and the others
// read it), then every rank joins with the id (nccl.Join, the GPU's context current). The whole is
// bounded by Config.RendezvousTimeout and by ctx (a newer epoch, Close).
func (w *Worker) connectNCCL(ctx context.Context, p cluster.Plan, g cluster.Group, a cluster.Assignment) (comm.Comm, error) {
	ctx, cancel := context.WithTimeout(ctx, w.cfg.RendezvousTimeout)
	defer cancel()
	lg := w.lg.With(zap.Int64("epoch", p.Epoch), zap.Int("group", g.ID), zap.Int("rank", a.Rank), zap.Int("tp", p.TP))
	// NCCL first, so that a host without it fails at once, not after the rendezvous.
	if _, _, err := nccl.Library(); err != nil {
		return nil, err
	}
	mark := []byte(w.cfg.ID + " " + w.gpu.Name())
	lg.Info("waiting for the group's peers", zap.ByteString("mark", mark))
	start := time.Now()
	id, peers, err := ncclExchange(ctx, w.cli, ncclGroup{epoch: p.Epoch, group: g.ID, rank: a.Rank, size: p.TP},
		mark, w.cfg.RendezvousTimeout, nccl.NewUniqueID)
	if err != nil {
		return nil, err
	}
	lg.Debug("NCCL unique id exchanged; initialising NCCL", zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	comm, err := nccl.Join(ctx, nccl.Config{ID: id, Rank: a.Rank, Size: p.TP, MakeCurrent: w.gpu.MakeCurrent, OpTimeout: w.cfg.OpTimeout})
	if err != nil {
		return nil, err
	}
	names := make([]string, len(peers))
	for r, d := range peers {
		names[r] = string(d)
	}
	lg.Info("communicator ready", zap.String("kind", "nccl"), zap.Strings("ranks", names),
		zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	return comm, nil
}

// ncclGroup names one rank of one TP group in one plan epoch.
type ncclGroup struct {
	epoch             int64
	group, rank, size int
}

// ncclExchange is the etcd half of building an NCCL communicator: this rank publishes mark under
// rdzv/<epoch>/<group>/<rank> and waits until every rank of the group has (so all are alive and
// have loaded their weights before NCCL's uninterruptible initialisation starts); then rank 0 makes
// the group's unique id with newID and publishes it under nccl/<epoch>/<group>, with a lease of ttl,
// and the other ranks wait for it. It returns the id and every rank's mark, in rank order. Errors
// name the missing ranks (or rank 0's missing id) when ctx ends first.
func ncclExchange(ctx context.Context, cli *cluster.Client, r ncclGroup, mark []byte, ttl time.Duration,
	newID func() (nccl.UniqueID, error)) (nccl.UniqueID, [][]byte, error) {
	var id nccl.UniqueID
	if err := cli.PutRendezvous(ctx, r.epoch, r.group, r.rank, mark); err != nil {
		return id, nil, err
	}
	peers, err := cli.WaitRendezvous(ctx, r.epoch, r.group, r.size)
	if err != nil {
		return id, nil, err
	}
	if r.rank == 0 {
		if id, err = newID(); err != nil {
			return id, nil, fmt.Errorf("make the NCCL unique id: %w", err)
		}
		raw, _ := id.MarshalBinary() // never fails
		if err := cli.PutNCCLID(ctx, r.epoch, r.group, raw, ttl); err != nil {
			return id, nil, err
		}
		return id, peers, nil
	}
	raw, err := cli.WaitNCCLID(ctx, r.epoch, r.group)
	if err != nil {
		return id, nil, err
	}
	if err := id.UnmarshalBinary(raw); err != nil {
		return id, nil, fmt.Errorf("the NCCL unique id of epoch %d group %d in etcd: %w", r.epoch, r.group, err)
	}
	return id, peers, nil
}
