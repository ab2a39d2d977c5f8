package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"

	"github.com/tpfleet/tpfleet/internal/grpcauth"
	"github.com/tpfleet/tpfleet/internal/security"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// memoryRow is one worker of `cluster memory --json`: its Status, with its memory plan (absent while it
// has none).
type memoryRow struct {
	ID     string         `json:"id"`
	Addr   string         `json:"addr"`
	State  string         `json:"state,omitempty"`
	Epoch  int64          `json:"epoch,omitempty"`
	Group  int32          `json:"group"`
	Rank   int32          `json:"rank"`
	Memory *pb.MemoryPlan `json:"memory,omitempty"`
	Error  string         `json:"error,omitempty"`
}

// runClusterMemory asks every registered worker for its Status and shows its memory plan (worker Status:
// a coordinator's or an admin's certificate with TLS).
func runClusterMemory(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f, cl, err := openCluster(ctx, "memory", args, stderr)
	if err != nil {
		return err
	}
	defer cl.Close()
	ms, _, err := cl.Members(ctx)
	if err != nil {
		return err
	}
	tl, err := security.LoadIfEnabled(f.tls.cfg)
	if err != nil {
		return usagef("%v", err)
	}
	rows := make([]memoryRow, 0, len(ms))
	for _, m := range ms {
		row := memoryRow{ID: m.ID, Addr: m.Addr, Group: -1, Rank: -1}
		st, err := workerStatus(ctx, m.Addr, tl)
		if err != nil {
			row.Error = err.Error()
		} else {
			row.State, row.Epoch, row.Group, row.Rank, row.Memory = st.GetState(), st.GetEpoch(), st.GetGroup(), st.GetRank(), st.GetMemory()
		}
		rows = append(rows, row)
	}
	if f.json {
		return printJSON(stdout, rows)
	}
	gib := func(b int64) string { return fmt.Sprintf("%.2f", float64(b)/(1<<30)) }
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tGROUP/RANK\tWEIGHTS GiB\tACTIVATIONS GiB\tKV GiB\tKV BLOCKS\tRESERVED\tKV TOKENS\tLONGEST\tCONCURRENCY")
	for _, r := range rows {
		p := r.Memory
		switch {
		case r.Error != "":
			fmt.Fprintf(tw, "%s\tunreachable: %s\t\t\t\t\t\t\t\t\t\n", r.ID, r.Error)
		case p == nil:
			fmt.Fprintf(tw, "%s\t%s\t%d/%d\t-\t-\t-\t-\t-\t-\t-\t-\n", r.ID, r.State, r.Group, r.Rank)
		default:
			longest := fmt.Sprint(p.GetLongestContext())
			if p.GetLongestContext() < 0 {
				longest = "unbounded"
			}
			fmt.Fprintf(tw, "%s\t%s\t%d/%d\t%s\t%s\t%s\t%d×%d\t%d\t%d\t%s\t%.2f at %d\n", r.ID, r.State, r.Group, r.Rank,
				gib(p.GetWeightBytes()), gib(p.GetActivationBytes()), gib(p.GetKvBlocks()*p.GetBlockBytes()),
				p.GetKvBlocks(), p.GetBlockSize(), p.GetKvBlocksReserved(), p.GetKvTokens(), longest, p.GetConcurrency(), p.GetMaxContext())
		}
	}
	return tw.Flush()
}

// workerStatus calls a worker's Status.
func workerStatus(ctx context.Context, addr string, tl *security.TLS) (*pb.StatusResponse, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(grpcauth.DialCredentials(tl, security.RoleWorker)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return pb.NewWorkerClient(conn).Status(ctx, &pb.StatusRequest{})
}
