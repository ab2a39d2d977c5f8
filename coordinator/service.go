package coordinator

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/tpfleet/tpfleet/cluster"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// generationServer is the client-facing Generation service.
type generationServer struct {
	pb.UnimplementedGenerationServer
	c *Coordinator
}

var _ pb.GenerationServer = (*generationServer)(nil)

// Generate checks the request (a text prompt is encoded with the model's tokenizer, BOS added), queues
// it, and streams its ids as the group running it chooses them, with their text when the model has a
// tokenizer. When the client goes away, the request leaves the queue or its sequence is released at the
// next step.
func (s *generationServer) Generate(in *pb.GenerateRequest, stream grpc.ServerStreamingServer[pb.GenerateResponse]) error {
	c := s.c
	start := time.Now()
	r, err := c.model.newRequest(in)
	if err != nil {
		c.log.Debug("request refused", zap.Error(err))
		return toStatus(err)
	}
	if err := c.admit(r); err != nil {
		c.metrics.rejected()
		c.log.Debug("request refused", zap.Error(err))
		return toStatus(err)
	}
	defer func() {
		c.queue.remove(r)
		r.cancel()
	}()
	ctx := stream.Context()
	promptTokens := int32(len(r.prompt))
	var sent int32
	out := c.newOutput(r)
	for {
		select {
		case <-r.notify:
		case <-ctx.Done():
			c.log.Debug("request cancelled by its client", zap.Int32("prompt-tokens", promptTokens), zap.Int32("sent", sent))
			return toStatus(ctx.Err())
		}
		ids, lps, done, finish, err := r.take()
		if len(ids) > 0 || (done && err == nil) {
			ids, lps, text, stopped := out.add(ids, lps, done && err == nil)
			if stopped != "" { // a stop string: the request ends here, whatever came after it
				done, finish, err = true, FinishStop, nil
				r.end(FinishStop, nil)
			}
			sent += int32(len(ids))
			msg := &pb.GenerateResponse{Ids: ids, Text: text, PromptTokens: promptTokens, CompletionTokens: sent, StopReason: stopped, Logprobs: lps,
				PromptLogprobs: r.takePrompt()}
			if done && err == nil {
				msg.FinishReason = finish
			}
			if err := stream.Send(msg); err != nil {
				return err
			}
		}
		if done {
			c.log.Debug("request done", zap.Int32("prompt-tokens", promptTokens), zap.Int32("new-tokens", sent),
				zap.String("finish", finish), zap.Duration("took", time.Since(start)), zap.Error(err))
			return toStatus(err)
		}
	}
}

// textStream decodes a Generate stream's ids into text as they come: only whole UTF-8 characters,
// special tokens left out (as HF's decode(ids, skip_special_tokens=True)).
type textStream struct {
	dec    *tokenizer.Decoder
	log    *zap.Logger
	logged bool // an id without text was logged
}

// add returns the text that ids complete, and with last what is left of an incomplete character
// (as U+FFFD). An id the tokenizer does not know (a model vocabulary larger than the tokenizer's)
// gives no text, as HF's decode skips it.
func (t *textStream) add(ids []int32, last bool) string {
	var b strings.Builder
	for _, id := range ids {
		piece, err := t.dec.Add(int(id))
		if err != nil {
			if !t.logged {
				t.log.Debug("generated id has no text", zap.Int32("id", id), zap.Error(err))
				t.logged = true
			}
			continue
		}
		b.WriteString(piece)
	}
	if last {
		b.WriteString(t.dec.Flush())
	}
	return b.String()
}

// Tokenize encodes text with the model's tokenizer; add_special adds BOS. A model without a tokenizer
// answers FAILED_PRECONDITION.
func (s *generationServer) Tokenize(ctx context.Context, in *pb.TokenizeRequest) (*pb.TokenizeResponse, error) {
	m := s.c.model
	if in.GetModel() != "" && in.GetModel() != m.name {
		return nil, toStatus(invalid("unknown model %q: this cluster serves %q", in.GetModel(), m.name))
	}
	if m.tok == nil {
		return nil, toStatus(m.noTokenizer())
	}
	return &pb.TokenizeResponse{Ids: toInt32(m.tok.Encode(in.GetText(), in.GetAddSpecial()))}, nil
}

// ListModels names the served model, its sizes and how it is placed now.
func (s *generationServer) ListModels(ctx context.Context, in *pb.ListModelsRequest) (*pb.ListModelsResponse, error) {
	c := s.c
	c.mu.Lock()
	tp, replicas := c.tp, len(c.plan.Groups)
	if c.plan.Epoch > 0 {
		tp = c.plan.TP
	}
	c.mu.Unlock()
	return &pb.ListModelsResponse{Models: []*pb.Model{{
		Name:                  c.model.name,
		VocabSize:             int32(c.model.cfg.VocabSize),
		MaxPositionEmbeddings: int32(c.model.cfg.MaxPositions),
		Tp:                    int32(tp),
		Replicas:              int32(replicas),
	}}}, nil
}

// adminServer is the operators' Admin service. Members and Shards read etcd, so a standby answers
// them too; Rebalance needs the leader.
type adminServer struct {
	pb.UnimplementedAdminServer
	c *Coordinator
}

var _ pb.AdminServer = (*adminServer)(nil)

