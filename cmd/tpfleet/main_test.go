package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/safetensors"
)

const fixtures = "../../testdata/fixtures"

// tpfleet runs the command in-process and returns its exit status, stdout and stderr.
func tpfleet(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

type golden struct {
	prompt, greedy []int
}

func readGolden(t *testing.T, fixture string) golden {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtures, fixture, "golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var g struct {
		Prompt []int `json:"prompt_ids"`
		Greedy []int `json:"greedy_ids"`
	}
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	return golden{g.Prompt, g.Greedy}
}

func joinIDs(ids []int) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.Itoa(id)
	}
	return strings.Join(s, ",")
}

type generateJSON struct {
	IDs          []int  `json:"ids"`
	FinishReason string `json:"finish_reason"`
	PromptTokens int    `json:"prompt_tokens"`
}

func TestGenerateJSONMatchesHFGreedy(t *testing.T) {
	for _, fixture := range []string{"moe-top1", "dense-moe-mm", "moe-top2", "moe-top1 --prefill-chunk 5"} {
		extra := strings.Fields(fixture)[1:] // a chunked prefill must give the same ids
		fixture = strings.Fields(fixture)[0]
		g := readGolden(t, fixture)
		code, stdout, stderr := tpfleet(t, append([]string{"generate", "--model", filepath.Join(fixtures, fixture), "--ids", joinIDs(g.prompt),
			"--max-tokens", strconv.Itoa(len(g.greedy)), "--temperature", "0", "--ignore-eos", "--json"}, extra...)...)
		if code != 0 {
			t.Fatalf("generate %s: exit %d, stderr:\n%s", fixture, code, stderr)
		}
		var out generateJSON
		if err := json.Unmarshal([]byte(stdout), &out); err != nil {
			t.Fatalf("generate --json printed %q: %v", stdout, err)
		}
		if !slices.Equal(out.IDs, g.greedy) || out.FinishReason != "length" || out.PromptTokens != len(g.prompt) {
			t.Errorf("generate %s = %+v, want ids %v, length", fixture, out, g.greedy)
		}
		if !strings.Contains(stderr, "model loaded") {
			t.Errorf("generate %s: stderr has no load progress:\n%s", fixture, stderr)
		}
	}
}

// TestGenerateStopsAtEOS: without --ignore-eos, dense-moe-mm's greedy run stops at eos id 2 (its 15th token).
func TestGenerateStopsAtEOS(t *testing.T) {
	g := readGolden(t, "dense-moe-mm")
	code, stdout, stderr := tpfleet(t, "generate", "--model", filepath.Join(fixtures, "dense-moe-mm"), "--ids", joinIDs(g.prompt),
		"--max-tokens", "30", "--temperature", "0", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var out generateJSON
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatal(err)
	}
	stop := slices.Index(g.greedy, 2)
	if !slices.Equal(out.IDs, g.greedy[:stop+1]) || out.FinishReason != "stop" {
		t.Errorf("generate = %+v, want %v, stop", out, g.greedy[:stop+1])
	}
}

func TestGeneratePlainOutput(t *testing.T) {
	g := readGolden(t, "moe-top1")
	code, stdout, stderr := tpfleet(t, "generate", "--model", filepath.Join(fixtures, "moe-top1"), "--ids", joinIDs(g.prompt),
		"--max-tokens", "5", "--temperature", "0")
	want := strings.ReplaceAll(joinIDs(g.greedy[:5]), ",", " ") + "\n"
	if code != 0 || stdout != want {
		t.Errorf("generate = %d, %q (stderr %s), want 0, %q", code, stdout, stderr, want)
	}
}

