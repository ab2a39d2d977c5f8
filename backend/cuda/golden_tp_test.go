package cuda_test

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/comm/nccl"
	"github.com/tpfleet/tpfleet/internal/gputest"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/shard"
)

// TestGoldenTP runs each fixture's teacher-forced scoring with TP = 2, 4 and 8 (HF's tp plan; as many as
// there are GPUs) on GPUs 0..TP-1, joined by an in-process NCCL group, and compares the logits with TP=1
// on GPU 0 and with HF's float32 goldens: relative L2 <= 3e-2 and top-1 agreement >= 98 % for both. It
// skips with fewer than 2 GPUs.
func TestGoldenTP(t *testing.T) {
	gputest.Require(t)
	n, err := cuda.DeviceCount()
	gputest.Check(t, "cuda.DeviceCount", err)
	if n < 2 {
		t.Skipf("TP=2 needs 2 GPUs, %d present", n)
	}
	var bs []*cuda.Backend
	for d := range min(n, 8) {
		b, err := cuda.New(cuda.Config{Device: d})
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		bs = append(bs, b)
	}
	root := fixturesDir(t)
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		for _, tp := range []int{2, 4, 8} {
			if tp <= len(bs) {
				t.Run(fmt.Sprintf("%s/tp%d", e.Name(), tp), func(t *testing.T) { goldenTP(t, bs[:tp], filepath.Join(root, e.Name())) })
			}
		}
	}
}

// goldenTP compares TP = len(bs) on those GPUs with TP=1 on the first and with HF's goldens.
func goldenTP(t *testing.T, bs []*cuda.Backend, dir string) {
	tp := len(bs)
	ctx := context.Background()
	cfg, err := llama4.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NumHeads%tp != 0 {
		t.Skipf("the fixture's %d heads do not split %d ways", cfg.NumHeads, tp)
	}
	ckpt, gold := openGolden(t, dir)
	ids64, batch, seq, want := gold.ids, gold.batch, gold.seq, gold.logits

	// TP=1 on GPU 0.
	m1, err := llama4.Load(ctx, bs[0], cfg, llama4.NewCheckpointWeights(ckpt, bs[0], cfg), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	// TP on GPUs 0..tp-1.
	plan, _ := shard.NamedPlan(cfg, "tp")
	contexts := make([]uintptr, tp)
	for i, b := range bs {
		contexts[i] = b.Context()
	}
	comms, err := nccl.NewGroup(ctx, contexts)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, c := range comms {
			c.Close()
		}
	}()
	ranks := make([]*llama4.Model, tp)
	for r := range ranks {
		man, err := shard.NewManifest(cfg, ckpt, plan, tp, r)
		if err != nil {
			t.Fatal(err)
		}
		if ranks[r], err = llama4.Load(ctx, bs[r], cfg, run.NewRankWeights(shard.NewRankReader(ckpt, man), bs[r]), llama4.Parallel{Comm: comms[r]}); err != nil {
			t.Fatal(err)
		}
	}
	var vsTP1, vsHF agreement
	var elapsed time.Duration
	for r := range batch {
		row := make([]int, seq)
		for i := range row {
			row[i] = int(ids64[r*seq+i])
		}
		one, err := m1.Score(ctx, row)
		if err != nil {
			t.Fatal(err)
		}
		got := make([][]float32, tp)
		errs := make([]error, tp)
		start := time.Now()
		var wg sync.WaitGroup
		for k := range ranks {
			wg.Go(func() { got[k], errs[k] = ranks[k].Score(ctx, row) })
		}
		wg.Wait()
		elapsed += time.Since(start)
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		for k := 1; k < tp; k++ {
			if fmt.Sprint(got[0][:8]) != fmt.Sprint(got[k][:8]) {
				t.Errorf("rank 0 and rank %d logits differ: %v vs %v", k, got[0][:8], got[k][:8])
			}
		}
		vsTP1.add(got[0], one, cfg.VocabSize)
		vsHF.add(got[0], want[r*seq*cfg.VocabSize:(r+1)*seq*cfg.VocabSize], cfg.VocabSize)
	}
	name := filepath.Base(dir)
	status := ""
	for _, a := range []struct {
		what string
		a    *agreement
	}{{"TP=1 GPU", &vsTP1}, {"HF float32", &vsHF}} {
		rel, top1 := a.a.result()
		if rel > goldenRelL2 || top1 < goldenTop1 {
			status = " FAIL"
			t.Errorf("TP=%d vs %s: relative L2 = %.3g (want <= %.3g), top-1 = %d/%d (want >= %.0f%%)",
				tp, a.what, rel, goldenRelL2, a.a.agree, a.a.positions, 100*goldenTop1)
		}
	}
	r1, _ := vsTP1.result()
	rh, _ := vsHF.result()
	t.Logf("%s TP=%d: vs TP=1 relL2 %.3g top-1 %d/%d; vs HF relL2 %.3g top-1 %d/%d; score %v",
		name, tp, r1, vsTP1.agree, vsTP1.positions, rh, vsHF.agree, vsHF.positions, elapsed)
	row(fmt.Sprintf("tp%d %s", tp, name), fmt.Sprintf("TP=%d (GPUs 0..%d, NCCL), %dx%d ids", tp, tp-1, batch, seq),
		fmt.Sprintf("vsTP1 relL2 %.2e top1 %d/%d; vsHF relL2 %.2e top1 %d/%d%s", r1, vsTP1.agree, vsTP1.positions, rh, vsHF.agree, vsHF.positions, status),
		fmt.Sprintf("score %v", elapsed.Round(time.Millisecond)))
}

// agreement accumulates relative L2 and top-1 agreement of logits [positions, vocab] against a reference.
type agreement struct {
	num, den         float64
	agree, positions int
}

func (a *agreement) add(got, want []float32, vocab int) {
	for p := 0; p+vocab <= len(want); p += vocab {
		g, h := got[p:p+vocab], want[p:p+vocab]
		for i := range h {
			d := float64(g[i]) - float64(h[i])
			a.num += d * d
			a.den += float64(h[i]) * float64(h[i])
		}
		if argmax(g) == argmax(h) {
			a.agree++
		}
		a.positions++
	}
}

func (a *agreement) result() (relL2, top1 float64) {
	return math.Sqrt(a.num / a.den), float64(a.agree) / float64(a.positions)
}
