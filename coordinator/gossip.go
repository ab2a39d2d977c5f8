package coordinator

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
)

// gossipRejoin is how often the leader tries again to join the gossip nodes of registered workers that
// are not among its gossip node's live nodes (not joined yet, unreachable, or declared dead).
const gossipRejoin = 2 * time.Second

// gossipLeaveTimeout bounds Close's wait for its gossip leave message to reach a peer.
const gossipLeaveTimeout = time.Second

// gossipNodeName is the name of a coordinator's gossip node: "coordinator/<id>". A member ID cannot
// hold "/", so it never clashes with a worker's node, which is named after its member ID.
func gossipNodeName(id string) string { return "coordinator/" + id }

// gossipNode is one process's gossip node as its events name it: the member ID and the meta, the
// worker's start time (cluster.Member.GossipMeta), which tells processes of one ID apart.
type gossipNode struct{ name, meta string }

// memberNode is the gossip node of a registered member.
func memberNode(m cluster.Member) gossipNode { return gossipNode{m.ID, string(m.GossipMeta())} }

// startGossip starts the coordinator's gossip node, alone: the leader joins the workers' nodes.
func (c *Coordinator) startGossip(ctx context.Context) error {
	gcfg := c.cfg.Gossip
	gcfg.Name = gossipNodeName(c.cfg.ID)
	gcfg.Meta = []byte(c.advertised) // a standby watches the leader's process there (see watchLeader)
	if gcfg.Logger == nil {
		gcfg.Logger = c.log.Named("gossip")
	}
	gcfg.OnJoin = func(name string, meta []byte) { c.gossipEvent(gossipNode{name, string(meta)}, true) }
	gcfg.OnLeave = func(name string, meta []byte) { c.gossipEvent(gossipNode{name, string(meta)}, false) }
	g, err := cluster.StartGossip(ctx, gcfg)
	if err != nil {
		return fmt.Errorf("coordinator: %w (--no-gossip runs without gossip)", err)
	}
	c.gossip = g
	return nil
}

// gossipEvent records that a node joined (or came back) or left (or was declared dead) and wakes the
// leader. It runs on the gossip node's callback goroutine and never blocks.
func (c *Coordinator) gossipEvent(n gossipNode, alive bool) {
	if id, ok := strings.CutPrefix(n.name, "coordinator/"); ok {
		c.gossipMu.Lock()
		if alive && n.meta != "" {
			c.coordAddrs[id] = n.meta
		} else if !alive {
			delete(c.coordAddrs, id)
		}
		c.gossipMu.Unlock()
		if !alive && id != c.cfg.ID {
			select {
			case c.coordDown <- id:
			default: // full: the deposer is busy with earlier deaths; a leader still expires with its lease
			}
		}
		select {
		case c.coordChanged <- struct{}{}:
		default: // a wake-up is pending already
		}
		return
	}
	c.gossipMu.Lock()
	if alive {
		delete(c.gossipDown, n)
	} else {
		c.gossipDown[n] = struct{}{}
	}
	c.gossipMu.Unlock()
	select {
	case c.gossipChanged <- struct{}{}:
	default: // a wake-up is pending already
	}
}

// gossipDead returns the IDs of the members whose gossip node (of this very process: same start time)
// was declared dead or left, and has not come back.
func (c *Coordinator) gossipDead(members []cluster.Member) map[string]bool {
	c.gossipMu.Lock()
	defer c.gossipMu.Unlock()
	var dead map[string]bool
	for _, m := range members {
		if _, down := c.gossipDown[memberNode(m)]; down {
			if dead == nil {
				dead = make(map[string]bool)
			}
			dead[m.ID] = true
		}
	}
	return dead
}

// forgetGossip drops the dead nodes of processes that are no longer registered: once a member's lease is
// gone, etcd says what gossip said, and a process that registers again is a new node.
func (c *Coordinator) forgetGossip(members []cluster.Member) {
	registered := make(map[gossipNode]bool, len(members))
	for _, m := range members {
		registered[memberNode(m)] = true
	}
	c.gossipMu.Lock()
	defer c.gossipMu.Unlock()
	for n := range c.gossipDown {
		if !registered[n] {
			delete(c.gossipDown, n)
		}
	}
}