func TestScoreWritesLogits(t *testing.T) {
	dir := t.TempDir()
	fixture := filepath.Join(fixtures, "moe-top2")
	gold, err := safetensors.OpenCheckpoint(filepath.Join(fixture, "golden.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer gold.Close()
	ids, err := gold.ReadAll("score_ids")
	if err != nil {
		t.Fatal(err)
	}
	info, _ := gold.Info("score_ids")
	in := filepath.Join(dir, "ids.safetensors")
	if err := safetensors.WriteFile(in, []safetensors.Tensor{{Name: "input_ids", DType: safetensors.I64, Shape: info.Shape, Data: ids}}, nil); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "logits.safetensors")
	for _, extra := range [][]string{nil, {"--prefill-chunk", "7"}} { // whole, and in pieces of 7 tokens
		if code, _, stderr := tpfleet(t, append([]string{"score", "--model", fixture, "--ids-file", in, "--out", out}, extra...)...); code != 0 {
			t.Fatalf("score %v: exit %d: %s", extra, code, stderr)
		}
		got := readF32(t, out, "logits")
		want := readF32(t, filepath.Join(fixture, "golden.safetensors"), "score_logits")
		if len(got.values) != len(want.values) || !slices.Equal(got.shape, want.shape) {
			t.Fatalf("score %v: logits shape %v, want %v", extra, got.shape, want.shape)
		}
		var diff, ref float64
		for i := range want.values {
			diff = math.Max(diff, math.Abs(float64(got.values[i]-want.values[i])))
			ref = math.Max(ref, math.Abs(float64(want.values[i])))
		}
		if diff/ref > 1e-4 {
			t.Errorf("score %v: logits max |Δ|/max |ref| = %.3g, want <= 1e-4", extra, diff/ref)
		}
	}

	// --ids gives [1, seq, vocab].
	out1 := filepath.Join(dir, "one.safetensors")
	if code, _, stderr := tpfleet(t, "score", "--model", fixture, "--ids", "1,5,9", "--out", out1); code != 0 {
		t.Fatalf("score --ids: exit %d: %s", code, stderr)
	}
	if one := readF32(t, out1, "logits"); !slices.Equal(one.shape, []int{1, 3, 512}) {
		t.Errorf("score --ids 1,5,9 shape = %v, want [1 3 512]", one.shape)
	}
}

type f32Tensor struct {
	shape  []int
	values []float32
}

func readF32(t *testing.T, path, name string) f32Tensor {
	t.Helper()
	c, err := safetensors.OpenCheckpoint(path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, shape, err := c.Float32s(name)
	if err != nil {
		t.Fatal(err)
	}
	return f32Tensor{shape, v}
}

// copyFixture copies a fixture directory so a test can damage it.
func copyFixture(t *testing.T, name string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), name)
	if err := os.CopyFS(dst, os.DirFS(filepath.Join(fixtures, name))); err != nil {
		t.Fatal(err)
	}
	return dst
}

