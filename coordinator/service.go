package coordinator

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/tpfleet/tpfleet/cluster"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// generationServer is the client-facing Generation service.
type generationServer struct {
	pb.UnimplementedGenerationServer
	c *Coordinator
}

var _ pb.GenerationServer = (*generationServer)(nil)

// Generate checks the request, queues it, and streams its ids as the group running it chooses them.
// When the client goes away, the request leaves the queue or its sequence is released at the next step.
func (s *generationServer) Generate(in *pb.GenerateRequest, stream grpc.ServerStreamingServer[pb.GenerateResponse]) error {
	c := s.c
	start := time.Now()
	r, err := c.model.newRequest(in)
	if err != nil {
		c.log.Debug("request refused", zap.Error(err))
		return toStatus(err)
	}
	if err := c.admit(r); err != nil {
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
	for {
		select {
		case <-r.notify:
		case <-ctx.Done():
			c.log.Debug("request cancelled by its client", zap.Int32("prompt-tokens", promptTokens), zap.Int32("sent", sent))
			return toStatus(ctx.Err())
		}
		ids, done, finish, err := r.take()
		if len(ids) > 0 || (done && err == nil) {
			sent += int32(len(ids))
			msg := &pb.GenerateResponse{Ids: ids, PromptTokens: promptTokens, CompletionTokens: sent}
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

// Tokenize needs the model's tokenizer, which the coordinator does not load yet.
func (s *generationServer) Tokenize(ctx context.Context, in *pb.TokenizeRequest) (*pb.TokenizeResponse, error) {
	if in.GetModel() != "" && in.GetModel() != s.c.model.name {
		return nil, toStatus(invalid("unknown model %q: this cluster serves %q", in.GetModel(), s.c.model.name))
	}
	return nil, toStatus(fmt.Errorf("%w: model %s: tokenization is not available yet; send token ids", ErrNoTokenizer, s.c.model.name))
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

func (s *adminServer) Shards(ctx context.Context, in *pb.ShardsRequest) (*pb.ShardsResponse, error) {
	p, _, err := s.c.cl.Plan(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	out := &pb.ShardsResponse{Epoch: p.Epoch, Model: p.Model, Tp: int32(p.TP), Plan: p.PlanName}
	for _, g := range p.Groups {
		for _, a := range g.Ranks {
			out.Assignments = append(out.Assignments, &pb.Assignment{Group: int32(g.ID), Rank: int32(a.Rank), MemberId: a.MemberID, Addr: a.Addr})
		}
	}
	return out, nil
}

func (s *adminServer) Rebalance(ctx context.Context, in *pb.RebalanceRequest) (*pb.RebalanceResponse, error) {
	epoch, err := s.c.Rebalance(ctx, int(in.GetTp()))
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.RebalanceResponse{Epoch: epoch}, nil
}
