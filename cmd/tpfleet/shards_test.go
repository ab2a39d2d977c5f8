package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const shardsFixture = "../../testdata/fixtures/moe-top1"

func TestShardsPlanText(t *testing.T) {
	var out, errOut bytes.Buffer
	err := runShards(context.Background(), []string{"plan", "--model", shardsFixture, "--tp", "4"}, &out, &errOut)
	if err != nil {
		t.Fatalf("shards plan --tp 4 = %v (stderr %q)", err, errOut.String())
	}
	text := out.String()
	for _, want := range []string{
		"plan tp, tp 4: 51 text tensors",
		"rank 0 of 4", "rank 3 of 4",
		"TENSOR", "STYLE", "LOCAL SHAPE", "BYTES",
		"model.layers.0.feed_forward.experts.gate_up_proj", "packed_rowwise", "dim 2 [16,32)+[80,96)",
		"model.layers.3.self_attn.k_proj.weight", "dim 0 [16,32) on 2 ranks", // kv head 1 on ranks 2 and 3
		"model.norm.weight", "whole",
		"totals", "RANK", "OF FULL",
		"rules that split no tensor", "layers.*.feed_forward.experts (moe_tp_experts)",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("shards plan --tp 4 output lacks %q:\n%s", want, text)
		}
	}
}

func TestShardsPlanJSON(t *testing.T) {
	var out, errOut bytes.Buffer
	err := runShards(context.Background(), []string{"plan", "--model", shardsFixture, "--tp", "2", "--plan", "ep", "--json"}, &out, &errOut)
	if err != nil {
		t.Fatalf("shards plan --plan ep --json = %v (stderr %q)", err, errOut.String())
	}
	var got struct {
		Plan  string            `json:"plan"`
		Rules map[string]string `json:"rules"`
		TP    int               `json:"tp"`
		Ranks []struct {
			Rank      int   `json:"rank"`
			Bytes     int64 `json:"bytes"`
			FullBytes int64 `json:"full_bytes"`
			Tensors   []struct {
				Name       string   `json:"name"`
				Style      string   `json:"style"`
				DType      string   `json:"dtype"`
				Dim        int      `json:"dim"`
				Ranges     [][2]int `json:"ranges"`
				LocalShape []int    `json:"local_shape"`
				Bytes      int64    `json:"bytes"`
			} `json:"tensors"`
		} `json:"ranks"`
	}
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("shards plan --json output is not one JSON object: %v\n%s", err, out.String())
	}
	if got.Plan != "ep" || got.TP != 2 || len(got.Ranks) != 2 || got.Rules["layers.*.feed_forward.router"] != "ep_router" {
		t.Errorf("shards plan --json = plan %q tp %d, %d ranks, rules %v; want ep, 2, 2 ranks with ep_router", got.Plan, got.TP, len(got.Ranks), got.Rules)
	}
	for _, r := range got.Ranks {
		if r.Bytes <= 0 || r.Bytes >= r.FullBytes || len(r.Tensors) != 51 {
			t.Errorf("shards plan --json rank %d = %d of %d bytes, %d tensors; want a part, 51 tensors", r.Rank, r.Bytes, r.FullBytes, len(r.Tensors))
		}
		for _, s := range r.Tensors {
			if s.Name == "model.layers.2.feed_forward.experts.down_proj" {
				want := [2]int{2 * r.Rank, 2*r.Rank + 2}
				if s.Style != "grouped_gemm" || s.DType != "BF16" || s.Dim != 0 || len(s.Ranges) != 1 || s.Ranges[0] != want || s.LocalShape[0] != 2 {
					t.Errorf("shards plan --json rank %d %s = %+v, want grouped_gemm BF16 dim 0 %v", r.Rank, s.Name, s, want)
				}
			}
		}
	}
}

