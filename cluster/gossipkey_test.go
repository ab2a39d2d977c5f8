package cluster_test

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
)

// newGossipKey returns a random 32-byte key in base64.
func newGossipKey(t *testing.T) string {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(k)
}

// writeKeys writes a key file atomically, with a modification time unlike the previous one's.
func writeKeys(t *testing.T, path string, keys ...string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strings.Join(keys, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func startKeyedNode(t *testing.T, name, keyFile string, join []string) (*cluster.Gossip, error) {
	t.Helper()
	g, err := cluster.StartGossip(testCtx(t), cluster.GossipConfig{
		Name: name, BindAddr: "127.0.0.1", Join: join, Logger: zap.NewNop(),
		ProbeInterval: 200 * time.Millisecond, ProbeTimeout: 100 * time.Millisecond,
		KeyFile: keyFile, KeyReloadInterval: 20 * time.Millisecond,
	})
	if err == nil {
		t.Cleanup(func() { _ = g.Close() })
	}
	return g, err
}

// TestGossipKeys: nodes with the cluster's key file gossip; a node with another key, or none, cannot
// join; the key rotates without a restart (new key second, then first, then alone), after which a node
// that knows only the new key joins.
func TestGossipKeys(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	old, next := newGossipKey(t), newGossipKey(t)
	fileA, fileB := filepath.Join(dir, "a.keys"), filepath.Join(dir, "b.keys")
	writeKeys(t, fileA, old)
	writeKeys(t, fileB, old)
	a, err := startKeyedNode(t, "a", fileA, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := startKeyedNode(t, "b", fileB, []string{a.Addr()})
	if err != nil {
		t.Fatalf("StartGossip(b, same key) = %v", err)
	}
	stranger := filepath.Join(dir, "stranger.keys")
	writeKeys(t, stranger, newGossipKey(t))
	if _, err := startKeyedNode(t, "stranger", stranger, []string{a.Addr()}); err == nil {
		t.Errorf("StartGossip(another key) joined, want refused")
	}
	if _, err := startKeyedNode(t, "plain", "", []string{a.Addr()}); err == nil {
		t.Errorf("StartGossip(no key) joined, want refused")
	}

	// Rotate on both nodes, one step at a time; they keep each other.
	for _, step := range [][]string{{old, next}, {next, old}, {next}} {
		writeKeys(t, fileA, step...)
		writeKeys(t, fileB, step...)
		eventually(t, 10*time.Second, func() error {
			for _, g := range []*cluster.Gossip{a, b} {
				if got := g.Members(); !slices.Equal(got, []string{"a", "b"}) {
					return fmt.Errorf("Members() = %v after writing %d keys", got, len(step))
				}
			}
			return nil
		})
	}
	onlyNext := filepath.Join(dir, "c.keys")
	writeKeys(t, onlyNext, next)
	// a and b reload within KeyReloadInterval; retry the join until they have.
	eventually(t, 10*time.Second, func() error {
		c, err := startKeyedNode(t, "c", onlyNext, []string{a.Addr()})
		if err != nil {
			return err
		}
		if got := c.Members(); !slices.Contains(got, "a") {
			return fmt.Errorf("c: Members() = %v", got)
		}
		return nil
	})
	// The old key is gone: a node that has only it is refused.
	onlyOld := filepath.Join(dir, "d.keys")
	writeKeys(t, onlyOld, old)
	if _, err := startKeyedNode(t, "d", onlyOld, []string{a.Addr()}); err == nil {
		t.Errorf("StartGossip(the rotated-out key) joined, want refused")
	}
}

func TestReadGossipKeys(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	k := newGossipKey(t)
	for _, tc := range []struct {
		name, data string
		n          int
	}{
		{"one", k + "\n", 1},
		{"comments", "# rotated 2026-12-07\n\n" + k + "\n" + k, 2},
		{"empty", "\n# none\n", 0},
		{"not base64", "???\n", 0},
		{"short key", base64.StdEncoding.EncodeToString([]byte("short")) + "\n", 0},
	} {
		p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
		if err := os.WriteFile(p, []byte(tc.data), 0o600); err != nil {
			t.Fatal(err)
		}
		keys, err := cluster.ReadGossipKeys(p)
		if tc.n > 0 && (err != nil || len(keys) != tc.n) {
			t.Errorf("ReadGossipKeys(%s) = %d keys, %v; want %d", tc.name, len(keys), err, tc.n)
		}
		if tc.n == 0 && (err == nil || !errors.Is(err, cluster.ErrInvalid) || strings.Contains(err.Error(), k)) {
			t.Errorf("ReadGossipKeys(%s) = %v; want ErrInvalid without the key", tc.name, err)
		}
	}
}
