package llama4_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/model/llama4"
)

// TestForwardImagesMerge: image features replace exactly the <|patch|> slots' embeddings (spec §6.4).
// Features equal to the slot token's own embedding give the text-only logits bit for bit; other features
// leave every earlier position unchanged and change the slots' and later ones; slot/feature count
// mismatches are ErrInput.
func TestForwardImagesMerge(t *testing.T) {
	ctx := context.Background()
	f := openFixture(t, "dense-moe-mm")
	m, _ := f.loadOps(t)
	h, vocab := f.cfg.HiddenSize, f.cfg.VocabSize
	const patch = 77
	ids := slices.Clone(f.scoreIDs[0][:24])
	slots := []int{5, 6, 7, 12, 20}
	for _, p := range slots {
		ids[p] = patch
	}
	embed, _, err := f.ckpt.Float32s(f.cfg.Prefix + "model.embed_tokens.weight")
	if err != nil {
		t.Fatal(err)
	}
	own := make([]float32, 0, len(slots)*h)
	for range slots {
		own = append(own, embed[patch*h:(patch+1)*h]...)
	}
	want, err := m.Score(ctx, ids)
	if err != nil {
		t.Fatal(err)
	}
	got, err := m.ScoreImages(ctx, ids, llama4.Images{PatchID: patch, Features: own})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("ScoreImages with the slot token's own embedding differs from Score")
	}

	other := make([]float32, len(own))
	for i := range other {
		other[i] = float32(i%7) - 3
	}
	got, err = m.ScoreImages(ctx, ids, llama4.Images{PatchID: patch, Features: other})
	if err != nil {
		t.Fatal(err)
	}
	for p := range len(ids) {
		same := slices.Equal(got[p*vocab:(p+1)*vocab], want[p*vocab:(p+1)*vocab])
		if p < slots[0] && !same {
			t.Errorf("position %d before the first slot changed", p)
		}
		if p >= slots[0] && same {
			t.Errorf("position %d at or after the first slot did not change", p)
		}
	}

	opt := llama4.GenerateOptions{MaxTokens: 5}
	wantIDs, _, err := m.Generate(ctx, ids, opt, nil)
	if err != nil {
		t.Fatal(err)
	}
	gotIDs, _, err := m.GenerateImages(ctx, ids, llama4.Images{PatchID: patch, Features: own}, opt, nil)
	if err != nil || !slices.Equal(gotIDs, wantIDs) {
		t.Errorf("GenerateImages with the slot token's own embedding = %v, %v; Generate = %v", gotIDs, err, wantIDs)
	}

	for _, bad := range [][]float32{own[:4*h], append(slices.Clone(own), own[:h]...), own[:h+3]} {
		if _, err := m.ScoreImages(ctx, ids, llama4.Images{PatchID: patch, Features: bad}); !errors.Is(err, llama4.ErrInput) {
			t.Errorf("ScoreImages with %d feature values for %d slots: error = %v, want ErrInput", len(bad), len(slots), err)
		}
	}
}
