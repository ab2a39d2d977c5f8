package cluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

// Leadership is a won coordinator election: the campaigner's key under leader/ is the oldest, held by a
// lease kept alive in the background. Make one with Client.Campaign. Its methods are safe for
// concurrent use.
type Leadership struct {
	c        *Client
	id       string
	session  *concurrency.Session
	election *concurrency.Election
	key      string
	rev      int64

	done     chan struct{} // closed when the watch goroutine returns: leadership lost or given up
	stop     chan struct{} // closed by Resign
	stopOnce sync.Once

	resignOnce sync.Once
	resignErr  error
}

// Campaign blocks until this process leads the cluster's coordinators under id, or ctx ends. The
// election key is held by a lease of ttl (whole seconds, rounded up; etcd's minimum applies, see
// Register): if this process dies, another campaigner takes over within about ttl. It uses etcd's
// concurrency.Election under leader/, so `etcdctl elect --listen` works on the same prefix.
func (c *Client) Campaign(ctx context.Context, id string, ttl time.Duration) (*Leadership, error) {
	if id == "" {
		return nil, fmt.Errorf("%w: campaign: empty id", ErrInvalid)
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("%w: campaign %s: TTL %v, want > 0", ErrInvalid, id, ttl)
	}
	bctx, cancel := c.bind(ctx)
	defer cancel()
	secs := ttlSeconds(ttl)
	g, err := c.cli.Grant(bctx, secs)
	if err != nil {
		return nil, fmt.Errorf("cluster: campaign %s: grant lease: %w", id, c.ctxErr(bctx, err))
	}
	// The session's context is the client's lifetime, so Client.Close ends its keep-alive.
	s, err := concurrency.NewSession(c.cli, concurrency.WithLease(g.ID), concurrency.WithTTL(int(g.TTL)), concurrency.WithContext(c.ctx))
	if err != nil {
		c.revoke(g.ID, g.TTL)
		return nil, fmt.Errorf("cluster: campaign %s: session: %w", id, c.ctxErr(bctx, err))
	}
	e := concurrency.NewElection(s, c.key(keyLeader))
	if err := e.Campaign(bctx, id); err != nil {
		s.Orphan()
		c.revoke(g.ID, g.TTL)
		return nil, fmt.Errorf("cluster: campaign %s: %w", id, c.ctxErr(bctx, err))
	}
	l := &Leadership{
		c: c, id: id, session: s, election: e, key: e.Key(), rev: e.Rev(),
		done: make(chan struct{}), stop: make(chan struct{}),
	}
	lg := c.lg.With(zap.String("leader-id", id), zap.String("leader-key", l.key))
	if !c.track() {
		s.Orphan()
		return nil, fmt.Errorf("cluster: campaign %s: %w", id, ErrClosed)
	}
	go func() {
		defer c.wg.Done()
		defer close(l.done)
		reason := l.watch()
		if reason != "" && c.ctx.Err() == nil {
			lg.Warn("leadership lost", zap.String("reason", reason))
		}
	}()
	lg.Info("leadership won", zap.Int64("ttl-seconds", g.TTL))
	return l, nil
}

// watch returns when the leadership ends: "" when Resign or the client's Close ended it, else why it
// was lost.
func (l *Leadership) watch() string {
	sctx := l.session.Ctx() // ends when the lease is lost or the session orphaned
	rev := l.rev
	for {
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(sctx))
		wch := l.c.cli.Watch(wctx, l.key, clientv3.WithRev(rev))
	events:
		for {
			select {
			case <-l.stop:
				wcancel()
				return ""
			case <-l.session.Done():
				wcancel()
				return "lease expired or could not be renewed"
			case wr, ok := <-wch:
				if !ok {
					break events
				}
				if wr.Err() != nil {
					break events
				}
				for _, ev := range wr.Events {
					if ev.Type == clientv3.EventTypeDelete {
						wcancel()
						return "leader key deleted"
					}
				}
				rev = wr.Header.Revision + 1
			}
		}
		wcancel()
		// The watch failed (no etcd leader, compaction): check the key is still ours, then watch again.
		select {
		case <-l.stop:
			return ""
		case <-l.session.Done():
			return "lease expired or could not be renewed"
		case <-time.After(retryWait):
		}
		resp, err := l.c.cli.Get(sctx, l.key)
		if err != nil {
			continue
		}
		if len(resp.Kvs) == 0 || resp.Kvs[0].CreateRevision != l.rev {
			return "leader key deleted"
		}
		rev = resp.Header.Revision + 1
	}
}

// ID returns the id this process campaigned with.
func (l *Leadership) ID() string { return l.id }

