package cluster

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/internal/wait"
)

// rdzvEpoch is the key segment of an epoch: zero-padded to 20 digits so that keys sort by epoch and
// DeleteRendezvousBefore is one range delete.
func rdzvEpoch(epoch int64) string { return fmt.Sprintf("%020d", epoch) }

// rdzvGroupPrefix returns the key prefix of one group's rendezvous in one epoch.
func (c *Client) rdzvGroupPrefix(epoch int64, group int) string {
	return c.key(keyRdzv + rdzvEpoch(epoch) + "/" + strconv.Itoa(group) + "/")
}

func checkRdzv(op string, epoch int64, group int) error {
	if epoch < 1 || group < 0 {
		return fmt.Errorf("%w: %s: epoch %d, group %d: want epoch >= 1, group >= 0", ErrInvalid, op, epoch, group)
	}
	return nil
}

// PutRendezvous publishes one rank's data for building the communicator of a group in an epoch: the
// NCCL unique id from rank 0, or each rank's TCP ring address. It is a plain put (no lease): the
// coordinator removes old epochs with DeleteRendezvousBefore. Publishing again replaces the data.
func (c *Client) PutRendezvous(ctx context.Context, epoch int64, group, rank int, data []byte) error {
	if err := checkRdzv("put rendezvous", epoch, group); err != nil {
		return err
	}
	if rank < 0 {
		return fmt.Errorf("%w: put rendezvous: negative rank %d", ErrInvalid, rank)
	}
	ctx, cancel := c.bind(ctx)
	defer cancel()
	key := c.rdzvGroupPrefix(epoch, group) + strconv.Itoa(rank)
	if _, err := c.cli.Put(ctx, key, string(data)); err != nil {
		return fmt.Errorf("cluster: put rendezvous epoch %d group %d rank %d: %w", epoch, group, rank, c.ctxErr(ctx, err))
	}
	return nil
}

// WaitRendezvous blocks until ranks 0..size-1 of group have published for epoch, and returns their
// data in rank order. It watches etcd rather than polling. Keys of ranks outside 0..size-1 are
// ignored. When ctx ends first it fails with an error that wraps ErrRendezvousIncomplete and ctx's
// error and names the missing ranks.
func (c *Client) WaitRendezvous(ctx context.Context, epoch int64, group, size int) ([][]byte, error) {
	if err := checkRdzv("wait rendezvous", epoch, group); err != nil {
		return nil, err
	}
	if size < 1 {
		return nil, fmt.Errorf("%w: wait rendezvous: size %d, want >= 1", ErrInvalid, size)
	}
	bctx, cancel := c.bind(ctx)
	defer cancel()
	pfx := c.rdzvGroupPrefix(epoch, group)
	got := make([][]byte, size)
	have := make([]bool, size)
	set := func(key, value []byte, present bool) {
		r, err := strconv.Atoi(strings.TrimPrefix(string(key), pfx))
		if err != nil || r < 0 || r >= size {
			return
		}
		got[r], have[r] = slices.Clone(value), present
	}
	missing := func() []int {
		var m []int
		for r, ok := range have {
			if !ok {
				m = append(m, r)
			}
		}
		return m
	}
	fail := func(err error) ([][]byte, error) {
		if cerr := c.ctxErr(bctx, nil); cerr != nil {
			if errors.Is(cerr, ErrClosed) {
				return nil, fmt.Errorf("cluster: wait rendezvous epoch %d group %d: %w", epoch, group, ErrClosed)
			}
			return nil, fmt.Errorf("%w: epoch %d group %d: missing ranks %v of %d: %w",
				ErrRendezvousIncomplete, epoch, group, missing(), size, cerr)
		}
		return nil, fmt.Errorf("cluster: wait rendezvous epoch %d group %d: %w", epoch, group, err)
	}

	for {
		resp, err := c.cli.Get(bctx, pfx, clientv3.WithPrefix())
		if err != nil {
			return fail(err)
		}
		clear(have)
		for _, kv := range resp.Kvs {
			set(kv.Key, kv.Value, true)
		}
		if len(missing()) == 0 {
			return got, nil
		}
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(bctx))
		for wr := range c.cli.Watch(wctx, pfx, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1)) {
			if err := wr.Err(); err != nil {
				c.lg.Debug("rendezvous watch failed; reading again", zap.Error(err))
				break
			}
			for _, ev := range wr.Events {
				set(ev.Kv.Key, ev.Kv.Value, ev.Type == clientv3.EventTypePut)
			}
			if len(missing()) == 0 {
				wcancel()
				return got, nil
			}
		}
		wcancel()
		if bctx.Err() != nil {
			return fail(bctx.Err())
		}
		if !wait.Sleep(bctx, retryWait) {
			return fail(bctx.Err())
		}
	}
}