// moveTensorPastEnd rewrites a safetensors header so that one tensor's data_offsets lie past the data section.
func moveTensorPastEnd(t *testing.T, path, name string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	hlen := binary.LittleEndian.Uint64(data[:8])
	var header map[string]json.RawMessage
	if err := json.Unmarshal(data[8:8+hlen], &header); err != nil {
		t.Fatal(err)
	}
	body := data[8+hlen:]
	var entry map[string]any
	if err := json.Unmarshal(header[name], &entry); err != nil {
		t.Fatal(err)
	}
	offs := entry["data_offsets"].([]any)
	size := offs[1].(float64) - offs[0].(float64)
	entry["data_offsets"] = []float64{float64(len(body)), float64(len(body)) + size}
	header[name], _ = json.Marshal(entry)
	newHeader, _ := json.Marshal(header)
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(newHeader)))
	out = append(append(out, newHeader...), body...)
	if err := os.WriteFile(path, out, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestBadInputsGiveOneLineErrors: each bad input fails with exit status 1 or 2 and one line on stderr that
// names the problem; nothing panics.
func TestBadInputsGiveOneLineErrors(t *testing.T) {
	truncated := copyFixture(t, "moe-top1")
	st := filepath.Join(truncated, "model.safetensors")
	data, err := os.ReadFile(st)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(st, data[:len(data)/2], 0o644); err != nil {
		t.Fatal(err)
	}

	outOfRange := copyFixture(t, "moe-top1")
	moveTensorPastEnd(t, filepath.Join(outOfRange, "model.safetensors"), "lm_head.weight")

	noHidden := copyFixture(t, "moe-top1")
	cfgPath := filepath.Join(noHidden, "config.json")
	var cfg map[string]any
	raw, _ := os.ReadFile(cfgPath)
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	delete(cfg, "hidden_size")
	raw, _ = json.Marshal(cfg)
	if err := os.WriteFile(cfgPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}

	model := filepath.Join(fixtures, "moe-top1")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"truncated safetensors", []string{"generate", "--model", truncated, "--ids", "1,2"}, "truncated"},
		{"offsets out of range", []string{"generate", "--model", outOfRange, "--ids", "1,2"}, "out of range"},
		{"config without hidden_size", []string{"generate", "--model", noHidden, "--ids", "1,2"}, "hidden_size"},
		{"id outside the vocabulary", []string{"generate", "--model", model, "--ids", "1,512"}, "outside the vocabulary"},
		{"score id outside the vocabulary", []string{"score", "--model", model, "--ids", "-3", "--out", filepath.Join(t.TempDir(), "x")}, "outside the vocabulary"},
		{"missing model dir", []string{"generate", "--model", filepath.Join(t.TempDir(), "none"), "--ids", "1"}, "config.json"},
		{"ids not integers", []string{"generate", "--model", model, "--ids", "1,x"}, `"x" is not an integer`},
		{"max tokens zero", []string{"generate", "--model", model, "--ids", "1", "--max-tokens", "0"}, "--max-tokens 0"},
		{"past the context", []string{"generate", "--model", model, "--ids", "1", "--max-tokens", "256"}, "context"},
		{"negative temperature", []string{"generate", "--model", model, "--ids", "1", "--temperature", "-1"}, "temperature"},
		{"no model", []string{"generate", "--ids", "1"}, "--model is required"},
		{"score without out", []string{"score", "--model", model, "--ids", "1"}, "--out is required"},
		{"unknown command", []string{"frobnicate"}, "unknown command"},
		{"offload on the cpu", []string{"generate", "--model", model, "--ids", "1", "--offload-experts"}, "cannot keep experts in host memory"},
	} {
		code, _, stderr := tpfleet(t, tc.args...)
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		if tc.name == "unknown command" {
			lines = lines[:1]
		}
		if code == 0 || len(lines) != 1 || !strings.Contains(lines[0], tc.want) || strings.Contains(stderr, "panic") {
			t.Errorf("%s: tpfleet %v = exit %d, stderr %q; want a failure and one line containing %q", tc.name, tc.args, code, stderr, tc.want)
		}
	}
}

// TestHelp: help that is asked for goes to stdout with exit 0, for every command (`tpfleet help CMD`
// and CMD -h); usage after a mistake goes to stderr with exit 2.
func TestHelp(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		code       int
		stdout     string // contained in stdout
		stderrOnly string // when set: contained in stderr, and stdout is empty
	}{
		{[]string{"help"}, 0, "commands:", ""},
		{[]string{"--help"}, 0, "tpfleet help <command>", ""},
		{[]string{"help", "serve"}, 0, "-tensor-parallel-size", ""},
		{[]string{"serve", "--help"}, 0, "-served-model-name", ""},
		{[]string{"help", "cluster"}, 0, "subcommands:", ""},
		{[]string{"help", "cluster", "members"}, 0, "Usage of cluster members", ""},
		{[]string{"rebalance", "-h"}, 0, "-json", ""},
		{[]string{}, 2, "", "usage: tpfleet <command>"},
		{[]string{"help", "nosuch"}, 2, "", `unknown command "nosuch"`},
		{[]string{"serve", "--no-such-flag"}, 1, "", "flag provided but not defined"},
	} {
		code, stdout, stderr := tpfleet(t, tc.args...)
		if code != tc.code || !strings.Contains(stdout, tc.stdout) ||
			(tc.stderrOnly != "" && (stdout != "" || !strings.Contains(stderr, tc.stderrOnly))) {
			t.Errorf("tpfleet %s = exit %d, stdout %.80q, stderr %.80q; want exit %d, stdout with %q, stderr with %q",
				strings.Join(tc.args, " "), code, stdout, stderr, tc.code, tc.stdout, tc.stderrOnly)
		}
	}
	// Every command has help.
	for _, c := range commands() {
		if code, stdout, _ := tpfleet(t, "help", c.name); code != 0 || stdout == "" {
			t.Errorf("tpfleet help %s = exit %d, stdout %q; want 0 and its help", c.name, code, stdout)
		}
	}
}
