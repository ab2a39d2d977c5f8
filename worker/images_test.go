package worker_test

import (
	"path/filepath"
	"testing"

	"github.com/tpfleet/tpfleet/model/llama4/llama4test"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/worker"
)

// visionDir is the dense-moe-mm fixture (a random vision tower: 28-pixel tiles, one <|patch|> slot a
// tile) with the image ids 505/506/510.
func visionDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "vision-mm")
	if err := llama4test.VisionCheckpoint(filepath.Join(filepath.Dir(fixture), "dense-moe-mm"), dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// stripes encodes a w×h PNG whose pixels depend on seed.
func stripes(_ *testing.T, w, h, seed int) []byte { return llama4test.PNG(w, h, seed) }

// TestStepImages: ranks of a TP=2 group encode the images of the sequences a step starts (two at once
// here: one vision pass) and keep the features for the prompt's later pieces; the results equal those of
// each sequence run alone and whole. Images outside a start, bad images and image slots beyond the
// features are invalid requests that leave the group serving.
func TestStepImages(t *testing.T) {
	dir := visionDir(t)
	e := startEtcd(t)
	cli := newClient(t, e)
	w0 := startWorker(t, testConfig(t, e, "w0"))
	w1 := startWorker(t, testConfig(t, e, "w1"))
	c0, c1 := tpfleetv1.NewWorkerClient(dial(t, w0.Addr())), tpfleetv1.NewWorkerClient(dial(t, w1.Addr()))
	p := plan(1, w0, w1)
	p.Model = dir
	putPlan(t, cli, p, c0, c1)
	g := newGroup(t, 1, c0, c1)

	const start, end, tileX, tileY, placeholder, slot = 505, 506, 507, 508, 509, 510
	wide, square := stripes(t, 56, 28, 3), stripes(t, 20, 20, 5)
	// Prompts as the coordinator expands them: 56×28 is two tiles and the global one, 20×20 one tile.
	promptA := []int32{7, start, slot, tileX, slot, tileY, placeholder, slot, end, 9, 11}
	promptB := []int32{8, start, placeholder, slot, end, start, placeholder, slot, end, 12}
	work := func(id uint64, ids []int32, images ...[]byte) *tpfleetv1.SequenceWork {
		w := greedy(id, ids, 32)
		w.Images = images
		return w
	}
	// Alone and whole.
	wantA := g.run(work(1, promptA, wide))[1]
	wantB := g.run(work(2, promptB, square, square))[2]
	g.send(&tpfleetv1.StepRequest{Release: []uint64{1, 2}})
	// Both in one step, B's prompt in two pieces (its second image's slot in the second).
	first := work(4, promptB[:5], square, square)
	first.Sample = false
	got := g.run(work(3, promptA, wide), first)
	rest := &tpfleetv1.SequenceWork{SeqId: 4, Ids: promptB[5:], Sample: true}
	got4 := g.run(rest)[4]
	if got[3] != wantA || got4 != wantB {
		t.Errorf("batched and in pieces: next ids %d, %d; alone and whole %d, %d", got[3], got4, wantA, wantB)
	}
	// Decode steps carry no images.
	if _, ok := g.run(next(3, got[3]), next(4, got4))[3]; !ok {
		t.Errorf("decode step after images: no result for sequence 3")
	}

	for _, tc := range []struct {
		name string
		work *tpfleetv1.SequenceWork
	}{
		{"images without start", &tpfleetv1.SequenceWork{SeqId: 3, Ids: []int32{1}, Images: [][]byte{wide}}},
		{"corrupt image", work(5, promptA, []byte("junk"))},
		{"more slots than features", work(6, promptB, square)},
	} {
		g.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{tc.work}}, "worker: invalid request")
	}
	if _, ok := g.run(next(3, 1))[3]; !ok {
		t.Errorf("after refused image steps: no result for sequence 3")
	}
}

// TestStepImagesTextModel: a checkpoint without a vision tower refuses images, naming why.
func TestStepImagesTextModel(t *testing.T) {
	e := startEtcd(t)
	cli := newClient(t, e)
	w0 := startWorker(t, testConfig(t, e, "w0"))
	c0 := tpfleetv1.NewWorkerClient(dial(t, w0.Addr()))
	putPlan(t, cli, plan(1, []*worker.Worker{w0}...), c0)
	g := newGroup(t, 1, c0)
	w := greedy(1, []int32{1, 2}, 8)
	w.Images = [][]byte{stripes(t, 4, 4, 1)}
	g.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{w}}, "worker: invalid request: seq 1 (seqs[0]): 1 images: model: the checkpoint takes no images")
}
