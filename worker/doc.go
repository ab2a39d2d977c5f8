// Package worker is the worker side of tpfleet's distributed runtime: one process (or one Worker value)
// per device. It owns its device through backend.Ops only: Start opens the backend registered under
// Config.Device (backend.Open; "cpu", always linked, or "cuda" where the binary imports it, on device
// Config.DeviceIndex: one worker process per GPU) and finds what it can do by its optional capabilities
// (backend.Synchronizer, MemoryReporter, Describer, DeviceContext), never by its name or concrete type.
// A Worker registers itself in etcd under a lease, follows the placement plan, loads exactly
// its slices of the checkpoint for its rank of a TP group, builds the group's communicator, and serves
// the Worker gRPC service (tpfleet.v1.Worker) to the coordinator, with the gRPC health service and
// server reflection beside it.
//
// It imports cluster (etcd), model and model/run (any registered family), shard, tpgroup (the
// communicator), sample, backend (the interface and its registry) and the generated protobuf code; it must
// not import coordinator, cmd, a model family or a backend implementation: the binary imports those for
// their registration (tpfleet's cmd/tpfleet/backends.go; a test, backend/cpu).
//
// # Life cycle
//
//	w, err := worker.New(cfg)   // checks cfg; opens nothing
//	err = w.Start(ctx)          // gRPC listener open, member registered; loading goes on in the background
//	<-w.Ready()                 // settled on the plan found at start (serving, or idle)
//	...                         // watch w.Err()
//	w.Close()                   // graceful, then forced; deregisters; idempotent
//
// # Security
//
// With Config.TLS the gRPC server requires client certificates of the cluster's CA and takes Step and
// LoadPlan only from a coordinator of the worker's cluster (Status also from an admin), answering
// others with PERMISSION_DENIED; the CPU ring's connections are TLS too, admitting only workers of the
// cluster; etcd is reached with the same certificate. Without TLS, a listener on a non-loopback address
// (--listen, --ring-host, gossip without a key) needs Config.Insecure.
//
// # Gossip
//
// Unless Config.NoGossip is set, Start also starts a gossip node (cluster.StartGossip) named after the
// member ID, with the worker's start time as its meta, and registers its address as
// cluster.Member.Gossip. The node starts alone; the leading coordinator joins it, and so learns of the
// worker's death within about a second instead of when the lease expires. Close leaves gossip before it
// deregisters, so the coordinator hears of a graceful stop at once either way.
//
// # Plans and epochs
//
// The worker watches the plan in etcd. For each new epoch it drops the previous epoch's communicator
// and every sequence (the coordinator prefills in-flight sequences again), then:
//
//   - when the plan assigns this member (group g, rank r of a group of TP ranks), it loads its
//     weights: the shard manifest of the plan's PlanName ("tp", "ep", or a plan file on this host) for
//     TP and rank r, read with range reads. Weights already loaded for the same checkpoint, model
//     name, plan name, TP and rank are reused, so a coordinator restart or a re-plan that keeps this
//     assignment costs no reload. Otherwise the load takes over, from the weights held and those
//     Prepare staged, every tensor slice with the same shard key (shard.TensorShard.Key: same tensor,
//     ranges, layout, format) and reads only the rest; what it does not take over is dropped once it is
//     done. Prepare (the coordinator's call before it writes a rebalanced epoch) loads a coming plan's
//     weights so while the current epoch serves, and the epoch then takes them over without a read.
//     Without a checkpoint in its model directory the worker reads from a peer (remote.go: CheckpointInfo,
//     ReadTensor: chunked, CRC-32C and SHA-256 checked, resumed where a stream broke), from Config.Seed
//     first. A newer epoch that arrives during a load with the same assignment
//     lets the load finish and takes it over; any other newer epoch cancels the work in progress.
//     Then it builds the group's communicator with tpgroup.Join, the group meeting in etcd
//     (cluster.Rendezvous of the epoch and group): for TP 1 none is needed (comm.Solo). Every rank
//     publishes a record under rdzv/<epoch>/<g>/<r> (its device and, on the CPU, the address of its TCP
//     ring listener on Config.RingHost) and waits for the group's. A CPU group then joins the TCP ring
//     (comm.Connect). A device group (the backend is a backend.DeviceContext) waits the same way, so
//     that all ranks are alive and loaded before NCCL's uninterruptible initialisation; then rank 0
//     makes the NCCL unique id and publishes it with cluster.PutNCCLID(epoch, g) under a lease of
//     Config.RendezvousTimeout, the other ranks read it with WaitNCCLID, and every rank joins
//     (nccl.Join, with the device's context current). The id's key is scoped to the epoch, so a new
//     epoch never reuses an old epoch's id, and the coordinator deletes old epochs' keys.
//   - when the plan does not assign this member, it frees its weights and is idle.
//
// # States and health
//
// Status and the Status RPC report the State: idle (no plan, or no assignment), loading (moving to a new
// epoch), serving, failed (the load, the rendezvous or a step failed; the worker waits for a new epoch,
// keeping loaded weights for it). The gRPC health service reports the whole server ("") SERVING while
// idle or serving, NOT_SERVING while loading or failed; the service "tpfleet.v1.Worker" is SERVING only
// while serving. Both turn NOT_SERVING when Close begins. An idle worker is healthy: it is a live
// member waiting to be placed.
//
// # The Step stream
//
// The coordinator opens one long-lived Step stream per worker and sends every rank of a TP group the
// same StepRequests in the same order: this is its duty, because each rank's forward pass meets its
// peers' in collectives, and ranks that run different requests block until Config.OpTimeout and then
// fail. A rank's step therefore returns only once all its peers have run the same step. Requests
// (from all streams of a worker) run one at a time, in the order they arrive; each gets exactly one
// StepResponse with the request's step number, in order. A request runs as follows:
//
//  1. protocol must be STEP_PROTOCOL_V1 (STEP_PROTOCOL_UNSPECIFIED is refused too), and epoch must be
//     the worker's epoch;
//  2. the worker must be serving;
//  3. every SequenceWork is checked, in order, before anything runs: start needs 1 <= capacity <=
//     max_position_embeddings and valid sampling; without start the sequence must be held (started in
//     this epoch and not released); ids must be non-empty, inside the vocabulary and fit the
//     sequence's capacity. A request that fails a check changes no sequence;
//  4. then, for each SequenceWork in order: start makes a new sequence (replacing one of the same
//     id) with room for capacity tokens and, on rank 0, a sampler from sampling (unset: the
//     checkpoint's generation_config.json, greedy when it does not sample), advanced past resumed draws
//     (a request the coordinator resumes with its prompt and tokens so far); ids run through the model
//     at the sequence's next positions; when sample is set, rank 0 draws the next token from the last
//     position's logits and adds SequenceResult{seq_id, next_id}, in SequenceWork order. Other ranks
//     answer with no results. The sampled token is not fed back by the worker: the coordinator sends
//     it as the sequence's ids in a later step. A sequence started with prompt_logprobs (0 to 20; only
//     with start) runs its pieces with every position's logits on every rank until it samples, rank 0
//     collects each prompt token's log-probability given the tokens before it (package sample's
//     PromptLogprobs), and the first SequenceResult carries them (one per prompt token after the first);
//     such a sequence's piece runs in a forward pass of its own (the lm_head over all its rows is its
//     cost alone);
//  5. last, the sequences named in release are dropped (unknown ids are ignored); releases are applied
//     whenever the epoch matches, also when the work failed.
//
// Errors go in StepResponse.error as one line that starts with the sentinel's text, and the stream
// stays open:
//
//   - "worker: unsupported step protocol", "worker: epoch mismatch", "worker: not serving" (idle or
//     loading), "worker: unknown sequence", "worker: invalid request": nothing ran, the worker is
//     unchanged and keeps serving;
//   - "worker: failed": the epoch failed (a collective failed: a peer died, was closed, or timed out;
//     or the load failed earlier). The worker closes its communicator, so its peers fail too, and
//     answers every later request of the epoch with the same error until a new epoch arrives: the
//     coordinator re-plans, and prefills its sequences again;
//   - "worker: closed": the worker is closing.
//
// The stream itself ends only when the coordinator closes its side, the connection fails, or the
// worker closes (UNAVAILABLE, once the step in flight has finished). When it ends, the sequences it
// started and did not release are dropped: the coordinator that held them is gone (or gave up that
// connection) and resumes their requests elsewhere, so a crashed coordinator leaves none behind.
//
// # LoadPlan
//
// LoadPlan(epoch) returns once the worker serves (or is idle in) that epoch, reading the plan from etcd
// if the watch has not delivered it yet. It fails with ABORTED when a newer epoch supersedes it,
// UNAVAILABLE when the epoch failed or the worker is closing, INVALID_ARGUMENT for an epoch below 1, and
// with the caller's deadline or cancellation.
package worker