// live returns the members that placement may use: the registered ones that gossip does not report
// dead.
func (ld *leader) live() []cluster.Member {
	dead := ld.c.gossipDead(ld.members)
	if len(dead) == 0 {
		return ld.members
	}
	out := make([]cluster.Member, 0, len(ld.members))
	for _, m := range ld.members {
		if !dead[m.ID] {
			out = append(out, m)
		}
	}
	return out
}

// gossipChanged logs the members whose gossip state changed since the last call and reports whether
// placement must be looked at again: a member went dead, came back, or went away.
func (ld *leader) gossipChanged() bool {
	dead := ld.c.gossipDead(ld.members)
	planned := make(map[string]bool)
	for _, g := range ld.plan.Groups {
		for _, a := range g.Ranks {
			planned[a.MemberID] = true
		}
	}
	changed := false
	for id := range dead {
		if !ld.dead[id] {
			changed = true
			if planned[id] {
				ld.log.Warn("gossip declared a planned worker dead; placing the cluster without it, ahead of its lease",
					zap.String("member-id", id), zap.Int64("epoch", ld.plan.Epoch))
			} else {
				ld.log.Info("gossip declared an idle worker dead; it will not be placed", zap.String("member-id", id))
			}
		}
	}
	registered := make(map[string]bool, len(ld.members))
	for _, m := range ld.members {
		registered[m.ID] = true
	}
	for id := range ld.dead {
		if !dead[id] {
			changed = true
			if registered[id] {
				ld.log.Info("worker back in gossip, or registered again; it may be placed", zap.String("member-id", id))
			} else {
				ld.log.Debug("the lease of a worker gossip declared dead has expired", zap.String("member-id", id))
			}
		}
	}
	ld.dead = dead
	return changed
}

// reregisterGrace bounds how long the leader keeps the plan unchanged for a planned worker whose member
// key is gone while gossip reports its node alive: its lease lapsed in an etcd outage, and it registers
// again as soon as etcd answers (worker keepRegistered), with the same address, so the plan still fits.
const reregisterGrace = 5 * time.Second

// reregisterPoll is how often the leader looks again while it waits for such workers.
const reregisterPoll = 100 * time.Millisecond

// reregistering returns how long to wait before placing the members, or 0 to place them now: while a
// planned worker is not registered but gossip reports its node alive, for up to reregisterGrace, the
// leader waits for it to register again instead of writing an epoch without it (which would move its
// group's shards and load weights again when it returns). A worker that exits cleanly deregisters and
// leaves gossip, and a dead one is declared dead by gossip, so neither is waited for long.
func (ld *leader) reregistering() time.Duration {
	if ld.c.gossip == nil || ld.plan.Epoch == 0 {
		return 0
	}
	registered := make(map[string]bool, len(ld.members))
	for _, m := range ld.members {
		registered[m.ID] = true
	}
	alive := make(map[string]bool)
	for _, name := range ld.c.gossip.Members() {
		alive[name] = true
	}
	var missing []string
	for _, g := range ld.plan.Groups {
		for _, a := range g.Ranks {
			if !registered[a.MemberID] && alive[a.MemberID] {
				missing = append(missing, a.MemberID)
			}
		}
	}
	if len(missing) == 0 {
		ld.lapsedSince = time.Time{}
		return 0
	}
	if ld.lapsedSince.IsZero() {
		ld.lapsedSince = time.Now()
		ld.log.Info("planned workers alive in gossip are not registered (their leases lapsed?); waiting for them to register again",
			zap.Strings("member-ids", missing), zap.Int64("epoch", ld.plan.Epoch), zap.Duration("grace", reregisterGrace))
	}
	left := reregisterGrace - time.Since(ld.lapsedSince)
	if left <= 0 {
		ld.log.Warn("planned workers alive in gossip did not register again within the grace; placing the cluster without them",
			zap.Strings("member-ids", missing), zap.Duration("grace", reregisterGrace))
		return 0
	}
	return min(left, reregisterPoll)
}