func TestShardsPlanRank(t *testing.T) {
	var out, errOut bytes.Buffer
	if err := runShards(context.Background(), []string{"plan", "--model", shardsFixture, "--tp", "2", "--rank", "1"}, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	if text := out.String(); strings.Contains(text, "rank 0 of 2") || !strings.Contains(text, "rank 1 of 2") {
		t.Errorf("shards plan --rank 1 = %q, want rank 1 only", text)
	}
}

func TestShardsPlanErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`{"layers.*.self_attn.q_proj": "colwize"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	typo := filepath.Join(dir, "typo.json")
	if err := os.WriteFile(typo, []byte(`{"layers.*.self_attn.qkv_proj": "colwise"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args  []string
		usage bool
		want  []string
	}{
		{[]string{}, true, []string{"subcommand"}},
		{[]string{"move"}, true, []string{`"move"`}},
		{[]string{"plan", "--tp", "2"}, true, []string{"--model"}},
		{[]string{"plan", "--model", shardsFixture, "--tp", "0"}, true, []string{"--tp 0"}},
		{[]string{"plan", "--model", shardsFixture, "--tp", "2", "--rank", "2"}, true, []string{"--rank 2"}},
		{[]string{"plan", "--model", shardsFixture, "--plan", "nope"}, true, []string{`"nope"`, "tp, ep"}},
		{[]string{"plan", "--model", shardsFixture, "--tp", "2", "--plan", bad}, false, []string{`unknown style "colwize"`, `"layers.*.self_attn.q_proj"`}},
		{[]string{"plan", "--model", shardsFixture, "--tp", "2", "--plan", typo}, false, []string{`no tensor matches pattern "layers.*.self_attn.qkv_proj"`}},
		{[]string{"plan", "--model", shardsFixture, "--tp", "3"}, false, []string{"4 attention heads", "tp=3", "512 vocabulary rows"}},
	}
	for _, tt := range tests {
		var out, errOut bytes.Buffer
		err := runShards(context.Background(), tt.args, &out, &errOut)
		if err == nil {
			t.Errorf("shards %q = nil error, want one", tt.args)
			continue
		}
		if errors.Is(err, errUsage) != tt.usage {
			t.Errorf("shards %q = %v, usage error %v, want %v", tt.args, err, !tt.usage, tt.usage)
		}
		msg := err.Error()
		if strings.Contains(msg, "\n") {
			t.Errorf("shards %q = %q, want one line", tt.args, msg)
		}
		for _, w := range tt.want {
			if !strings.Contains(msg, w) {
				t.Errorf("shards %q = %q, want it to mention %s", tt.args, msg, w)
			}
		}
	}
}

// TestShardsPlanQuantization: with --quantization each tensor shows its stored dtype and bytes and its
// in-memory format and bytes, in the table and in --json; lm_head and the router stay bf16.
func TestShardsPlanQuantization(t *testing.T) {
	var out, errOut bytes.Buffer
	if err := runShards(context.Background(), []string{"plan", "--model", shardsFixture, "--quantization", "fp8"}, &out, &errOut); err != nil {
		t.Fatalf("shards plan --quantization fp8 = %v (stderr %q)", err, errOut.String())
	}
	for _, want := range []string{"STORED", "IN MEMORY", "MEMORY BYTES", "fp8-rowwise+act", "BF16", "in memory"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("shards plan --quantization fp8 output lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if err := runShards(context.Background(), []string{"plan", "--model", shardsFixture, "--quantization", "int4", "--json"}, &out, &errOut); err != nil {
		t.Fatalf("shards plan --quantization int4 --json = %v", err)
	}
	var got struct {
		Quantization string `json:"quantization"`
		Memory       []struct {
			MemoryBytes int64 `json:"memory_bytes"`
			Tensors     []struct {
				Name        string `json:"name"`
				StoredDType string `json:"stored_dtype"`
				StoredBytes int64  `json:"stored_bytes"`
				Format      string `json:"format"`
				MemoryBytes int64  `json:"memory_bytes"`
			} `json:"tensors"`
		} `json:"memory"`
	}
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Quantization != "int4-g128" || len(got.Memory) != 1 {
		t.Fatalf("shards plan --json: quantization %q, %d ranks of memory", got.Quantization, len(got.Memory))
	}
	var sum int64
	for _, x := range got.Memory[0].Tensors {
		sum += x.MemoryBytes
		quantised := !strings.Contains(x.Name, "lm_head") && !strings.Contains(x.Name, "router") && !strings.Contains(x.Name, "embed") && !strings.Contains(x.Name, "norm")
		if x.StoredDType != "BF16" || (x.Format == "int4-g128") != quantised || (quantised && x.MemoryBytes*3 >= x.StoredBytes) || (!quantised && x.MemoryBytes != x.StoredBytes) {
			t.Errorf("tensor %+v: want int4-g128 at under a third of its bytes exactly when quantisable", x)
		}
	}
	if sum != got.Memory[0].MemoryBytes {
		t.Errorf("memory_bytes = %d, want the tensors' sum %d", got.Memory[0].MemoryBytes, sum)
	}
}
