package cluster

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

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

// DeleteRendezvousBefore deletes the rendezvous data of every epoch below epoch.
func (c *Client) DeleteRendezvousBefore(ctx context.Context, epoch int64) error {
	if epoch < 1 {
		return nil
	}
	ctx, cancel := c.bind(ctx)
	defer cancel()
	from, to := c.key(keyRdzv), c.key(keyRdzv+rdzvEpoch(epoch))
	resp, err := c.cli.Delete(ctx, from, clientv3.WithRange(to))
	if err != nil {
		return fmt.Errorf("cluster: delete rendezvous before epoch %d: %w", epoch, c.ctxErr(ctx, err))
	}
	if resp.Deleted > 0 {
		c.lg.Debug("rendezvous deleted", zap.Int64("before-epoch", epoch), zap.Int64("keys", resp.Deleted))
	}
	return nil
}