// joinGossip runs while this coordinator leads: it joins the gossip nodes of the members of each list it
// receives, and every gossipRejoin tries again those that are not among the live nodes, until ctx ends.
// Workers start their nodes alone; these joins make them one gossip cluster with the coordinator.
func (c *Coordinator) joinGossip(ctx context.Context, lists <-chan []cluster.Member) {
	var members []cluster.Member
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	warned := make(map[string]bool) // gossip addresses whose failed join was logged at warn level
	for {
		select {
		case <-ctx.Done():
			return
		case members = <-lists:
		case <-retry.C:
		}
		alive := make(map[string]bool)
		for _, name := range c.gossip.Members() {
			alive[name] = true
		}
		missing := 0
		for _, m := range members {
			if m.Gossip == "" || alive[m.ID] {
				continue
			}
			missing++
			if _, err := c.gossip.Join(ctx, []string{m.Gossip}); err != nil {
				if ctx.Err() != nil {
					return
				}
				lvl := zap.DebugLevel
				if !warned[m.Gossip] && c.gossipDead([]cluster.Member{m}) == nil {
					lvl, warned[m.Gossip] = zap.WarnLevel, true
				}
				c.log.Log(lvl, "cannot join a worker's gossip node; retrying (until then its death is noticed when its lease expires)",
					zap.String("member-id", m.ID), zap.String("gossip", m.Gossip), zap.Error(err))
				continue
			}
			delete(warned, m.Gossip)
			c.log.Debug("joined a worker's gossip node", zap.String("member-id", m.ID), zap.String("gossip", m.Gossip))
		}
		if missing > 0 {
			retry.Reset(gossipRejoin)
		}
	}
}

// offerMembers hands the latest member list to the gossip joiner: a list it has not read yet is
// replaced. The leader loop is the only sender.
func offerMembers(ch chan []cluster.Member, ms []cluster.Member) {
	ms = slices.Clone(ms)
	select {
	case ch <- ms:
	default:
		select {
		case <-ch:
		default:
		}
		ch <- ms
	}
}

// depose runs for the coordinator's lifetime: when gossip declares another coordinator's node dead (a
// crash: about a second with the default probes) or watchLeader finds its process gone, and that
// coordinator leads, it deposes it in etcd
// (cluster.Client.Depose), so that the standbys' campaigns end at once instead of after the dead
// leader's lease (Config.LeaderTTL). Only a coordinator that does not lead deposes.
func (c *Coordinator) depose() {
	for {
		select {
		case <-c.ctx.Done():
			return
		case id := <-c.coordDown:
			c.mu.Lock()
			leader := c.leader
			c.mu.Unlock()
			if leader {
				continue
			}
			ctx, cancel := context.WithTimeout(c.ctx, 2*time.Second)
			ok, err := c.cl.Depose(ctx, id)
			cancel()
			switch {
			case err != nil:
				c.log.Warn("the leader is dead; deposing it failed (its lease will expire)", zap.String("leader-id", id), zap.Error(err))
			case ok:
				c.log.Warn("the leader is dead; deposed it", zap.String("leader-id", id))
			}
		}
	}
}

// standbyGossip runs while this coordinator campaigns: it joins the gossip nodes of the registered
// workers, as the leader does, so that its node is in the cluster's gossip and learns of the leader's
// death. It returns when ctx ends.
func (c *Coordinator) standbyGossip(ctx context.Context) {
	lists := make(chan []cluster.Member, 1)
	var joiner sync.WaitGroup
	joiner.Go(func() { c.joinGossip(ctx, lists) })
	defer joiner.Wait()
	members := c.cl.WatchMembers(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case ms, ok := <-members:
			if !ok {
				return
			}
			offerMembers(lists, ms)
		}
	}
}

// standbyPoll is how often a standby reads the leader key while it waits for its turn or campaigns.
const standbyPoll = 100 * time.Millisecond

