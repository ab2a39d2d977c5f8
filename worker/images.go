package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/run"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// openImages loads the checkpoint's vision tower when its family has one that runs here and the
// checkpoint declares one (run.ImageOpener), or takes it over from weights of the same checkpoint in
// from; otherwise noImages says why the model takes no images (err is a failed load). A checkpoint read
// from a peer (local false) has no files here for the tower.
func (w *Worker) openImages(ctx context.Context, cfg model.Config, dir string, local bool, from []*weights) (enc run.ImageEncoder, noImages, err error) {
	for _, f := range from {
		if f != nil && f.key.dir == dir && f.images != nil {
			return f.images, nil, nil
		}
	}
	o, ok := cfg.(run.ImageOpener)
	switch {
	case !ok:
		return nil, fmt.Errorf("%w: the %s family has no vision tower", model.ErrNoImages, cfg.Info().Family), nil
	case !local:
		return nil, fmt.Errorf("%w: %s is read from a peer; the vision tower needs the checkpoint's files on this host", model.ErrNoImages, dir), nil
	}
	enc, err = o.OpenImageEncoder(ctx, dir, w.ops)
	if errors.Is(err, model.ErrNoImages) {
		return nil, err, nil
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		return nil, nil, fmt.Errorf("vision tower: %w", err)
	}
	w.lg.Info("vision tower loaded", zap.String("model", dir), zap.String("device", w.ops.Name()))
	return enc, nil, nil
}

// imageSlots are a sequence's image features not yet fed: the rows of the image slots its later prompt
// pieces hold, in order. Decode steps never need them: once every slot was fed they are dropped.
type imageSlots struct {
	rows []float32 // [slots, hidden], host
	used int       // rows fed so far
	n    int       // rows in all
}

// encodeImages runs the vision tower once over the images of every sequence the request starts with
// images (all their tiles in one pass) and returns each one's features by request index.
func (w *Worker) encodeImages(req *tpfleetv1.StepRequest, wts *weights) (map[int]*imageSlots, error) {
	var at []int
	var prompts [][][]byte
	for i, work := range req.GetSeqs() {
		if work.GetStart() && len(work.GetImages()) > 0 {
			at, prompts = append(at, i), append(prompts, work.GetImages())
		}
	}
	if len(at) == 0 {
		return nil, nil
	}
	start := time.Now()
	feats, err := wts.images.Encode(w.ctx, prompts)
	switch {
	case err != nil && w.ctx.Err() != nil:
		return nil, fmt.Errorf("%w: %w", ErrClosed, err)
	case err != nil:
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	w.lg.Debug("images encoded", zap.Uint64("step", req.GetStep()), zap.Int("sequences", len(at)), zap.Duration("took", time.Since(start)))
	rowLen := wts.images.Width()
	out := make(map[int]*imageSlots, len(at))
	for k, i := range at {
		out[i] = &imageSlots{rows: feats[k], n: len(feats[k]) / rowLen}
	}
	return out, nil
}

// take returns the feature rows of the next n image slots and drops the features once all were taken.
func (s *imageSlots) take(n, rowLen int) ([]float32, error) {
	if n == 0 {
		return nil, nil
	}
	if s.used+n > s.n {
		return nil, fmt.Errorf("%d image slots after %d, the images give %d features", n, s.used, s.n)
	}
	rows := s.rows[s.used*rowLen : (s.used+n)*rowLen]
	s.used += n
	if s.used == s.n {
		s.rows = nil // the KV cache holds them now
	}
	return rows, nil
}
