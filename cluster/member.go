package cluster

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/internal/wait"
)

// Device kinds of the built-in backends. A kind is the name its backend registered under (package
// backend's registry, which this package does not link): any valid name is accepted.
const (
	DeviceCPU  = "cpu"
	DeviceCUDA = "cuda"
)

// Device is one device a worker owns.
type Device struct {
	Kind        string `json:"kind"`         // the backend's registered name: DeviceCPU, DeviceCUDA, ...
	Index       int    `json:"index"`        // ordinal among the host's devices of this kind
	Name        string `json:"name"`         // e.g. "NVIDIA H100 80GB HBM3"
	MemoryTotal int64  `json:"memory_total"` // bytes
	MemoryFree  int64  `json:"memory_free"`  // bytes, when last reported
}

// Member is a worker as it registers itself. It is stored as JSON under members/<ID>.
type Member struct {
	// ID is unique in the cluster, chosen by the caller, e.g. "<host>-<pid>-<n>". Letters, digits
	// and ". _ : @ -", starting with a letter or digit.
	ID string `json:"id"`
	// Addr is the worker's gRPC address, host:port.
	Addr    string            `json:"addr"`
	Host    string            `json:"host"`
	Devices []Device          `json:"devices,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
	// Gossip is the host:port of the worker's gossip node (StartGossip), which the coordinator joins to
	// hear of the worker's death sooner than its lease expires. Empty when the worker runs no gossip.
	Gossip string `json:"gossip,omitempty"`
	// Started is when the worker started; Register sets it to the current time when zero.
	Started time.Time `json:"started"`
}

// GossipMeta returns the meta that the member's gossip node carries (GossipConfig.Meta): its start
// time. A gossip event names a node by member ID; the meta tells which process of that ID it is about,
// since a restarted worker keeps its ID but not its start time. Compare an event's meta with the
// GossipMeta of the registered member. Started must be set (it is what Register stores).
func (m Member) GossipMeta() []byte {
	return []byte(m.Started.UTC().Format(time.RFC3339Nano))
}

// Validate reports a Member that Register would refuse.
func (m Member) Validate() error {
	if !validName(m.ID) {
		return fmt.Errorf("%w: member ID %q: want letters, digits and . _ : @ -", ErrInvalid, m.ID)
	}
	if _, _, err := net.SplitHostPort(m.Addr); err != nil {
		return fmt.Errorf("%w: member %s: address %q: %v", ErrInvalid, m.ID, m.Addr, err)
	}
	if m.Gossip != "" {
		if _, _, err := net.SplitHostPort(m.Gossip); err != nil {
			return fmt.Errorf("%w: member %s: gossip address %q: %v", ErrInvalid, m.ID, m.Gossip, err)
		}
	}
	for i, d := range m.Devices {
		switch {
		case !validName(d.Kind):
			return fmt.Errorf("%w: member %s: device %d: kind %q: want a backend's name (%q, %q, ...: letters, digits and . _ : @ -)",
				ErrInvalid, m.ID, i, d.Kind, DeviceCPU, DeviceCUDA)
		case d.Index < 0:
			return fmt.Errorf("%w: member %s: device %d: negative index %d", ErrInvalid, m.ID, i, d.Index)
		case d.MemoryTotal < 0 || d.MemoryFree < 0:
			return fmt.Errorf("%w: member %s: device %d: negative memory", ErrInvalid, m.ID, i)
		}
	}
	return nil
}

// clone returns a deep copy of m, so that lists handed to different readers share nothing.
func (m Member) clone() Member {
	m.Devices = slices.Clone(m.Devices)
	m.Labels = maps.Clone(m.Labels)
	return m
}

// Registration is a member key kept alive by a lease. Make one with Client.Register. Its methods are
// safe for concurrent use.
type Registration struct {
	c     *Client
	id    string
	key   string
	lease clientv3.LeaseID
	ttl   int64

	stop context.CancelFunc // ends the keep-alive
	done chan struct{}      // closed when the keep-alive goroutine returns

	mu     sync.Mutex
	closed bool
}

// Register puts m under members/<m.ID> with a lease of ttl (rounded up to whole seconds; etcd raises
// it to its minimum, 1.5 election timeouts rounded up: 2 s with etcd's defaults) and keeps the lease
// alive in the background, renewing every TTL/3, until Close, the client's Close, or the lease is lost.
// It fails with ErrMemberExists if the key already exists (a live process holds the ID). A zero
// m.Started is set to the current time.
func (c *Client) Register(ctx context.Context, m Member, ttl time.Duration) (*Registration, error) {
	if m.Started.IsZero() {
		m.Started = time.Now().UTC()
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("%w: register %s: TTL %v, want > 0", ErrInvalid, m.ID, ttl)
	}
	val, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("cluster: register %s: %w", m.ID, err)
	}
	ctx, cancel := c.bind(ctx)
	defer cancel()

	key := c.key(keyMembers + m.ID)
	secs := ttlSeconds(ttl)
	g, err := c.cli.Grant(ctx, secs)
	if err != nil {
		return nil, fmt.Errorf("cluster: register %s: grant lease: %w", m.ID, c.ctxErr(ctx, err))
	}
	r := &Registration{c: c, id: m.ID, key: key, lease: g.ID, ttl: g.TTL, done: make(chan struct{})}
	resp, err := c.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(g.ID))).
		Commit()
	if err != nil {
		r.revoke()
		return nil, fmt.Errorf("cluster: register %s: %w", m.ID, c.ctxErr(ctx, err))
	}
	if !resp.Succeeded {
		r.revoke()
		return nil, fmt.Errorf("%w: %s (key %s)", ErrMemberExists, m.ID, key)
	}

	kctx, stop := context.WithCancel(c.ctx)
	ka, err := c.cli.KeepAlive(kctx, g.ID)
	if err != nil {
		stop()
		r.revoke()
		return nil, fmt.Errorf("cluster: register %s: keep lease alive: %w", m.ID, c.ctxErr(ctx, err))
	}
	r.stop = stop
	lg := c.lg.With(zap.String("member-id", m.ID), zap.String("lease-id", fmt.Sprintf("%x", int64(g.ID))))
	if !c.track() {
		stop()
		return nil, fmt.Errorf("cluster: register %s: %w", m.ID, ErrClosed)
	}
	go func() {
		defer c.wg.Done()
		defer close(r.done)
		for range ka { // the lessor closes ka when kctx ends or the lease cannot be renewed
		}
		r.mu.Lock()
		closed := r.closed
		r.mu.Unlock()
		if !closed && c.ctx.Err() == nil {
			lg.Warn("member lease lost")
		}
	}()
	lg.Info("member registered", zap.String("addr", m.Addr), zap.Int64("ttl-seconds", g.TTL))
	return r, nil
}

// ID returns the registered member's ID.
func (r *Registration) ID() string { return r.id }

// Lease returns the registration's etcd lease.
func (r *Registration) Lease() clientv3.LeaseID { return r.lease }

// Done returns a channel that is closed when the lease is no longer kept alive: it was lost (etcd
// unreachable past the TTL, or revoked by someone else), or Close or the client's Close ended it.
func (r *Registration) Done() <-chan struct{} { return r.done }

// Update rewrites the member's value under the same lease, e.g. with new free memory. m.ID must be
// empty or the registered ID. It fails with ErrLeaseLost when the lease is gone and with ErrClosed
// after Close.
func (r *Registration) Update(ctx context.Context, m Member) error {
	if m.ID == "" {
		m.ID = r.id
	}
	if m.ID != r.id {
		return fmt.Errorf("%w: update %s: member ID %q differs", ErrInvalid, r.id, m.ID)
	}
	if err := m.Validate(); err != nil {
		return err
	}
	r.mu.Lock()
	closed := r.closed
	r.mu.Unlock()
	if closed {
		return fmt.Errorf("cluster: update %s: %w", r.id, ErrClosed)
	}
	select {
	case <-r.done:
		return fmt.Errorf("cluster: update %s: %w", r.id, ErrLeaseLost)
	default:
	}
	val, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("cluster: update %s: %w", r.id, err)
	}
	ctx, cancel := r.c.bind(ctx)
	defer cancel()
	resp, err := r.c.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.LeaseValue(r.key), "=", r.lease)).
		Then(clientv3.OpPut(r.key, string(val), clientv3.WithLease(r.lease))).
		Commit()
	if err != nil {
		return fmt.Errorf("cluster: update %s: %w", r.id, r.c.ctxErr(ctx, err))
	}
	if !resp.Succeeded {
		return fmt.Errorf("cluster: update %s: %w", r.id, ErrLeaseLost)
	}
	return nil
}

// Close deregisters the member: it stops the keep-alive and revokes the lease, which deletes the key
// at once. It is idempotent; after the client's Close it returns ErrClosed (the lease then expires
// after its TTL).
func (r *Registration) Close(ctx context.Context) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.stop()
	<-r.done
	if r.c.ctx.Err() != nil {
		return fmt.Errorf("cluster: deregister %s: %w", r.id, ErrClosed)
	}
	ctx, cancel := r.c.bind(ctx)
	defer cancel()
	if _, err := r.c.cli.Revoke(ctx, r.lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("cluster: deregister %s: revoke lease: %w", r.id, r.c.ctxErr(ctx, err))
	}
	r.c.lg.Info("member deregistered", zap.String("member-id", r.id))
	return nil
}

// revoke revokes the lease within its TTL, for clean-up after a failed Register.
func (r *Registration) revoke() {
	ctx, cancel := context.WithTimeout(r.c.ctx, time.Duration(r.ttl)*time.Second)
	defer cancel()
	_, _ = r.c.cli.Revoke(ctx, r.lease)
}

// Members returns the registered members sorted by ID and the etcd revision they were read at.
// Values that do not decode are logged and skipped.
func (c *Client) Members(ctx context.Context) ([]Member, int64, error) {
	ctx, cancel := c.bind(ctx)
	defer cancel()
	resp, err := c.cli.Get(ctx, c.key(keyMembers), clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("cluster: members: %w", c.ctxErr(ctx, err))
	}
	ms := make([]Member, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if m, ok := c.decodeMember(kv); ok {
			ms = append(ms, m)
		}
	}
	sortMembers(ms)
	return ms, resp.Header.Revision, nil
}

func sortMembers(ms []Member) {
	slices.SortFunc(ms, func(a, b Member) int { return cmp.Compare(a.ID, b.ID) })
}

func (c *Client) decodeMember(kv *mvccpb.KeyValue) (Member, bool) {
	var m Member
	if err := json.Unmarshal(kv.Value, &m); err != nil {
		c.lg.Warn("skipping undecodable member", zap.ByteString("key", kv.Key), zap.Error(err))
		return Member{}, false
	}
	return m, true
}

// WatchMembers returns a channel that receives the full member list (sorted by ID) first, then again
// after every change. The channel has a buffer of one and keeps only the latest list: when the reader
// is slow, an unread list is replaced by the newer one, so a reader always sees the latest state but
// may miss intermediate ones. A burst of changes in one etcd watch response gives one list. After a
// watch error (compaction, lost leader) the list is read and sent again, possibly unchanged. The
// channel is closed when ctx ends or the client is closed. Lists are never shared between sends.
func (c *Client) WatchMembers(ctx context.Context) <-chan []Member {
	out := make(chan []Member, 1)
	pfx := c.key(keyMembers)
	c.goWatch(ctx, func(ctx context.Context) {
		defer close(out)
		publish := func(set map[string]Member) {
			ms := make([]Member, 0, len(set))
			for _, m := range set {
				ms = append(ms, m.clone())
			}
			sortMembers(ms)
			select {
			case out <- ms:
			default:
				select { // replace the unread list; out is then empty and this is its only sender
				case <-out:
				default:
				}
				out <- ms
			}
		}
		for ctx.Err() == nil {
			resp, err := c.cli.Get(ctx, pfx, clientv3.WithPrefix())
			if err != nil {
				if ctx.Err() == nil {
					c.lg.Warn("listing members failed; retrying", zap.Error(err))
				}
				wait.Sleep(ctx, retryWait)
				continue
			}
			set := make(map[string]Member, len(resp.Kvs))
			for _, kv := range resp.Kvs {
				if m, ok := c.decodeMember(kv); ok {
					set[string(kv.Key)] = m
				}
			}
			publish(set)
			wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
			wch := c.cli.Watch(wctx, pfx, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
			for wr := range wch {
				if err := wr.Err(); err != nil {
					if ctx.Err() == nil {
						c.lg.Warn("member watch failed; listing again", zap.Error(err))
					}
					break
				}
				for _, ev := range wr.Events {
					switch ev.Type {
					case clientv3.EventTypePut:
						if m, ok := c.decodeMember(ev.Kv); ok {
							set[string(ev.Kv.Key)] = m
						}
					case clientv3.EventTypeDelete:
						delete(set, string(ev.Kv.Key))
					}
				}
				if len(wr.Events) > 0 {
					publish(set)
				}
			}
			wcancel()
			wait.Sleep(ctx, retryWait)
		}
	})
	return out
}

// Advertised returns the address to publish for a listener bound at bound: adv when set, else the bound
// address with the host name in place of an unspecified host (0.0.0.0, ::).
func Advertised(adv string, bound net.Addr) string {
	if adv != "" {
		return adv
	}
	s := bound.String()
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return s
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		if h, err := os.Hostname(); err == nil && h != "" {
			return net.JoinHostPort(h, port)
		}
	}
	return s
}
