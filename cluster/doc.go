// Package cluster is tpfleet's shared state: worker membership under etcd leases, the placement plan
// stored with compare-and-swap, per-epoch rendezvous data for building communicators, the
// coordinators' leader election, an embedded etcd for one-machine use, and memberlist gossip for fast
// failure detection.
//
// It owns the etcd key layout and the JSON of the values stored there. It imports etcd, memberlist
// and zap only; it knows nothing of models, shards, backends or gRPC services, and the coordinator,
// the worker and cmd use it, never the other way round.
//
// # Key layout
//
// Every key lives under /tpfleet/<cluster>/ (Client.Prefix) and reads with plain etcdctl, e.g.
// `etcdctl get --prefix /tpfleet/default/`:
//
//	key                                  value                         written by
//	members/<member-id>                  Member as JSON, under the     the worker (Register), with a
//	                                     worker's lease                lease kept alive every TTL/3
//	plan                                 Plan as JSON                  the leading coordinator (PutPlan),
//	                                                                   compare-and-swap on the epoch
//	rdzv/<epoch>/<group>/<rank>          raw bytes: TCP ring address   each rank (PutRendezvous); the
//	                                     (CPU) or a ready mark (GPU)   coordinator deletes old epochs
//	nccl/<epoch>/<group>                 raw bytes: the group's NCCL   rank 0 of the group (PutNCCLID),
//	                                     unique id (128 bytes)         under a lease of a TTL; old
//	                                                                   epochs deleted with rdzv/
//	leader/<lease-id-hex>                coordinator id, under its     etcd's concurrency.Election
//	                                     lease; the oldest key leads   (Campaign)
//
// <epoch> in rdzv and nccl keys is zero-padded to 20 digits so that keys sort by epoch and
// DeleteRendezvousBefore is one range delete of each.
//
// # Usage
//
// A worker:
//
//	c, err := cluster.New(ctx, cluster.Config{Endpoints: eps, Cluster: "prod", Logger: lg})
//	defer c.Close()
//	reg, err := c.Register(ctx, cluster.Member{ID: id, Addr: grpcAddr, Host: host, Devices: devs}, 10*time.Second)
//	defer reg.Close(context.Background())
//	for p := range c.WatchPlan(ctx) {
//		// load this member's shards for p; for its group g and rank r:
//		_ = c.PutRendezvous(ctx, p.Epoch, g, r, myRingAddr)
//		peers, err := c.WaitRendezvous(ctx, p.Epoch, g, p.TP) // ranks 0..TP-1, in order
//		// build the TCP ring from peers; or, on GPU, once every rank is there (peers), rank 0
//		// publishes the NCCL unique id and the others wait for it:
//		//   rank 0: c.PutNCCLID(ctx, p.Epoch, g, id, ttl)
//		//   others: id, err := c.WaitNCCLID(ctx, p.Epoch, g)
//	}
//
// A coordinator:
//
//	lead, err := c.Campaign(ctx, coordinatorID, 10*time.Second) // blocks until leading
//	defer lead.Resign(context.Background())
//	for ms := range c.WatchMembers(ctx) {
//		cur, ok, err := c.Plan(ctx)
//		next := place(ms, cur) // next.Epoch = cur.Epoch + 1 (1 when !ok)
//		err = lead.PutPlan(ctx, next, cur.Epoch) // ErrConflict: read again; ErrNotLeader: step down
//		_ = c.DeleteRendezvousBefore(ctx, next.Epoch)
//	}
//
// `tpfleet serve` starts StartEmbedded first and passes its Endpoints to New. Every process may also
// run StartGossip: a worker names its node after its member ID, gives it Member.GossipMeta as meta and
// registers the node's address as Member.Gossip; the coordinator joins those addresses (Gossip.Join),
// and its OnLeave reports a killed worker within about a second, sooner than its etcd lease expires.
// etcd stays the authority on membership; gossip only tells sooner that a member's process died.
//
// # Security
//
// Config.TLS makes the client speak TLS to https:// endpoints, presenting a certificate whose common
// name is its etcd user (Username and Password log in to a password-protected etcd instead).
// EmbedConfig.TLS serves the embedded etcd over TLS, requires client certificates of its CA and, with
// EmbedTLS.Users, turns etcd's authentication on so that only those users may read and write under
// KeyRoot. Plans read from etcd are decoded and validated by DecodePlan. GossipConfig.KeyFile encrypts
// gossip with the cluster's keys and reloads them, so they rotate without a restart.
//
// # Lifetimes and channels
//
// Calls that block take a ctx and honour it; none keeps it. Background goroutines (lease keep-alives,
// leadership and watch loops, gossip callbacks) belong to the Client or the Gossip and stop at Close,
// which waits for them. WatchMembers keeps only the latest member list for a slow reader (buffer 1);
// WatchPlan drops nothing (unbuffered). Client.Close orphans leases rather than revoking them, as a
// crash would; Registration.Close and Leadership.Resign revoke.
//
// Errors wrap the package's sentinels (ErrConflict, ErrMemberExists, ErrNotLeader, ...) or the
// caller's context error; test them with errors.Is.
package cluster