func (s *adminServer) Members(ctx context.Context, in *pb.MembersRequest) (*pb.MembersResponse, error) {
	ms, _, err := s.c.cl.Members(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	out := &pb.MembersResponse{}
	for _, m := range ms {
		out.Members = append(out.Members, memberProto(m))
	}
	return out, nil
}

// memberProto turns a member into its API form; devices read "cuda:0 NVIDIA H100 80GB HBM3".
func memberProto(m cluster.Member) *pb.Member {
	pm := &pb.Member{Id: m.ID, Addr: m.Addr, Host: m.Host, StartedUnix: m.Started.Unix()}
	for _, d := range m.Devices {
		dev := fmt.Sprintf("%s:%d", d.Kind, d.Index)
		if d.Name != "" {
			dev += " " + d.Name
		}
		pm.Devices = append(pm.Devices, dev)
	}
	return pm
}

// Shards answers with the stored plan. A leader riding out an etcd outage answers with the plan in
// force, from memory, and says so (etcd_unreachable): the plan cannot change until etcd answers.
func (s *adminServer) Shards(ctx context.Context, in *pb.ShardsRequest) (*pb.ShardsResponse, error) {
	c := s.c
	c.mu.Lock()
	leader, etcdLost, p := c.leader, c.etcdLost, c.plan
	c.mu.Unlock()
	if !etcdLost {
		var err error
		if p, _, err = c.cl.Plan(ctx); err != nil {
			return nil, toStatus(err)
		}
	}
	out := &pb.ShardsResponse{Epoch: p.Epoch, Model: p.Model, Tp: int32(p.TP), Plan: p.PlanName, EtcdUnreachable: etcdLost}
	if leader {
		out.LeaderId = c.cfg.ID
	}
	for _, g := range p.Groups {
		for _, a := range g.Ranks {
			out.Assignments = append(out.Assignments, &pb.Assignment{Group: int32(g.ID), Rank: int32(a.Rank), MemberId: a.MemberID, Addr: a.Addr})
		}
	}
	return out, nil
}

func (s *adminServer) Rebalance(ctx context.Context, in *pb.RebalanceRequest) (*pb.RebalanceResponse, error) {
	opts := RebalanceOptions{TP: int(in.GetTp()), Plan: in.GetPlan(), PlanFile: in.GetPlanFile(), Replicas: KeepReplicas,
		Drain: in.GetDrain(), Undrain: in.GetUndrain(), DryRun: in.GetDryRun(), Wait: in.GetWait(), Experts: in.GetExperts()}
	if in.Replicas != nil {
		opts.Replicas = int(in.GetReplicas())
	}
	if in.RedundantExperts != nil {
		n := int(in.GetRedundantExperts())
		opts.RedundantExperts = &n
	}
	res, err := s.c.Rebalance(ctx, opts)
	if err != nil {
		return nil, toStatus(err)
	}
	p := res.Plan
	out := &pb.RebalanceResponse{Epoch: res.Epoch, DryRun: res.DryRun, Tp: int32(p.TP), Plan: p.PlanName, Replicas: int32(p.Replicas),
		Drained: p.Drained, PrepareSeconds: res.Prepare.Seconds(), SwitchSeconds: res.Switch.Seconds()}
	for _, g := range p.Groups {
		for _, a := range g.Ranks {
			out.Assignments = append(out.Assignments, &pb.Assignment{Group: int32(g.ID), Rank: int32(a.Rank), MemberId: a.MemberID, Addr: a.Addr})
		}
	}
	out.ExpertOrder = expertOrderProto(p.Order)
	for _, m := range res.Moves {
		out.Moves = append(out.Moves, &pb.WorkerMove{MemberId: m.MemberID, Group: int32(m.Group), Rank: int32(m.Rank), Drained: m.Drained,
			Loaded: int32(m.Loaded), LoadedBytes: m.LoadedBytes, Kept: int32(m.Kept), KeptBytes: m.KeptBytes,
			Dropped: int32(m.Dropped), DroppedBytes: m.DroppedBytes, EstimatedSeconds: m.Estimate.Seconds()})
	}
	return out, nil
}

// expertOrderProto is the API form of an expert order, layers in order; nil for none.
func expertOrderProto(o *cluster.UnitOrder) []*pb.ExpertOrder {
	if o == nil {
		return nil
	}
	var out []*pb.ExpertOrder
	for _, l := range slices.Sorted(maps.Keys(o.Layers)) {
		out = append(out, &pb.ExpertOrder{Layer: int32(l), Experts: toInt32(o.Layers[l])})
	}
	return out
}

// Experts sums the expert load of the groups in force (see Coordinator.ExpertLoad).
func (s *adminServer) Experts(ctx context.Context, _ *pb.ExpertsRequest) (*pb.ExpertsResponse, error) {
	l, err := s.c.ExpertLoad(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.ExpertsResponse{Epoch: l.Epoch, Groups: int32(l.Groups), Layers: expertLoadProto(l), Tp: int32(l.TP), ExpertOrder: expertOrderProto(l.Order)}, nil
}

// toInt32 converts token ids to the API's int32 (the coordinator's ids fit: they are below the
// vocabulary size).
func toInt32(v []int) []int32 {
	if v == nil {
		return nil
	}
	out := make([]int32, len(v))
	for i, x := range v {
		out[i] = int32(x)
	}
	return out
}
