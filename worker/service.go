package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/cluster"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// service is the Worker gRPC service over a Worker.
type service struct {
	tpfleetv1.UnimplementedWorkerServer
	w *Worker
}

var _ tpfleetv1.WorkerServer = (*service)(nil)

// Step answers each request of the stream with one response, in order. Per-request failures go in
// StepResponse.error and the stream goes on; the stream itself ends when the client closes its side
// (OK), when the transport fails, or when the worker closes (UNAVAILABLE, after the step in flight).
// When it ends, the sequences it started and did not release are dropped: their coordinator is gone.
func (s *service) Step(stream grpc.BidiStreamingServer[tpfleetv1.StepRequest, tpfleetv1.StepResponse]) error {
	ctx := stream.Context()
	id := s.w.streamIDs.Add(1)
	s.w.openSteps.Add(1)
	defer s.w.openSteps.Add(-1)
	defer func() {
		if n := s.w.releaseStream(id); n > 0 {
			s.w.lg.Info("step stream ended; dropped its sequences", zap.Int("sequences", n))
		}
	}()
	reqs := make(chan *tpfleetv1.StepRequest)
	recvErr := make(chan error, 1) // its one sender returns after sending
	// Recv blocks, so it runs apart from the loop that watches for Close. It returns once the handler
	// has (the stream is then done), and Close waits for it.
	s.w.streams.Go(func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	})
	for {
		select {
		case req := <-reqs:
			if err := stream.Send(s.w.stepOn(id, req)); err != nil {
				return err
			}
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		case <-s.w.closing:
			return status.Error(codes.Unavailable, ErrClosed.Error())
		}
	}
}

// LoadPlan waits for the worker to apply the epoch; see Worker.LoadPlan.
func (s *service) LoadPlan(ctx context.Context, req *tpfleetv1.LoadPlanRequest) (*tpfleetv1.LoadPlanResponse, error) {
	if err := s.w.LoadPlan(ctx, req.GetEpoch()); err != nil {
		return nil, toStatus(err)
	}
	return &tpfleetv1.LoadPlanResponse{Epoch: req.GetEpoch()}, nil
}

// Status reports the worker's Status.
func (s *service) Status(context.Context, *tpfleetv1.StatusRequest) (*tpfleetv1.StatusResponse, error) {
	st := s.w.Status()
	var load []*tpfleetv1.ExpertLoad
	for i, l := range st.ExpertLoad {
		if l != nil {
			el := &tpfleetv1.ExpertLoad{Layer: int32(i), Tokens: l}
			if i < len(st.SlotLoad) {
				el.SlotTokens = st.SlotLoad[i]
			}
			load = append(load, el)
		}
	}
	var phases []*tpfleetv1.StartupPhase
	for _, p := range st.Phases {
		phases = append(phases, &tpfleetv1.StartupPhase{Name: p.Name, StartSeconds: p.Start.Sub(st.ProcessStart).Seconds(),
			TookSeconds: p.Took.Seconds(), Detail: p.Detail})
	}
	mem, reserved := s.w.memoryStatus()
	return &tpfleetv1.StatusResponse{
		StartupPhases: phases,
		Memory:        memoryProto(mem, reserved),
		ExpertLoad:    load,
		MemberId:      st.MemberID,
		Epoch:         st.Epoch,
		Group:         int32(st.Group),
		Rank:          int32(st.Rank),
		Tp:            int32(st.TP),
		State:         string(st.State),
		WeightBytes:   st.WeightBytes,
		Sequences:     int32(st.Sequences),
		Device:        st.Device,
		StepStreams:   int32(st.StepStreams),
		LeaderRev:     s.w.currentLeaderRev(),
		ReadBytes:     st.ReadBytes,
		KeptTensors:   int32(st.KeptTensors),
		KeptBytes:     st.KeptBytes,
		StreamedBytes: st.StreamedBytes,
	}, nil
}

// Prepare loads the tensors the worker lacks for its rank in the plan it is sent (see Worker.Prepare).
func (s *service) Prepare(ctx context.Context, req *tpfleetv1.PrepareRequest) (*tpfleetv1.PrepareResponse, error) {
	var p cluster.Plan
	if err := json.Unmarshal(req.GetPlan(), &p); err != nil {
		return nil, toStatus(fmt.Errorf("%w: prepare: plan: %w", ErrInvalidRequest, err))
	}
	r, err := s.w.Prepare(ctx, p)
	if err != nil {
		return nil, toStatus(err)
	}
	return &tpfleetv1.PrepareResponse{Loaded: int32(r.Loaded), LoadedBytes: r.LoadedBytes, Kept: int32(r.Kept), KeptBytes: r.KeptBytes}, nil
}
