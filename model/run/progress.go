package run

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
)

// Progress is Weights that counts what it loads and logs the running totals every Every: the one
// weight-load progress report of the worker and of the one-process commands. Load runs on one goroutine
// (the model's loader), so it needs no lock.
type Progress struct {
	Weights Weights
	Log     *zap.Logger
	// Total and TotalBytes are what the whole load will be, for "N of M" in the log.
	Total      int
	TotalBytes int64
	// BytesOf gives the stored bytes of a tensor by the model's name for it; nil counts no bytes.
	BytesOf func(name string) int64
	// Every is the least time between two reports; zero means two seconds.
	Every time.Duration

	tensors     int
	bytes       int64
	start, last time.Time
}

var _ Weights = (*Progress)(nil)

// Load loads name through p.Weights and counts it.
func (p *Progress) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	now := time.Now()
	if p.start.IsZero() {
		p.start, p.last = now, now
	}
	t, lay, err := p.Weights.Load(ctx, name)
	if err != nil {
		return t, lay, err
	}
	p.tensors++
	if p.BytesOf != nil {
		p.bytes += p.BytesOf(name)
	}
	every := p.Every
	if every <= 0 {
		every = 2 * time.Second
	}
	if now = time.Now(); now.Sub(p.last) >= every {
		p.last = now
		p.Log.Info("loading weights", zap.Int("tensors", p.tensors), zap.Int("of", p.Total),
			zap.Int64("bytes", p.bytes), zap.Int64("of-bytes", p.TotalBytes),
			zap.Duration("elapsed", now.Sub(p.start).Round(time.Millisecond)))
	}
	return t, lay, nil
}

// Loaded returns the tensors and bytes loaded so far.
func (p *Progress) Loaded() (tensors int, bytes int64) { return p.tensors, p.bytes }