// DeleteRendezvousBefore deletes the rendezvous data (rdzv/ keys) and the NCCL unique ids (nccl/ keys)
// of every epoch below epoch, in one transaction.
func (c *Client) DeleteRendezvousBefore(ctx context.Context, epoch int64) error {
	if epoch < 1 {
		return nil
	}
	ctx, cancel := c.bind(ctx)
	defer cancel()
	var ops []clientv3.Op
	for _, k := range []string{keyRdzv, keyNCCL} {
		ops = append(ops, clientv3.OpDelete(c.key(k), clientv3.WithRange(c.key(k+rdzvEpoch(epoch)))))
	}
	resp, err := c.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("cluster: delete rendezvous before epoch %d: %w", epoch, c.ctxErr(ctx, err))
	}
	var deleted int64
	for _, r := range resp.Responses {
		if d := r.GetResponseDeleteRange(); d != nil {
			deleted += d.Deleted
		}
	}
	if deleted > 0 {
		c.lg.Debug("rendezvous deleted", zap.Int64("before-epoch", epoch), zap.Int64("keys", deleted))
	}
	return nil
}

// ncclIDKey returns the key of one group's NCCL unique id in one epoch.
func (c *Client) ncclIDKey(epoch int64, group int) string {
	return c.key(keyNCCL + rdzvEpoch(epoch) + "/" + strconv.Itoa(group))
}

// PutNCCLID publishes the NCCL unique id of group in epoch (raw bytes, as nccl.UniqueID.MarshalBinary
// makes them) under nccl/<epoch>/<group>. Rank 0 of the group (or the coordinator) makes the id and
// puts it; the other ranks read it with WaitNCCLID. Publishing again replaces it: the latest id is
// the group's.
//
// The key is scoped to the epoch, so a new epoch never reads an old epoch's id (whose bootstrap
// listener is gone), and DeleteRendezvousBefore removes it with the epoch's rendezvous data. With ttl
// > 0 it is also attached to a lease of that TTL (rounded up to whole seconds) that is not kept
// alive: the id disappears by itself once the group has had ttl to read it, even when no coordinator
// cleans up. Give a ttl longer than the wait of the slowest rank.
func (c *Client) PutNCCLID(ctx context.Context, epoch int64, group int, id []byte, ttl time.Duration) error {
	if err := checkRdzv("put nccl id", epoch, group); err != nil {
		return err
	}
	switch {
	case len(id) == 0:
		return fmt.Errorf("%w: put nccl id: epoch %d group %d: empty id", ErrInvalid, epoch, group)
	case ttl < 0:
		return fmt.Errorf("%w: put nccl id: negative TTL %v", ErrInvalid, ttl)
	}
	ctx, cancel := c.bind(ctx)
	defer cancel()
	var opts []clientv3.OpOption
	if ttl > 0 {
		g, err := c.cli.Grant(ctx, ttlSeconds(ttl))
		if err != nil {
			return fmt.Errorf("cluster: put nccl id epoch %d group %d: grant lease: %w", epoch, group, c.ctxErr(ctx, err))
		}
		opts = append(opts, clientv3.WithLease(g.ID))
	}
	if _, err := c.cli.Put(ctx, c.ncclIDKey(epoch, group), string(id), opts...); err != nil {
		return fmt.Errorf("cluster: put nccl id epoch %d group %d: %w", epoch, group, c.ctxErr(ctx, err))
	}
	return nil
}

