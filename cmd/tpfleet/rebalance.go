package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/tpfleet/tpfleet/client"
)

// runRebalance asks the leading coordinator for a new plan epoch from the current members, optionally with
// another TP size, and prints the new epoch and placement.
func runRebalance(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("rebalance", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:7070", "the coordinator's gRPC address")
	tp := fs.Int("tp", 0, "new tensor-parallel size (0: keep the current one)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the coordinator")
	asJSON := fs.Bool("json", false, "print one JSON object")
	var token string
	tokenFlag(fs, &token, "an admin key of the coordinator (else the admin role of --tls-cert)")
	var tf tlsFlags
	tf.add(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case *tp < 0:
		return usagef("--tp %d must be >= 0", *tp)
	case *timeout <= 0:
		return usagef("--timeout must be positive")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	tc, err := tf.clientTLS()
	if err != nil {
		return usagef("%v", err)
	}
	cli, err := client.Dial(*addr, client.WithTLS(tc), client.WithToken(token))
	if err != nil {
		return err
	}
	defer cli.Close()
	epoch, err := cli.Rebalance(ctx, *tp)
	if err != nil {
		return fmt.Errorf("rebalance via %s: %w", *addr, err)
	}
	shards, err := cli.Shards(ctx)
	if err != nil {
		return fmt.Errorf("read the new plan from %s: %w", *addr, err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(struct {
			Epoch  int64         `json:"epoch"`
			Shards client.Shards `json:"shards"`
		}{epoch, shards})
	}
	fmt.Fprintf(stdout, "epoch %d: model %s, tp %d, plan %s\n", epoch, shards.Model, shards.TP, shards.Plan)
	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "GROUP\tRANK\tMEMBER\tADDR")
	for _, a := range shards.Assignments {
		fmt.Fprintf(w, "%d\t%d\t%s\t%s\n", a.Group, a.Rank, a.MemberID, a.Addr)
	}
	return w.Flush()
}
