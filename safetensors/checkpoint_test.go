package safetensors_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/safetensors"
)

// writeCheckpoint writes shards (file name -> tensors) and, if weightMap is
// not nil, an index into a new directory.
func writeCheckpoint(t *testing.T, shards map[string][]safetensors.Tensor, weightMap map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, tensors := range shards {
		if err := safetensors.WriteFile(filepath.Join(dir, name), tensors, map[string]string{"format": "pt"}); err != nil {
			t.Fatal(err)
		}
	}
	if weightMap != nil {
		index, err := json.Marshal(map[string]any{"metadata": map[string]any{"total_size": 0}, "weight_map": weightMap})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, safetensors.IndexFile), index, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestCheckpointSharded(t *testing.T) {
	a := safetensors.F32Tensor("a", []int{2, 2}, []float32{1, 2, 3, 4})
	b := safetensors.I64Tensor("b", []int{3}, []int64{7, 8, 9})
	c := safetensors.F32Tensor("c", []int{1}, []float32{5})
	dir := writeCheckpoint(t,
		map[string][]safetensors.Tensor{"s1.safetensors": {a, b}, "s2.safetensors": {c}},
		map[string]string{"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"})
	ck, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatalf("OpenCheckpoint(%s) = %v", dir, err)
	}
	defer ck.Close()
	if got, want := ck.Names(), []string{"a", "b", "c"}; !slices.Equal(got, want) {
		t.Errorf("Names() = %v, want %v", got, want)
	}
	for _, want := range []safetensors.Tensor{a, b, c} {
		got, err := ck.ReadAll(want.Name)
		if err != nil || !bytes.Equal(got, want.Data) {
			t.Errorf("ReadAll(%q) = %x, %v, want %x", want.Name, got, err, want.Data)
		}
		if !ck.Has(want.Name) {
			t.Errorf("Has(%q) = false, want true", want.Name)
		}
	}
	if got, shape, err := ck.ReadSlice("a", 1, safetensors.Range{Start: 1, End: 2}); err != nil ||
		!bytes.Equal(got, safetensors.F32Tensor("", nil, []float32{2, 4}).Data) || !slices.Equal(shape, []int{2, 1}) {
		t.Errorf("ReadSlice(%q, 1, [1,2)) = %x %v, %v, want [2 4] [2 1]", "a", got, shape, err)
	}
	if info, err := ck.Info("b"); err != nil || info.DType != safetensors.I64 || !slices.Equal(info.Shape, []int{3}) {
		t.Errorf("Info(%q) = %+v, %v, want I64 [3]", "b", info, err)
	}
	if ck.Has("zzz") {
		t.Errorf("Has(%q) = true, want false", "zzz")
	}
	if _, err := ck.Info("zzz"); !errors.Is(err, safetensors.ErrNotFound) || !strings.Contains(err.Error(), `"zzz"`) {
		t.Errorf("Info(%q) = %v, want %v naming it", "zzz", err, safetensors.ErrNotFound)
	}
	if err := ck.Close(); err != nil {
		t.Errorf("Close() = %v, want nil", err)
	}
	if err := ck.Close(); err != nil {
		t.Errorf("second Close() = %v, want nil", err)
	}
}

func TestOpenCheckpointErrors(t *testing.T) {
	a := safetensors.F32Tensor("a", []int{1}, []float32{1})
	b := safetensors.F32Tensor("b", []int{1}, []float32{2})
	tests := []struct {
		name      string
		shards    map[string][]safetensors.Tensor
		weightMap map[string]string
		err       error
		contains  string
	}{
		{"duplicate across shards",
			map[string][]safetensors.Tensor{"s1.safetensors": {a}, "s2.safetensors": {a, b}},
			map[string]string{"a": "s1.safetensors", "b": "s2.safetensors"},
			safetensors.ErrDuplicate, `"a" is in both`},
		{"index names a missing tensor",
			map[string][]safetensors.Tensor{"s1.safetensors": {a}},
			map[string]string{"a": "s1.safetensors", "x": "s1.safetensors"},
			safetensors.ErrNotFound, `tensor not found: "x", which the index maps to s1.safetensors`},
		{"index names a missing shard",
			map[string][]safetensors.Tensor{"s1.safetensors": {a}},
			map[string]string{"a": "s1.safetensors", "b": "s9.safetensors"},
			fs.ErrNotExist, "s9.safetensors"},
		{"index escapes the directory",
			map[string][]safetensors.Tensor{"s1.safetensors": {a}},
			map[string]string{"a": "../s1.safetensors"},
			nil, `shard name "../s1.safetensors" is not a file in the checkpoint directory`},
		{"empty directory", nil, nil, fs.ErrNotExist, "no model.safetensors.index.json or model.safetensors"},
	}
	for _, tt := range tests {
		dir := writeCheckpoint(t, tt.shards, tt.weightMap)
		ck, err := safetensors.OpenCheckpoint(dir)
		if err == nil {
			ck.Close()
		}
		if err == nil || (tt.err != nil && !errors.Is(err, tt.err)) || !strings.Contains(err.Error(), tt.contains) {
			t.Errorf("%s: OpenCheckpoint(...) = %v, want %v containing %q", tt.name, err, tt.err, tt.contains)
		}
	}
}