// Key returns the election key this leadership holds.
func (l *Leadership) Key() string { return l.key }

// Rev returns the creation revision of the election key.
func (l *Leadership) Rev() int64 { return l.rev }

// Done returns a channel that is closed when the leadership ends: the lease is lost, the key is
// deleted, Resign was called, or the client was closed.
func (l *Leadership) Done() <-chan struct{} { return l.done }

// PutPlan is Client.PutPlan guarded by this leadership: the write happens only while the election key
// is still this leadership's, else it fails with ErrNotLeader. This fences a deposed coordinator that
// has not yet noticed.
func (l *Leadership) PutPlan(ctx context.Context, p Plan, prevEpoch int64) error {
	return l.c.putPlan(ctx, p, prevEpoch, &planGuard{key: l.key, rev: l.rev})
}

// Resign gives up the leadership: it deletes the election key, so the next campaigner leads at once,
// and revokes the lease. It is idempotent and returns the first call's error.
func (l *Leadership) Resign(ctx context.Context) error {
	l.resignOnce.Do(func() {
		l.stopOnce.Do(func() { close(l.stop) })
		<-l.done
		if l.c.ctx.Err() != nil {
			l.resignErr = fmt.Errorf("cluster: resign %s: %w", l.id, ErrClosed)
			return
		}
		ctx, cancel := l.c.bind(ctx)
		defer cancel()
		var errs []error
		if err := l.election.Resign(ctx); err != nil {
			errs = append(errs, fmt.Errorf("delete leader key: %w", l.c.ctxErr(ctx, err)))
		}
		l.session.Orphan()
		if _, err := l.c.cli.Revoke(ctx, l.session.Lease()); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			errs = append(errs, fmt.Errorf("revoke lease: %w", l.c.ctxErr(ctx, err)))
		}
		if err := errors.Join(errs...); err != nil {
			l.resignErr = fmt.Errorf("cluster: resign %s: %w", l.id, err)
			return
		}
		l.c.lg.Info("leadership resigned", zap.String("leader-id", l.id))
	})
	return l.resignErr
}

// Leader returns the current leader's id, and false when no one leads.
func (c *Client) Leader(ctx context.Context) (string, bool, error) {
	ctx, cancel := c.bind(ctx)
	defer cancel()
	resp, err := c.cli.Get(ctx, c.key(keyLeader+"/"), clientv3.WithFirstCreate()...)
	if err != nil {
		return "", false, fmt.Errorf("cluster: read leader: %w", c.ctxErr(ctx, err))
	}
	if len(resp.Kvs) == 0 {
		return "", false, nil
	}
	return string(resp.Kvs[0].Value), true, nil
}

// revoke revokes a lease within its TTL, for clean-up after a failed call.
func (c *Client) revoke(id clientv3.LeaseID, ttl int64) {
	ctx, cancel := context.WithTimeout(c.ctx, time.Duration(ttl)*time.Second)
	defer cancel()
	_, _ = c.cli.Revoke(ctx, id)
}

// Depose ends the leadership of the coordinator id when it is the current leader: it deletes its
// election key (only if that key still leads with id as its value) and revokes the key's lease, so the
// next campaigner leads at once instead of waiting for the lease to expire. A standby calls it when
// gossip declares the leader's process dead. It reports whether it deposed id; a leader that is not id,
// or no leader, is no error. The deposed process, should it be alive after all, finds its leadership
// lost (Done) and its plan writes refused (ErrNotLeader).
func (c *Client) Depose(ctx context.Context, id string) (bool, error) {
	ctx, cancel := c.bind(ctx)
	defer cancel()
	resp, err := c.cli.Get(ctx, c.key(keyLeader+"/"), clientv3.WithFirstCreate()...)
	if err != nil {
		return false, fmt.Errorf("cluster: depose %s: read leader: %w", id, c.ctxErr(ctx, err))
	}
	if len(resp.Kvs) == 0 || string(resp.Kvs[0].Value) != id {
		return false, nil
	}
	kv := resp.Kvs[0]
	key := string(kv.Key)
	txn, err := c.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", kv.CreateRevision)).
		Then(clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		return false, fmt.Errorf("cluster: depose %s: delete leader key: %w", id, c.ctxErr(ctx, err))
	}
	if !txn.Succeeded {
		return false, nil
	}
	if _, err := c.cli.Revoke(ctx, clientv3.LeaseID(kv.Lease)); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		c.lg.Debug("depose: revoke the deposed leader's lease", zap.String("leader-id", id), zap.Error(err))
	}
	c.lg.Warn("deposed the leader", zap.String("leader-id", id), zap.String("leader-key", key))
	return true, nil
}
