package shard

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
)

// countingReader records every ReadAt on one file.
type countingReader struct {
	r     io.ReaderAt
	mu    sync.Mutex
	spans [][2]int64 // offset, length
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	c.spans = append(c.spans, [2]int64{off, int64(len(p))})
	c.mu.Unlock()
	return c.r.ReadAt(p, off)
}

func (c *countingReader) reset() {
	c.mu.Lock()
	c.spans = nil
	c.mu.Unlock()
}

// countedFile is one safetensors file of a checkpoint opened through a countingReader.
type countedFile struct {
	reader    *countingReader
	dataStart int64 // file offset of the data section
	tensors   []safetensors.TensorInfo
}

// openCounted opens a fixture's safetensors files through counting readers.
func openCounted(t *testing.T, fixture string) (*safetensors.Checkpoint, []*countedFile) {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(fixtureDir(fixture), "model*.safetensors"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no safetensors files in %s: %v", fixture, err)
	}
	var files []*safetensors.File
	var counted []*countedFile
	for _, p := range paths {
		osf, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { osf.Close() })
		st, err := osf.Stat()
		if err != nil {
			t.Fatal(err)
		}
		var n [8]byte
		if _, err := osf.ReadAt(n[:], 0); err != nil {
			t.Fatal(err)
		}
		cr := &countingReader{r: osf}
		f, err := safetensors.OpenSource(p, cr, st.Size())
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
		counted = append(counted, &countedFile{reader: cr, dataStart: 8 + int64(binary.LittleEndian.Uint64(n[:])), tensors: f.Tensors()})
	}
	ckpt, err := safetensors.NewCheckpoint(files...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ckpt.Close() })
	return ckpt, counted
}

// readPerTensor attributes every byte read since the last reset to the tensor it belongs to.
func readPerTensor(t *testing.T, files []*countedFile) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, f := range files {
		ts := append([]safetensors.TensorInfo(nil), f.tensors...)
		sort.Slice(ts, func(i, j int) bool { return ts[i].Begin < ts[j].Begin })
		for _, s := range f.reader.spans {
			begin := s[0] - f.dataStart
			i := sort.Search(len(ts), func(i int) bool { return ts[i].End > begin })
			if i == len(ts) || begin < ts[i].Begin || begin+s[1] > ts[i].End {
				t.Fatalf("read [%d, %d) of the data section is not inside one tensor", begin, begin+s[1])
			}
			out[ts[i].Name] += s[1]
		}
	}
	return out
}