func TestOpenCheckpointSingle(t *testing.T) {
	a := safetensors.F32Tensor("a", []int{1}, []float32{1})
	dir := writeCheckpoint(t, map[string][]safetensors.Tensor{safetensors.SingleFile: {a}}, nil)
	for _, path := range []string{dir, filepath.Join(dir, safetensors.SingleFile)} {
		ck, err := safetensors.OpenCheckpoint(path)
		if err != nil {
			t.Fatalf("OpenCheckpoint(%s) = %v", path, err)
		}
		if got := ck.Names(); !slices.Equal(got, []string{"a"}) {
			t.Errorf("OpenCheckpoint(%s).Names() = %v, want [a]", path, got)
		}
		ck.Close()
	}
}

func TestNewCheckpointDuplicate(t *testing.T) {
	open := func(name string, ts ...safetensors.Tensor) *safetensors.File {
		var buf bytes.Buffer
		if err := safetensors.Write(&buf, ts, nil); err != nil {
			t.Fatal(err)
		}
		f, err := safetensors.OpenSource(name, bytes.NewReader(buf.Bytes()), int64(buf.Len()))
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	w := safetensors.F32Tensor("w", []int{1}, []float32{1})
	_, err := safetensors.NewCheckpoint(open("one", w), open("two", w))
	if !errors.Is(err, safetensors.ErrDuplicate) || err.Error() != `safetensors: duplicate tensor: "w" is in both one and two` {
		t.Errorf("NewCheckpoint(one, two) = %v, want %v naming w, one and two", err, safetensors.ErrDuplicate)
	}
}

const fixtures = "../testdata/fixtures"

func TestFixtureShardedCheckpoint(t *testing.T) {
	dir := filepath.Join(fixtures, "dense-moe-mm")
	ck, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatalf("OpenCheckpoint(%s) = %v", dir, err)
	}
	defer ck.Close()
	var index struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	raw, err := os.ReadFile(filepath.Join(dir, safetensors.IndexFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &index); err != nil {
		t.Fatal(err)
	}
	if got := len(ck.Names()); got != len(index.WeightMap) {
		t.Errorf("len(Names()) = %d, want %d from the index", got, len(index.WeightMap))
	}

	const name = "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
	info, err := ck.Info(name)
	if err != nil || info.DType != safetensors.BF16 || !slices.Equal(info.Shape, []int{4, 64, 128}) {
		t.Fatalf("Info(%q) = %+v, %v, want BF16 [4 64 128]", name, info, err)
	}
	full, err := ck.ReadAll(name)
	if err != nil {
		t.Fatal(err)
	}
	vals := make([]float32, info.NumElements())
	if err := safetensors.ToFloat32(info.DType, full, vals); err != nil {
		t.Fatal(err)
	}
	nonzero := 0
	for i, v := range vals {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			t.Fatalf("%s[%d] = %v, want finite", name, i, v)
		}
		if v != 0 {
			nonzero++
		}
	}
	if nonzero == 0 {
		t.Errorf("%s is all zeros", name)
	}
	ranges := []safetensors.Range{{Start: 0, End: 8}, {Start: 64, End: 72}} // rank 0 of TP 8
	got, shape, err := ck.ReadSlice(name, 2, ranges...)
	want, wantShape := naiveSlice(full, info.Shape, 2, 2, ranges)
	if err != nil || !bytes.Equal(got, want) || !slices.Equal(shape, wantShape) {
		t.Errorf("ReadSlice(%q, 2, %v) = %d bytes %v, %v, want %d bytes %v", name, ranges, len(got), shape, err, len(want), wantShape)
	}
}

func TestFixtureGolden(t *testing.T) {
	dir := filepath.Join(fixtures, "moe-top1")
	ck, err := safetensors.OpenCheckpoint(filepath.Join(dir, "golden.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	var golden struct {
		PromptIDs []int64 `json:"prompt_ids"`
		AbsMax    float32 `json:"score_logits_absmax"`
	}
	raw, err := os.ReadFile(filepath.Join(dir, "golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &golden); err != nil {
		t.Fatal(err)
	}

	info, err := ck.Info("score_logits")
	if err != nil || info.DType != safetensors.F32 || !slices.Equal(info.Shape, []int{2, 40, 512}) {
		t.Fatalf("Info(%q) = %+v, %v, want F32 [2 40 512]", "score_logits", info, err)
	}
	data, err := ck.ReadAll("score_logits")
	if err != nil {
		t.Fatal(err)
	}
	logits := make([]float32, info.NumElements())
	if err := safetensors.ToFloat32(info.DType, data, logits); err != nil {
		t.Fatal(err)
	}
	var absMax float32
	for _, v := range logits {
		absMax = max(absMax, float32(math.Abs(float64(v))))
	}
	if absMax != golden.AbsMax {
		t.Errorf("max |score_logits| = %v, want %v from golden.json", absMax, golden.AbsMax)
	}

	for _, name := range []string{"score_ids", "prompt_ids"} {
		info, err := ck.Info(name)
		if err != nil || info.DType != safetensors.I64 {
			t.Fatalf("Info(%q) = %+v, %v, want I64", name, info, err)
		}
		data, err := ck.ReadAll(name)
		if err != nil {
			t.Fatal(err)
		}
		ids, err := safetensors.ToInt64(info.DType, data)
		if err != nil {
			t.Fatal(err)
		}
		for i, id := range ids {
			if id < 0 || id >= 512 {
				t.Errorf("%s[%d] = %d, want a token id in [0, 512)", name, i, id)
			}
		}
		if name == "score_ids" && !slices.Equal(info.Shape, []int{2, 40}) {
			t.Errorf("Info(%q).Shape = %v, want [2 40]", name, info.Shape)
		}
		if name == "prompt_ids" && !slices.Equal(ids, golden.PromptIDs) {
			t.Errorf("ToInt64(prompt_ids) = %v, want %v from golden.json", ids, golden.PromptIDs)
		}
	}
}
