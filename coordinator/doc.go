// Package coordinator places a model's shards on the cluster's workers and serves clients: it is the
// process between gRPC clients and the workers' Step streams. It keeps leadership, placement,
// scheduling and the gRPC services; the HTTP API is package gateway and the Go client package client.
//
// # What it does
//
//   - Leadership: every coordinator campaigns in etcd (cluster.Client.Campaign); only the leader plans
//     and schedules. A standby answers Generate with UNAVAILABLE and takes over when the leader resigns
//     (Close), when the leader's process dies (the standby holds a health Watch stream open to the
//     leader's gRPC address, which the leader's gossip node publishes; a killed process's sockets close,
//     the stream ends, and when the address then refuses connections the standby deposes the dead
//     leader in etcd: cluster.Client.Depose; a few hundred milliseconds), when gossip declares the
//     leader's node dead (a vanished host; the standby's node joins the workers' while it campaigns;
//     about a second and a half), or at the latest when the leader's lease expires (Config.LeaderTTL). With gossip, a standby holds no
//     election key while gossip reports the leader's node alive, so an etcd outage that lapses the
//     leader's lease never hands the lead to a standby: the leader, which keeps serving its plan, leads
//     again when etcd returns (the standby waits 2×LeaderTTL for it). Every StepRequest carries the
//     leadership's election revision (leader_rev): workers refuse steps of an older leadership than the
//     newest they have seen, which fences a deposed leader that is still alive.
//   - Placement: the members (sorted by ID) form TP groups of Config.TP consecutive members, one
//     replica of the model each; members left over stay idle. On taking the lead, the stored plan is
//     resumed as it is, without a new epoch, when it still fits the live members (workers keep their
//     shards across a coordinator restart); otherwise the next epoch is written with compare-and-swap,
//     keeping each remaining member's group and rank (a group that lost members is completed from idle
//     ones). A group is used only once each of its workers reports (Status) that it serves the epoch.
//   - Rebalancing (rebalance.go, Rebalance): an operator changes the TP size, the tp_plan (a built-in name
//     or a plan file's rules, carried in the plan), the replicas cap, or drains and undrains a worker
//     (drained members stay registered but hold no rank; the plan records them). The new placement keeps
//     every worker's rank it can (placement.go), PlanMoves says per worker which slices it loads, keeps and
//     drops (shard keys), each worker that must read something loads it first beside the weights it serves
//     with (Worker/Prepare) while the old epoch serves, and only then is the epoch written. --experts
//     (experts.go) permutes each MoE layer's experts over the ep plan's ranks by the load the workers count
//     (Admin/Experts).
//   - Scheduling: one step loop per group keeps a Step stream to each rank and sends every rank the same
//     StepRequests in the same order (continuous batching): new requests join at step boundaries within
//     Config.MaxBatch sequences and Config.TokenBudget tokens per step (a decode takes one token, a
//     prompt is fed in pieces of what is left, at most Config.PrefillChunk tokens a step: chunked
//     prefill, so a long prompt does not stall the decodes); rank 0 returns each sampled token, which is streamed to
//     its client at once; finished and cancelled sequences are released at the next step.
//   - Text: when the model directory has a tokenizer.json, New loads it (package tokenizer).
//     Generate then takes a text prompt, encoded with BOS as HF's tokenizer(text) does, instead of
//     prompt_ids (exactly one of the two), and every GenerateResponse carries the text of its ids, decoded
//     as they stream (tokenizer.Decoder: whole UTF-8 characters only, special tokens left out, the rest
//     of an unfinished character flushed as U+FFFD with the last response); Tokenize encodes. Without a
//     tokenizer both answer FAILED_PRECONDITION and responses carry no text.
//   - Errors: requests are checked before they queue (INVALID_ARGUMENT); the queue is bounded
//     (RESOURCE_EXHAUSTED). No plan change or group failure fails a request: when the plan changes, a
//     Step stream breaks, a step fails or misses its deadline (Config.StepTimeout plus
//     Config.StepTokenTimeout per token), the group's requests go back to the head of the queue and run
//     again in whichever group takes them first, from their prompt and the tokens already sent
//     (re-prefill; a sampled request's sampler skips the draws made, so a fixed seed gives the same
//     output): the client sees a pause, and no token twice. The group reconnects; a worker whose epoch
//     failed gets a new epoch. A request fails only when maxFailures (3) failures in a row pass without
//     a token (with the last failure's error: INTERNAL for a step error), or when no group takes it
//     within Config.ResumeTimeout (ErrNotPlaced: UNAVAILABLE).
//
// # Failure detection: etcd leases and gossip
//
// etcd is the authority on membership: a worker is a member while its key lives under its lease, and
// placement only ever uses members. A killed worker's key stays until the lease expires (the worker's
// LeaseTTL, 10 s by default), so gossip tells sooner: every worker runs a memberlist node and registers
// its address (cluster.Member.Gossip); the coordinator runs one too ("coordinator/<id>"), and the leader
// joins the nodes of the members it sees (again every 2 s for those missing), which makes them one
// gossip cluster. When gossip declares a worker's node dead (about a second after a crash with the
// default probes) the leader treats the worker as lost at once: a plan that places it is replaced by
// the next epoch without it (its group dissolves; the others keep serving), and it is not placed
// again. The two combine as follows: a member is placed only if it is registered in etcd and gossip
// does not report its process (member ID and start time, the node's meta) dead. A gossip-dead member
// becomes placeable again when its node rejoins gossip (a healed partition: the node refutes its death)
// or when it registers anew (a restarted process has a new start time); when its lease expires it leaves
// the member list and gossip's verdict is forgotten. Gossip never adds a member, and a worker without
// gossip (NoGossip, or a node the leader cannot reach) is noticed when its lease expires, as before.
//
// # Services
//
// The gRPC server at Config.ListenAddr serves tpfleet.v1.Generation and tpfleet.v1.Admin, the standard
// health service (SERVING once the coordinator leads and a group serves) and server reflection, so
// grpcurl works:
//
//	grpcurl -plaintext -d '{"prompt_ids":[1,2,3],"max_tokens":8}' 127.0.0.1:7070 tpfleet.v1.Generation/Generate
//	grpcurl -plaintext -d '{"prompt":"Hello","max_tokens":8}' 127.0.0.1:7070 tpfleet.v1.Generation/Generate
//
// Package client wraps the services for Go programs that should not use the generated code.
//
// # Security
//
// With Config.TLS the gRPC server requires client certificates of the cluster's CA: Generation takes
// the client or admin role (and one of Config.APIKeys when set, as a bearer token), Admin the admin
// role or one of Config.AdminKeys; the gateway serves HTTPS and takes the API keys; the coordinator
// dials workers with its certificate and accepts only workers' certificates of its cluster. Refusals are
// UNAUTHENTICATED (missing or wrong token) or PERMISSION_DENIED (wrong role or token); see package
// internal/grpcauth and docs/security.md. Without TLS, a listener on a non-loopback address needs
// Config.Insecure.
//
// # OpenAI-compatible HTTP
//
// With Config.HTTPAddr set, the coordinator also serves package gateway's OpenAI-compatible API (GET
// /v1/models, POST /v1/completions, POST /v1/chat/completions with Server-Sent Events, GET /health)
// through the same checks, queue and batches as the gRPC API: gateway.go implements gateway.Generator
// over the coordinator and maps its errors to the gateway's kinds; the coordinator owns the listener
// and stops it with the gRPC server (Config.ShutdownGrace).
//
// # Usage
//
//	c, err := coordinator.New(coordinator.Config{
//		Etcd:  cluster.Config{Endpoints: []string{"http://127.0.0.1:2379"}},
//		Model: "/models/Llama-4-Scout-17B-16E",
//		TP:    8,
//	})
//	if err := c.Start(ctx); err != nil { ... } // listening
//	defer c.Close()
//	<-c.Ready() // leading, a group serves
//
// The package imports cluster, gateway, model/llama4, shard, safetensors, sample, tokenizer and the
// generated protobuf code; it knows nothing of backends or communicators, which live in the workers,
// and must not import client (its tests do).
package coordinator