// TestRankWeightsReadsOnlyItsSlices loads each rank's weights through readers that count bytes: a rank
// reads exactly its manifest's bytes, 1/TP of every plainly split tensor (Replicas/TP of a replicated kv
// head), all of every whole tensor, and never a whole split tensor (except k/v of a single kv head, which
// every rank needs).
func TestRankWeightsReadsOnlyItsSlices(t *testing.T) {
	ctx := context.Background()
	for _, fx := range fixtures {
		cfg, _ := openFixture(t, fx)
		ckpt, files := openCounted(t, fx)
		for _, pl := range builtins {
			for _, tp := range []int{2, 4} {
				ms, err := NewManifests(cfg, ckpt, pl.plan, tp)
				if err != nil {
					t.Fatalf("NewManifests(%s, %s, tp %d): %v", fx, pl.name, tp, err)
				}
				for _, m := range ms {
					for _, f := range files {
						f.reader.reset()
					}
					w := NewRankWeights(ckpt, fakeOps{}, m)
					var splitFull int64
					for _, s := range m.Tensors {
						if _, _, err := w.Load(ctx, strings.TrimPrefix(s.Name, cfg.Prefix)); err != nil {
							t.Fatal(err)
						}
						if s.Split() {
							info, _ := ckpt.Info(s.Name)
							splitFull += info.NumBytes()
						}
					}
					read := readPerTensor(t, files)
					var total int64
					for _, s := range m.Tensors {
						info, _ := ckpt.Info(s.Name)
						full := info.NumBytes()
						want := full
						if s.Split() {
							want = full * int64(s.Replicas) / int64(tp)
						}
						if got := read[s.Name]; got != want || got != s.Bytes {
							t.Errorf("%s %s tp %d rank %d: read %d bytes of %s (%d whole), want %d (manifest %d)", fx, pl.name, tp, m.Rank, got, s.Name, full, want, s.Bytes)
						}
						if s.Split() && s.Replicas < tp && read[s.Name] >= full { // one kv head on every rank is the whole tensor
							t.Errorf("%s %s tp %d rank %d: read all %d bytes of split %s", fx, pl.name, tp, m.Rank, full, s.Name)
						}
						total += read[s.Name]
					}
					if total != m.Bytes {
						t.Errorf("%s %s tp %d rank %d: read %d bytes, manifest says %d", fx, pl.name, tp, m.Rank, total, m.Bytes)
					}
					if m.SplitBytes*int64(tp) < splitFull || m.SplitBytes*int64(tp) > splitFull*3/2 {
						t.Errorf("%s %s tp %d rank %d: split tensors read %d bytes, want about 1/%d of %d", fx, pl.name, tp, m.Rank, m.SplitBytes, tp, splitFull)
					}
					t.Logf("%s %s tp %d rank %d: read %d of %d bytes (split %d of %d, whole %d)", fx, pl.name, tp, m.Rank, m.Bytes, m.FullBytes, m.SplitBytes, splitFull, m.ReplicatedBytes)
				}
			}
		}
	}
}

// TestRankWeightsLoadModel: the model accepts every rank's layouts (q/k/v/o, MLP and expert splits that
// fit each other, local heads in whole GQA groups).
func TestRankWeightsLoadModel(t *testing.T) {
	ctx := context.Background()
	ops := cpu.New(cpu.Config{Threads: 1})
	for _, fx := range fixtures {
		cfg, ckpt := openFixture(t, fx)
		for _, pl := range builtins {
			for _, tp := range []int{1, 2, 4} {
				for rank := range tp {
					m, err := NewManifest(cfg, ckpt, pl.plan, tp, rank)
					if err != nil {
						t.Fatalf("NewManifest(%s, %s, tp %d, rank %d): %v", fx, pl.name, tp, rank, err)
					}
					if _, err := llama4.Load(ctx, ops, cfg, NewRankWeights(ckpt, ops, m), llama4.Parallel{}); err != nil {
						t.Errorf("llama4.Load(%s, %s, tp %d, rank %d) = %v, want nil", fx, pl.name, tp, rank, err)
					}
				}
			}
		}
	}
}

func TestRankWeightsErrors(t *testing.T) {
	cfg, ckpt := openFixture(t, "dense-moe-mm")
	m, err := NewManifest(cfg, ckpt, DefaultPlan(llama4Family), 2, 1)
	if err != nil {
		t.Fatal(err)
	}
	w := NewRankWeights(ckpt, fakeOps{}, m)
	ctx := context.Background()
	for _, name := range []string{
		"model.layers.9.self_attn.q_proj.weight",
		"vision_model.class_embedding",         // not text
		"language_model.model.norm.weight",     // the prefix is the manifest's to add
		"model.layers.0.self_attn.q_proj.bias", // no such tensor
	} {
		if _, _, err := w.Load(ctx, name); !errors.Is(err, safetensors.ErrNotFound) {
			t.Errorf("Load(%q) = %v, want ErrNotFound", name, err)
		}
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, err := w.Load(cancelled, "model.norm.weight"); !errors.Is(err, context.Canceled) {
		t.Errorf("Load(cancelled ctx) = %v, want context.Canceled", err)
	}
	if _, lay, err := w.Load(ctx, "model.norm.weight"); err != nil || !reflect.DeepEqual(lay, llama4.Replicated) {
		t.Errorf("Load(model.norm.weight) = %+v, %v, want Replicated, nil", lay, err)
	}
}
