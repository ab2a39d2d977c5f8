package coordinator

import (
	"context"
	"errors"
	"net"
	"syscall"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tpfleet/tpfleet/internal/grpcauth"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/internal/wait"
)

// procGoneFor is how long a coordinator whose process was found gone counts as dead although gossip
// still lists its node: gossip's own verdict comes within a few seconds.
const procGoneFor = 10 * time.Second

// processGoneTimeout bounds the dial that tells a dead leader process from a live one.
const processGoneTimeout = 500 * time.Millisecond

// watchLeader runs while this coordinator stands by with gossip: it holds a health Watch stream open
// to the leader's gRPC address (which the leader's gossip node carries as its meta). A killed process's
// kernel closes its sockets, so the stream ends at once; when a fresh connection to that address is
// then refused, no process serves it any more and this coordinator asks the deposer to depose the
// leader, a second or more before gossip's suspicion would. A leader whose host vanishes without
// closing its sockets (power loss, a partition) is gossip's to detect. It returns when ctx ends.
func (c *Coordinator) watchLeader(ctx context.Context) {
	for ctx.Err() == nil {
		id, addr := c.leaderAddr(ctx)
		if addr == "" {
			wait.Sleep(ctx, standbyPoll)
			continue
		}
		c.watchHealth(ctx, addr)
		if ctx.Err() != nil {
			return
		}
		if processGone(ctx, addr) {
			c.log.Warn("the leader's gRPC address refuses connections: its process is gone", zap.String("leader-id", id), zap.String("leader-addr", addr))
			c.gossipMu.Lock()
			c.procGone[id] = time.Now()
			c.gossipMu.Unlock()
			select {
			case c.coordDown <- id:
			default: // full: the deposer is busy; gossip or the lease will end the leadership
			}
		}
		wait.Sleep(ctx, standbyPoll)
	}
}

// leaderAddr returns the current leader's id and the gRPC address its gossip node published; addr is
// "" when no other coordinator leads or its address is not known (yet).
func (c *Coordinator) leaderAddr(ctx context.Context) (id, addr string) {
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	id, found, err := c.cl.Leader(rctx)
	if err != nil || !found || id == c.cfg.ID {
		return "", ""
	}
	c.gossipMu.Lock()
	defer c.gossipMu.Unlock()
	return id, c.coordAddrs[id]
}

// watchHealth returns when the health Watch stream to addr ends (or cannot start), or ctx ends.
func (c *Coordinator) watchHealth(ctx context.Context, addr string) {
	// The leader is a coordinator: with TLS its certificate must carry that role. The health service
	// is open, so no token is sent.
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(grpcauth.DialCredentials(c.cfg.TLS, security.RoleCoordinator)))
	if err != nil {
		return
	}
	defer func() { _ = conn.Close() }()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := healthpb.NewHealthClient(conn).Watch(wctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return
	}
	for {
		if _, err := stream.Recv(); err != nil {
			return
		}
	}
}

// processGone reports whether a TCP connection to addr is refused: nothing listens there, so the
// process that did is gone (or closed its listener, as a clean exit does after resigning). A timeout or
// any other error says nothing.
func processGone(ctx context.Context, addr string) bool {
	d := net.Dialer{Timeout: processGoneTimeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		_ = conn.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// foundGone reports whether watchLeader found coordinator id's process gone within procGoneFor.
func (c *Coordinator) foundGone(id string) bool {
	c.gossipMu.Lock()
	defer c.gossipMu.Unlock()
	t, ok := c.procGone[id]
	return ok && time.Since(t) < procGoneFor
}