// standbyGate decides when a standby with gossip may hold a key in the election. It may not while
// another coordinator leads (the oldest key is its) and gossip reports that coordinator's node alive: the
// leader serves, and an etcd outage that lapses its lease must not move the lead (the queued key would
// win when etcd returns and the lapsed lease is revoked). It may when the leader's node is dead (depose
// deletes its key), when the leader has no gossip node known to this one (a --no-gossip leader: its
// lease decides, as without gossip, once this node's gossip can tell: see gossipSettled), and when the leader key is gone: at once if the last leader's node
// is dead or unknown, else after grace, during which the live leader re-takes the key (see ride). Only
// the campaigning goroutine uses a gate.
type standbyGate struct {
	c     *Coordinator
	grace time.Duration
	last  string    // the leader last read from etcd; "" none yet
	gone  time.Time // when the key of a live last leader was found gone; zero: not gone
	held  bool      // the last verdict was to hold off (for logging transitions)
	made  time.Time // when the gate was made (see gossipSettled)
}

// alive reports whether gossip reports the coordinator id's node alive (another coordinator's only),
// and its process was not found gone (see watchLeader).
func (g *standbyGate) alive(id string) bool {
	if id == "" || id == g.c.cfg.ID || g.c.foundGone(id) {
		return false
	}
	return slices.Contains(g.c.gossip.Members(), gossipNodeName(id))
}

// gossipSettled reports whether gossip can tell a live leader from a dead one: this node has joined
// another one (a join's push/pull brings the whole membership), or grace has passed since the gate was
// made (no node to join: a leader without gossip, whose lease decides). Until then a standby that found
// a leader holds no key: a key queued behind a live leader would win if that leader's key went.
func (g *standbyGate) gossipSettled() bool {
	return len(g.c.gossip.Members()) > 1 || time.Since(g.made) >= g.grace
}

// read returns the current leader, or ok false when etcd does not answer.
func (g *standbyGate) read(ctx context.Context) (id string, found, ok bool) {
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	id, found, err := g.c.cl.Leader(rctx)
	return id, found, err == nil
}

// mayCampaign reads the leader and says whether this standby may hold a key in the election now; while
// etcd does not answer, it may not.
func (g *standbyGate) mayCampaign(ctx context.Context) bool {
	id, found, ok := g.read(ctx)
	if !ok {
		return false
	}
	if found {
		if id != g.c.cfg.ID {
			g.last = id
		}
		g.gone = time.Time{}
		return !g.alive(id) && g.gossipSettled()
	}
	if !g.alive(g.last) {
		return true
	}
	if g.gone.IsZero() {
		g.gone = time.Now()
		g.c.log.Info("the leader key is gone while gossip reports the leader alive; waiting for it to lead again",
			zap.String("leader-id", g.last), zap.Duration("grace", g.grace))
	}
	if time.Since(g.gone) >= g.grace {
		g.c.log.Warn("the leader, alive in gossip, did not lead again within the grace; campaigning",
			zap.String("leader-id", g.last), zap.Duration("grace", g.grace))
		return true
	}
	return false
}

// waitTurn returns when this standby may campaign, or with ctx's error.
func (g *standbyGate) waitTurn(ctx context.Context) error {
	tick := time.NewTicker(standbyPoll)
	defer tick.Stop()
	for {
		may := g.mayCampaign(ctx)
		if err := ctx.Err(); err != nil {
			return err
		}
		if may {
			g.held = false
			return nil
		}
		if !g.held {
			g.held = true
			g.c.log.Info("standing by: a leader serves", zap.String("leader-id", g.last))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		case <-g.c.coordChanged:
		}
	}
}

// waitLiveLeader runs while this standby campaigns: it returns true as soon as another coordinator that
// gossip reports alive holds the oldest key (this one must withdraw), false when ctx ends.
func (g *standbyGate) waitLiveLeader(ctx context.Context) bool {
	tick := time.NewTicker(standbyPoll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		case <-g.c.coordChanged:
		}
		id, found, ok := g.read(ctx)
		if ok && found && id != g.c.cfg.ID && g.alive(id) && ctx.Err() == nil {
			g.last, g.gone = id, time.Time{}
			return true
		}
	}
}