// WaitNCCLID blocks until the NCCL unique id of group in epoch is published (PutNCCLID) and returns its
// bytes. It watches etcd rather than polling. When ctx ends first it fails with an error that wraps
// ErrRendezvousIncomplete and ctx's error and says whose id is missing.
func (c *Client) WaitNCCLID(ctx context.Context, epoch int64, group int) ([]byte, error) {
	if err := checkRdzv("wait nccl id", epoch, group); err != nil {
		return nil, err
	}
	bctx, cancel := c.bind(ctx)
	defer cancel()
	key := c.ncclIDKey(epoch, group)
	fail := func(err error) ([]byte, error) {
		if cerr := c.ctxErr(bctx, nil); cerr != nil {
			if errors.Is(cerr, ErrClosed) {
				return nil, fmt.Errorf("cluster: wait nccl id epoch %d group %d: %w", epoch, group, ErrClosed)
			}
			return nil, fmt.Errorf("%w: epoch %d group %d: rank 0 did not publish the NCCL unique id (%s): %w",
				ErrRendezvousIncomplete, epoch, group, key, cerr)
		}
		return nil, fmt.Errorf("cluster: wait nccl id epoch %d group %d: %w", epoch, group, err)
	}
	for {
		resp, err := c.cli.Get(bctx, key)
		if err != nil {
			return fail(err)
		}
		if len(resp.Kvs) > 0 && len(resp.Kvs[0].Value) > 0 {
			return slices.Clone(resp.Kvs[0].Value), nil
		}
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(bctx))
		for wr := range c.cli.Watch(wctx, key, clientv3.WithRev(resp.Header.Revision+1)) {
			if err := wr.Err(); err != nil {
				c.lg.Debug("nccl id watch failed; reading again", zap.Error(err))
				break
			}
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypePut && len(ev.Kv.Value) > 0 {
					wcancel()
					return slices.Clone(ev.Kv.Value), nil
				}
			}
		}
		wcancel()
		if bctx.Err() != nil {
			return fail(bctx.Err())
		}
		if !wait.Sleep(bctx, retryWait) {
			return fail(bctx.Err())
		}
	}
}

// Rendezvous is where one TP group meets in etcd for one plan epoch: the records of its ranks under
// rdzv/<epoch>/<group>/<rank> and rank 0's NCCL unique id under nccl/<epoch>/<group>. It implements the
// Rendezvous that package tpgroup's Join takes (the other implementation is tpgroup.Dir, a directory
// for processes started by hand). Make one with Client.Rendezvous; it is safe for concurrent use.
type Rendezvous struct {
	c     *Client
	epoch int64
	group int
	idTTL time.Duration
}

// Rendezvous returns the meeting place of group in epoch. idTTL is the TTL of the NCCL unique id's lease
// (see PutNCCLID; 0: no lease).
func (c *Client) Rendezvous(epoch int64, group int, idTTL time.Duration) *Rendezvous {
	return &Rendezvous{c: c, epoch: epoch, group: group, idTTL: idTTL}
}

// Exchange publishes rec as rank's record (PutRendezvous) and waits until ranks 0..size-1 have
// published theirs (WaitRendezvous), returning them in rank order. When ctx ends first the error wraps
// ErrRendezvousIncomplete and names the missing ranks.
func (r *Rendezvous) Exchange(ctx context.Context, rank, size int, rec []byte) ([][]byte, error) {
	if err := r.c.PutRendezvous(ctx, r.epoch, r.group, rank, rec); err != nil {
		return nil, err
	}
	return r.c.WaitRendezvous(ctx, r.epoch, r.group, size)
}

// PublishID publishes the group's NCCL unique id (PutNCCLID, under a lease of the idTTL).
func (r *Rendezvous) PublishID(ctx context.Context, id []byte) error {
	return r.c.PutNCCLID(ctx, r.epoch, r.group, id, r.idTTL)
}

// WaitID waits for the group's NCCL unique id (WaitNCCLID).
func (r *Rendezvous) WaitID(ctx context.Context) ([]byte, error) {
	return r.c.WaitNCCLID(ctx, r.epoch, r.group)
}

// String names the meeting place in errors: "etcd epoch E group G".
func (r *Rendezvous) String() string { return fmt.Sprintf("etcd epoch %d group %d", r.epoch, r.group) }
