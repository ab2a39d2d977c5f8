package worker

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/tpgroup"
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

// connect builds the communicator of rank a.Rank of group g in plan p (tpgroup.Join): the group meets
// in etcd under the epoch's keys (cluster.Rendezvous); on a device backend (backend.DeviceContext) rank
// 0's NCCL unique id travels there too, under a lease of Config.RendezvousTimeout. The whole is bounded
// by Config.RendezvousTimeout and by ctx (a newer epoch, Close).
func (w *Worker) connect(ctx context.Context, p cluster.Plan, g cluster.Group, a cluster.Assignment) (comm.Comm, error) {
	ctx, cancel := context.WithTimeout(ctx, w.cfg.RendezvousTimeout)
	defer cancel()
	host, _, _ := net.SplitHostPort(w.addr)
	var serverTLS, clientTLS *tls.Config
	if t := w.cfg.TLS; t != nil { // the ring admits only workers of the cluster
		serverTLS, clientTLS = t.PeerServerConfig(security.RoleWorker), t.ClientConfig(security.RoleWorker)
	}
	return tpgroup.Join(ctx, w.cli.Rendezvous(p.Epoch, g.ID, w.cfg.RendezvousTimeout), a.Rank, p.TP, w.ops, tpgroup.Options{
		Device:        w.cfg.Device,
		Name:          w.cfg.ID + " " + w.ops.Name(),
		RingHost:      w.cfg.RingHost,
		AdvertiseHost: host,
		OpTimeout:     w.cfg.OpTimeout,
		Logger:        w.lg.With(zap.Int64("epoch", p.Epoch), zap.Int("group", g.ID)),
		RingServerTLS: serverTLS,
		RingClientTLS: clientTLS,
	})
}
