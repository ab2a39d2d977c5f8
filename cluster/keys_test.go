package cluster_test

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tpfleet/tpfleet/cluster"
)

// TestKeyLayout writes one of everything and lists the keys with a plain etcd get, as etcdctl would.
func TestKeyLayout(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "layout")
	other := newClient(t, e, "other")
	ctx := testCtx(t)
	if got, want := c.Prefix(), "/tpfleet/layout/"; got != want {
		t.Fatalf("Prefix() = %q, want %q", got, want)
	}
	def, err := cluster.New(ctx, cluster.Config{Endpoints: e.Endpoints()})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer def.Close()
	if got, want := def.Prefix(), "/tpfleet/"+cluster.DefaultCluster+"/"; got != want {
		t.Errorf("Prefix() of the default cluster = %q, want %q", got, want)
	}

	if _, err := c.Register(ctx, worker("host-42-0", 7001), 5*time.Second); err != nil {
		t.Fatalf("Register: %v", err)
	}
	if err := c.PutPlan(ctx, testPlan(1, 1, 1), 0); err != nil {
		t.Fatalf("PutPlan: %v", err)
	}
	if err := c.PutRendezvous(ctx, 1, 0, 0, []byte("10.0.0.1:29500")); err != nil {
		t.Fatalf("PutRendezvous: %v", err)
	}
	if err := c.PutNCCLID(ctx, 1, 0, []byte("\x00nccl-id"), 0); err != nil {
		t.Fatalf("PutNCCLID: %v", err)
	}
	l, err := c.Campaign(ctx, "coord-1", 5*time.Second)
	if err != nil {
		t.Fatalf("Campaign: %v", err)
	}
	if _, err := other.Register(ctx, worker("host-42-0", 7001), 5*time.Second); err != nil {
		t.Fatalf("Register in another cluster: %v", err)
	}

	resp, err := c.Etcd().Get(ctx, "/tpfleet/layout/", clientv3.WithPrefix())
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	var keys []string
	values := map[string][]byte{}
	for _, kv := range resp.Kvs {
		k := strings.TrimPrefix(string(kv.Key), "/tpfleet/layout/")
		keys = append(keys, k)
		values[k] = kv.Value
	}
	want := []string{
		strings.TrimPrefix(l.Key(), "/tpfleet/layout/"),
		"members/host-42-0",
		"nccl/00000000000000000001/0",
		"plan",
		"rdzv/00000000000000000001/0/0",
	}
	slices.Sort(want)
	if !slices.Equal(keys, want) {
		t.Fatalf("keys under /tpfleet/layout/ = %q, want %q", keys, want)
	}
	if !strings.HasPrefix(l.Key(), "/tpfleet/layout/leader/") {
		t.Errorf("leader key %q not under /tpfleet/layout/leader/", l.Key())
	}
	if got := string(values[want[0]]); got != "coord-1" {
		t.Errorf("leader key value = %q, want coord-1", got)
	}
	var m map[string]any
	if err := json.Unmarshal(values["members/host-42-0"], &m); err != nil || m["id"] != "host-42-0" || m["addr"] != "127.0.0.1:7001" {
		t.Errorf("members/host-42-0 = %s (%v), want JSON with id and addr", values["members/host-42-0"], err)
	}
	var p map[string]any
	if err := json.Unmarshal(values["plan"], &p); err != nil || p["epoch"] != 1.0 || p["plan_name"] != "tp" {
		t.Errorf("plan = %s (%v), want JSON with epoch 1 and plan_name", values["plan"], err)
	}
	if got := string(values["rdzv/00000000000000000001/0/0"]); got != "10.0.0.1:29500" {
		t.Errorf("rendezvous value = %q, want the raw bytes", got)
	}
	if got := string(values["nccl/00000000000000000001/0"]); got != "\x00nccl-id" {
		t.Errorf("nccl id value = %q, want the raw bytes", got)
	}
}
