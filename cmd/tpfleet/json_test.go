package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// snakeKey is a --json output's key: snake_case.
var snakeKey = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

// badKeys returns the keys of the JSON value v, at any depth, that are not snake_case, as paths. The
// values under the paths in data are maps keyed by data (tensor names), whose keys are not checked.
func badKeys(v any, path string, data map[string]bool) []string {
	var bad []string
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if !data[path] && !snakeKey.MatchString(k) {
				bad = append(bad, path+"/"+k)
			}
			p := path + "/" + k
			if data[path] {
				p = path + "/*"
			}
			bad = append(bad, badKeys(x, p, data)...)
		}
	case []any:
		for _, x := range v {
			bad = append(bad, badKeys(x, path, data)...)
		}
	}
	return bad
}

// TestJSONSnakeCase: every command's --json output is snake_case (rebalance printed Go's field names
// where cluster shards printed snake_case).
func TestJSONSnakeCase(t *testing.T) {
	etcd := freePort(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, _ := startServe(t, ctx, chatFixture, "--tp", "1", "--workers", "2", "--etcd-listen", etcd,
		"--listen", "127.0.0.1:0", "--log-level", "warn")
	waitCoordinator(t, addr)
	model := filepath.Join(fixtures, "moe-top1")
	for _, tc := range []struct {
		args []string
		data []string // paths of maps keyed by data
	}{
		{[]string{"rebalance", "--addr", addr, "--json"}, nil},
		{[]string{"cluster", "shards", "--etcd", etcd, "--json"}, nil},
		{[]string{"cluster", "members", "--etcd", etcd, "--json"}, nil},
		{[]string{"generate", "--addr", addr, "--ids", "1,2,3", "--max-tokens", "2", "--json"}, nil},
		{[]string{"generate", "--model", model, "--ids", "1,2,3", "--max-tokens", "2", "--json"}, nil},
		{[]string{"tokenize", "--model", chatFixture, "--text", "hi", "--json"}, nil},
		{[]string{"tokenize", "--model", chatFixture, "--decode", "104,105", "--json"}, nil},
		{[]string{"shards", "plan", "--model", model, "--tp", "2", "--json"}, []string{"/rules"}},
		{[]string{"bench", "--layers", "1", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--intermediate", "64",
			"--intermediate-mlp", "64", "--experts", "2", "--vocab", "128", "--prompt", "4", "--tokens", "2", "--runs", "1", "--json"}, nil},
	} {
		exit, stdout, stderr := tpfleet(t, tc.args...)
		var v any
		if err := json.Unmarshal([]byte(stdout), &v); exit != 0 || err != nil {
			t.Errorf("tpfleet %s = exit %d, %v: %q %q", strings.Join(tc.args, " "), exit, err, stdout, stderr)
			continue
		}
		data := map[string]bool{}
		for _, p := range tc.data {
			data[p] = true
		}
		if bad := badKeys(v, "", data); len(bad) > 0 {
			t.Errorf("tpfleet %s: keys not in snake_case: %v\n%s", strings.Join(tc.args, " "), bad, stdout)
		}
	}
	cancel()
	<-code
}
