package worker

import (
	"context"
	"hash/fnv"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/shard"
)

// deviceFiller is implemented by backends that make random weights on the device itself (cuda): with
// --load-format dummy nothing is then generated on the host or copied over the bus, so a full-size model
// is ready at the device's memory speed.
type deviceFiller interface {
	// RandomBF16 makes a bf16 tensor of shape, values mean + std·z, z ~ N(0, 1), from seed.
	RandomBF16(shape []int, mean, std float32, seed uint64) (backend.Tensor, error)
	// RandomQuantized makes such values quantised in f (inputDim 1).
	RandomQuantized(f quant.Format, shape []int, inputDim int, mean, std float32, seed uint64) (backend.Tensor, error)
}

// dummyStd is the standard deviation of generated weights of more than one dimension (initializer_range);
// 1-D ones (norm weights) are 1.
const dummyStd = 0.02

// deviceDummy loads a rank's generated weights on a deviceFiller: each tensor of the manifest, of the
// rank's local shape and layout, in the plan's format; the values come from the device's generator, seeded
// by the tensor's name and the rank (not model/dummy's, which the host path through next uses: same
// shapes, other numbers). Tensors outside the manifest go to next.
type deviceDummy struct {
	next   run.Weights
	fill   deviceFiller
	man    *shard.Manifest
	specs  map[string]model.TensorSpec
	format quant.Format
}

var _ run.Weights = (*deviceDummy)(nil)

func newDeviceDummy(next run.Weights, fill deviceFiller, cfg model.Config, man *shard.Manifest, f quant.Format) *deviceDummy {
	d := &deviceDummy{next: next, fill: fill, man: man, specs: map[string]model.TensorSpec{}, format: f}
	for _, s := range model.Tensors(cfg) {
		d.specs[s.Name] = s
	}
	return d
}

func (d *deviceDummy) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, model.Replicated, err
	}
	ts, ok := d.man.Lookup(d.man.Prefix + name)
	spec, known := d.specs[name]
	if !ok || !known {
		return d.next.Load(ctx, name)
	}
	h := fnv.New64a()
	h.Write([]byte(name))
	seed := h.Sum64() ^ uint64(d.man.Rank)*0x9e3779b97f4a7c15
	mean, std := float32(0), float32(dummyStd)
	if len(spec.Shape) <= 1 {
		mean, std = 1, 0
	}
	var t backend.Tensor
	var err error
	if d.format.Quantized() && spec.Quantizable && spec.InputDim == 1 {
		t, err = d.fill.RandomQuantized(d.format, ts.LocalShape, spec.InputDim, mean, std, seed)
	} else {
		t, err = d.fill.RandomBF16(ts.LocalShape, mean, std, seed)
	}
	return t, ts.Layout, err
}
