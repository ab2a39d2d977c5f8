package cluster

import "errors"

// Sentinel errors, tested with errors.Is. Errors the package returns wrap one of them, or the caller's
// context error, with the operation's details.
var (
	// ErrInvalid means an argument or a config is malformed: a Config, Member, Plan, EmbedConfig or
	// GossipConfig that fails Validate, a negative epoch, group or rank.
	ErrInvalid = errors.New("cluster: invalid argument")
	// ErrUnavailable means etcd did not answer within Config.DialTimeout when New probed it.
	ErrUnavailable = errors.New("cluster: etcd unavailable")
	// ErrClosed means the Client (or the Registration, Leadership, Gossip) was closed before or during
	// the call.
	ErrClosed = errors.New("cluster: closed")
	// ErrMemberExists means Register found the member's key already present: another live process
	// holds that ID under its lease.
	ErrMemberExists = errors.New("cluster: member already registered")
	// ErrLeaseLost means a Registration's lease expired or was revoked, so its member key is gone.
	ErrLeaseLost = errors.New("cluster: lease lost")
	// ErrConflict means PutPlan's compare-and-swap failed: the stored epoch is not the prevEpoch the
	// caller read, or the new plan's epoch is not prevEpoch+1. The message names the stored epoch.
	ErrConflict = errors.New("cluster: plan epoch conflict")
	// ErrNotLeader means a Leadership no longer holds the election key: a write guarded by it was
	// refused.
	ErrNotLeader = errors.New("cluster: not leader")
	// ErrRendezvousIncomplete means WaitRendezvous's context ended before every rank had published; the
	// error also wraps the context's error and names the missing ranks.
	ErrRendezvousIncomplete = errors.New("cluster: rendezvous incomplete")
)
